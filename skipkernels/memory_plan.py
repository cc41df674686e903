"""``skipkernels plan``: a training run's peak memory by kind, predicted before it starts, without a GPU.

The kinds are those of ``skipkernels bench``'s measured split (``bench.memory_breakdown``):

- ``weights``: every parameter and buffer of the model (PET modules included), fp32 as trained;
  the trainable ones among them are the optimizer's master weights (``trainable_weights_mb``);
- ``gradients``: one fp32 gradient per trainable weight, held between steps, where the update
  runs after backward; none where it runs inside backward (``train.step.BackwardUpdate``: each
  gradient is freed as soon as its tensor is updated, so only a few live at once, within the step);
- ``optimizer_state``: SGD's momentum, one fp32 buffer per trainable weight;
- ``caches_and_inputs``: what else is held between steps: the LSkip text prefix cache, the class
  tokens, CSkip's prototypes, the epoch's LSkip image cache where it lives on the device (else it
  is reported as host memory), and the batch;
- ``activations_and_workspace``: what a step adds on top of that.

Weights, gradients, optimizer state and caches are counted from shapes: the model is built on
the meta device (no weights are created) and each tuning mode's trainable set is applied to it.

Activations come from the real training step (the tuner's loss and backward, with the update
where the Trainer puts it) run on the CPU at a small size: a model of the true widths with three
suffix blocks per tower, at one and two images and at 4 and 8 classes run per step. The CPU
allocator's trace of each step (torch.profiler) is cut at markers (the forward's end, zero_grad,
backward reaching the middle block of each tower, the update's start), and the highest level
between markers is extrapolated linearly in the batch and in the classes run per step. Each block
the small model lacks adds what the middle block saves for backward (``saved_tensors_hooks``),
held from the forward's end until backward reaches it. So the prediction is the CPU's step: where
a GPU's kernels keep other tensors (flash attention, cuBLAS workspace) it differs by those.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import logging
import os
import re
import weakref
from pathlib import Path

import torch

from skipkernels.skip.lskip import cache_on_device
from skipkernels.train.step import graph_memory_unavailable

KINDS = ("weights", "gradients", "optimizer_state", "caches_and_inputs", "activations_and_workspace")
MB = 2 ** 20
_PROBE_BATCHES = (1, 2)
_PROBE_CLASSES = (4, 8)  # classes run per probe step; CSkip needs at least 3 to be on
# unique sizes of the marker allocations that locate the forward's end and the backward's arrival
# at the small model's middle blocks, the zero_grad and the update in the allocator's trace
_MARK_FORWARD_END, _MARK_TEXT_BLOCK, _MARK_IMAGE_BLOCK, _MARK_GRADIENTS_FREED, _MARK_OPTIMIZER_STEP = \
    7919, 7927, 7933, 7937, 7949
_AMP = {"none": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_memory(text: str) -> float:
    """Bytes of a memory size such as ``24GB``, ``80 GiB``, ``40000MB`` or ``1.5e10``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"bad memory size {text!r}: a number with an optional unit B, KB, MB, GB, TB, KiB, MiB, "
                         "GiB or TiB, e.g. 24GB")
    value = float(match.group(1)) * _UNITS[unit]
    if not value > 0:
        raise ValueError(f"bad memory size {text!r}: it must be above 0")
    return value


# ---------------------------------------------------------------------------------------------- models
def _quiet():
    from skipkernels.models import logging_disabled
    return logging_disabled(logging.WARNING)


@contextlib.contextmanager
def _timm_depth(depth: int | None):
    """open_clip builds a timm image trunk at its named depth; this builds it with ``depth`` blocks."""
    if depth is None:
        yield
        return
    import open_clip.timm_model as timm_model
    create = timm_model.timm.create_model

    def shallow(*args, **kwargs):
        return create(*args, depth=depth, **kwargs)
    timm_model.timm.create_model = shallow
    try:
        yield
    finally:
        timm_model.timm.create_model = create


def build_model(name: str, device="meta", depth: tuple[int, int] | None = None, seed: int = 0):
    """(model, tokenizer or None) of open_clip model ``name`` or ``hf:<folder>`` with random weights
    on ``device`` ("meta": shapes only). ``depth``: (image blocks, text blocks) instead of the
    model's own. The tokenizer is None where it cannot be loaded offline (``synthetic_tokenizer``
    stands in)."""
    from skipkernels.models import HF_PREFIX
    if name.startswith(HF_PREFIX):
        return _build_hf(name.removeprefix(HF_PREFIX), device, depth, seed)
    from skipkernels.models import open_clip_module
    open_clip = open_clip_module()
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r}: an open_clip model name (open_clip.list_models()) or "
                         "hf:<folder with a config.json>")
    cfg = open_clip.get_model_config(name)
    overrides, timm_depth = {}, None
    if depth is not None:
        vision, text = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
        if vision.get("timm_model_name"):
            timm_depth = depth[0]
        else:
            vision["layers"] = depth[0]
        text["layers"] = depth[1]
        overrides = {"vision_cfg": vision, "text_cfg": text}
    torch.manual_seed(seed)
    place = torch.device("meta") if str(device) == "meta" else contextlib.nullcontext()
    with _quiet(), _timm_depth(timm_depth), place:
        model = open_clip.create_model(name, pretrained=None, device=device, **overrides)
    tokenizer = None
    if str(device) != "meta":
        tokenizer = _offline_tokenizer(name, model)
    return model, tokenizer


@contextlib.contextmanager
def _offline():
    """Nothing is downloaded: a tokenizer that is not at hand is stood in for."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def _offline_tokenizer(name: str, model):
    from skipkernels.models import load_tokenizer, open_clip_module
    if (open_clip_module().get_model_config(name) or {}).get("text_cfg", {}).get("hf_tokenizer_name"):
        return None  # a tokenizer of the Hugging Face hub: not fetched, SyntheticTokenizer stands in
    try:
        with _offline():
            return load_tokenizer(name, model)
    except (ValueError, OSError, ImportError):
        return None


def _build_hf(folder: str, device, depth, seed):
    from skipkernels.models import hf_config_and_class
    transformers, config, model_class = hf_config_and_class(folder)
    if depth is not None:
        config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers = depth
    torch.manual_seed(seed)
    place = torch.device("meta") if str(device) == "meta" else contextlib.nullcontext()
    with _quiet(), place:
        model = model_class(config)
    tokenizer = None
    if str(device) != "meta":
        try:
            from skipkernels.families import token_function
            tokenizer = token_function(transformers.AutoTokenizer.from_pretrained(folder),
                                       config.text_config.max_position_embeddings)
        except (OSError, ValueError, TypeError):
            tokenizer = None
    return model, tokenizer


class SyntheticTokenizer:
    """Token ids of the shape a real tokenizer gives where none can be loaded offline: start token,
    one id per word and one for the full stop, end token (the largest id, so argmax pooling finds
    it), zeros after."""

    def __init__(self, context_length: int, vocab_size: int):
        self.context_length, self.vocab_size = context_length, vocab_size

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            words = min(len(text.replace(".", " .").split()), self.context_length - 2)
            ids = [self.vocab_size - 2] + [1 + (row + i) % (self.vocab_size - 3) for i in range(words)]
            out[row, :len(ids) + 1] = torch.tensor(ids + [self.vocab_size - 1])
        return out


def _tokenizer_for(model, tokenizer):
    if tokenizer is not None:
        return tokenizer
    from skipkernels.families import model_towers
    text = model_towers(model)[1]
    context = getattr(model, "context_length", None) or text.positional_embedding.shape[0]
    return SyntheticTokenizer(int(context), int(text.token_embedding.num_embeddings))


@functools.lru_cache(maxsize=8)
def _meta_model(name: str, depth: tuple[int, int] | None):
    model, _ = build_model(name, "meta", depth)
    return model


def tower_depths(model) -> tuple[int, int]:
    from skipkernels.families import model_towers
    image, text = model_towers(model)
    return len(image.blocks), len(text.blocks)


def _bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


@functools.lru_cache(maxsize=64)  # the largest-batch and smallest-omega searches ask again and again
def _weight_counts(name: str, depth, mode: str, skip_layers: int) -> dict:
    """Bytes of all weights and of the trainable ones, from the model on the meta device with
    ``mode``'s trainable set."""
    import copy

    from skipkernels.families import model_towers
    from skipkernels.skip.modes import mode_plan
    plan = mode_plan(mode, skip_layers)
    model = copy.deepcopy(_meta_model(name, depth))
    trainable = []
    if plan.trains == "pet":
        from skipkernels.pet import apply_pet, trainable_modules_for_mode
        with _quiet():
            handle = apply_pet(model, trainable_modules_for_mode(plan.pet_method, skip_layers=plan.skip_layers))
        trainable = list(handle.parameters())
    elif plan.trains == "all":
        frozen = {id(model.logit_scale), id(getattr(model, "logit_bias", None))}
        trainable = [p for p in model.parameters() if id(p) not in frozen]
    elif plan.trains == "suffix":
        for tower in model_towers(model):
            trainable += [*tower.blocks[plan.skip_layers:].parameters(), *tower.head_parameters()]
    weights = _bytes([*model.parameters(), *model.buffers()])
    offloadable = _prefix_offload_bytes(model, plan.skip_layers, trainable) if plan.caches_prefix else (0, 0)
    if plan.trains == "prompt":  # CoOp's context: 4 vectors of the text width (SkipConfig.coop_n_ctx)
        width = model_towers(model)[1].token_embedding.weight.shape[1]
        trainable_bytes = 4 * width * 4
    else:
        trainable_bytes = _bytes(trainable)
    return {"weights": weights, "trainable": trainable_bytes, "offloadable": sum(offloadable),
            "offloadable_text": offloadable[1]}


def _prefix_offload_bytes(model, skip_layers: int, trainable) -> tuple[int, int]:
    """Bytes of the frozen parameters the tuner moves to host memory between LSkip's caching
    passes (``SkipTuner._set_up_prefix_offload``), (image tower's, text tower's): blocks [0, omega)
    and the stems of both towers, less what is trainable or also read by the steps (suffix
    blocks, heads). Counted by tensor: meta tensors have no storages to tell shared ones apart."""
    from skipkernels.families import model_towers
    image, text = model_towers(model)
    steps_read = {id(t) for tower in (image, text) for block in tower.blocks[skip_layers:]
                  for t in (*block.parameters(), *block.buffers())}
    steps_read |= {id(p) for tower in (image, text) for p in tower.head_parameters()}
    steps_read |= {id(p) for p in trainable}
    in_blocks = {id(p) for block in image.blocks for p in block.parameters()}
    in_blocks |= {id(p) for p in image.head_parameters()}
    image_part = [p for p in image.parameters() if id(p) not in in_blocks]
    image_part += [p for block in image.blocks[:skip_layers] for p in block.parameters()]
    text_part = [*text.token_embedding.parameters()]
    if isinstance(text.positional_embedding, torch.nn.Parameter):
        text_part.append(text.positional_embedding)
    text_part += [p for block in text.blocks[:skip_layers] for p in block.parameters()]
    image_unique = {id(p): p for p in image_part if id(p) not in steps_read}
    text_unique = {id(p): p for p in text_part if id(p) not in steps_read and id(p) not in image_unique}
    return _bytes(image_unique.values()), _bytes(text_unique.values())


# ---------------------------------------------------------------------------------------------- the probe
def _names_of_longest_prompts(tokenizer, template: str, names: list[str], count: int) -> list[str]:
    tokens = tokenizer([template.format(n) for n in names])
    lengths = (tokens != 0).sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)[:count]
    return [names[int(i)] for i in order]


class _Watched:
    """A block's plan (or module) as the tower runs it, watched: its forward's saved tensors are
    tagged with the block, and when backward reaches its output a marker allocation of a unique
    size appears in the allocator's trace."""

    def __init__(self, inner, tag: str, mark_bytes: int, watch):
        self._inner, self._tag, self._mark_bytes, self._watch = inner, tag, mark_bytes, watch

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _run(self, call, *args, **kwargs):
        self._watch.current = self._tag
        try:
            out = call(*args, **kwargs)
        finally:
            self._watch.current = None
        first = out[0] if isinstance(out, (tuple, list)) else out
        if torch.is_tensor(first) and first.requires_grad:
            first.register_hook(self._reached)
        return out

    def _reached(self, grad):
        if self._mark_bytes not in self._watch.reached:
            self._watch.reached.add(self._mark_bytes)
            torch.empty(self._mark_bytes, dtype=torch.uint8)

    def forward(self, *args, **kwargs):
        return self._run(self._inner.forward, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._run(self._inner, *args, **kwargs)


class _BlockWatch:
    """Watches block ``index`` of each tower (``_Watched``) and counts the bytes its forward saves
    for backward (``saved_tensors_hooks``): distinct storages that are not weights, each
    counted once."""

    def __init__(self, tuner, index: int):
        self.towers = {"image": tuner.towers.image, "text": tuner.towers.text}
        self.index = index
        self.weight_ptrs = {t.untyped_storage().data_ptr() for t in [*tuner.parameters(), *tuner.model.buffers()]}
        self.current = None
        self.owner = {}
        self.bytes = {tag: 0 for tag in self.towers}
        self.reached = set()
        self.restore = []

    def __enter__(self):
        marks = {"image": _MARK_IMAGE_BLOCK, "text": _MARK_TEXT_BLOCK}
        for tag, tower in self.towers.items():
            plan = tower.plans[self.index] if tower.plans else None
            if plan is not None and plan.hooks is not None:
                tower.plans[self.index] = _Watched(plan, tag, marks[tag], self)
                self.restore.append(lambda tower=tower, plan=plan: tower.plans.__setitem__(self.index, plan))
            else:
                block = tower.blocks[self.index]
                tower.blocks[self.index] = _WatchedModule(block, tag, marks[tag], self)
                self.restore.append(lambda tower=tower, block=block: tower.blocks.__setitem__(self.index, block))
        self.saved = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)
        self.saved.__enter__()
        return self

    def __exit__(self, *exc):
        self.saved.__exit__(*exc)
        for undo in self.restore:
            undo()
        return False

    def _pack(self, tensor):
        if self.current is not None:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            # an address seen before holds the same storage only while that tensor lives (the
            # allocator reuses freed addresses; autograd keeps saved tensors alive)
            seen = self.owner.get(ptr)
            if ptr not in self.weight_ptrs and (seen is None or seen() is None):
                self.owner[ptr] = weakref.ref(tensor)
                self.bytes[self.current] += storage.nbytes()
        return tensor


class _WatchedModule(torch.nn.Module):
    """``_Watched`` for a block that runs its own forward (a ModuleList holds only modules)."""

    def __init__(self, block, tag, mark_bytes, watch):
        super().__init__()
        self.watched = _Watched(block, tag, mark_bytes, watch)

    def forward(self, *args, **kwargs):
        return self.watched(*args, **kwargs)


@dataclasses.dataclass
class _Trace:
    """One probe step: the allocator's running level (bytes above the start) at each event, and
    the maxima of the level between the markers."""
    segments: dict  # (first marker, next marker) -> the highest level between them
    starts: dict  # (first marker, next marker) -> the level at the first
    saved: dict  # "image" / "text" -> bytes the watched block saves for backward
    grads: dict  # "image" / "text" -> bytes of the watched block's gradients
    trainable: int  # bytes of every trainable tensor


_START, _END = "start", "end"
_MARKS = (_MARK_FORWARD_END, _MARK_GRADIENTS_FREED, _MARK_TEXT_BLOCK, _MARK_IMAGE_BLOCK, _MARK_OPTIMIZER_STEP)


def _trace_step(step, tuner, inputs, labels, index: int) -> _Trace:
    from skipkernels.train.memory import CpuAllocatorPeak
    with _BlockWatch(tuner, index) as watch, CpuAllocatorPeak(keep_trace=True) as probe:
        step(inputs, labels)
    if probe.trace is None:
        raise RuntimeError("this torch's profiler gives no allocation events: activations cannot be counted")
    sizes = [nbytes for _, nbytes in probe.trace]
    held = _running(sizes)
    at = {_START: 0}
    for mark in _MARKS:
        found = next((i for i, n in enumerate(sizes) if n == mark), None)
        if found is not None:
            at[mark] = found
    at[_END] = len(held)
    order = sorted(at, key=lambda m: at[m])
    segments, starts = {}, {}
    for first, second in zip(order, order[1:]):
        part = held[at[first]:at[second]] or [held[at[first] - 1] if at[first] else 0.0]
        segments[(first, second)] = max(part)
        starts[(first, second)] = held[at[first] - 1] if at[first] else 0.0
    grads = {tag: sum(p.numel() * p.element_size() for p in tower.blocks[index].parameters() if p.requires_grad)
             for tag, tower in watch.towers.items()}
    trainable = sum(p.numel() * p.element_size() for p in tuner.parameters() if p.requires_grad)
    return _Trace(segments, starts, dict(watch.bytes), grads, trainable)


@dataclasses.dataclass
class ActivationProbe:
    """The step's allocator traces at (1, k1), (2, k1), (1, k2) images and classes run, on a model
    of the true widths with three suffix blocks per tower (the first, a middle one watched, the last)."""
    traces: dict
    holds_gradients: bool   # the update runs after backward: gradients live between steps
    foreach: bool           # the update's foreach path: its temporaries copy every gradient
    image_tokens: int       # tokens per image entering the suffix
    image_width: int
    image_size: int
    text_length_cache: int  # tokens per prompt in the text prefix cache
    context_length: int
    embed_dim: int

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["traces"] = [{"key": list(key), "segments": [[*seg, v] for seg, v in t.segments.items()],
                          "starts": [[*seg, v] for seg, v in t.starts.items()], "saved": t.saved, "grads": t.grads,
                          "trainable": t.trainable} for key, t in self.traces.items()]
        return out

    @classmethod
    def from_json(cls, data: dict) -> "ActivationProbe":
        data = dict(data)
        traces = {}
        for t in data.pop("traces"):
            traces[tuple(t["key"])] = _Trace({(a, b): v for a, b, v in t["segments"]},
                                             {(a, b): v for a, b, v in t["starts"]}, t["saved"], t["grads"],
                                             t["trainable"])
        return cls(traces, **data)

    def _size(self, values, batch, rows):
        (b1, k1), (b2, _), (_, k2) = list(self.traces)
        base = values[(b1, k1)]
        return base + (batch - b1) * (values[(b2, k1)] - base) / (b2 - b1) + \
            (rows - k1) * (values[(b1, k2)] - base) / (k2 - k1)

    def saved_per_block(self, tower: str, batch: float, rows: float) -> float:
        return max(0.0, self._size({key: t.saved[tower] for key, t in self.traces.items()}, batch, rows))

    def peak(self, batch: int, rows: int, extra_text_blocks: int, extra_image_blocks: int) -> float:
        """The step's peak above the level before it, at ``batch`` images and ``rows`` classes run,
        with that many more middle blocks per tower than the small model.

        Between each pair of markers the highest level is extrapolated linearly in images and
        classes. The extra blocks' saved tensors are held from the forward's end until backward
        reaches the watched block (the extra blocks lie between it and the last). Where gradients
        are held between steps, zero_grad frees the extra blocks' too and their backward makes them
        again, and optimizer.step's temporaries grow with the extra blocks' gradients."""
        saved = {tower: self.saved_per_block(tower, batch, rows) for tower in ("text", "image")}
        extra = {"text": extra_text_blocks, "image": extra_image_blocks}
        reached = {"text": _MARK_TEXT_BLOCK, "image": _MARK_IMAGE_BLOCK}
        first = next(iter(self.traces.values()))
        position = {segment[0]: i for i, segment in enumerate(first.segments)}
        growth = sum(max(0, extra[t]) * first.grads[t] for t in extra)
        best = 0.0
        for segment in first.segments:
            if any(segment not in t.segments for t in self.traces.values()):
                continue  # a marker one probe step did not reach
            here = position[segment[0]]

            def after(mark):
                return mark in position and here >= position[mark]
            level = self._size({key: t.segments[segment] for key, t in self.traces.items()}, batch, rows)
            add = 0.0
            for tower in extra:
                if extra[tower] < 0:  # fewer blocks than the small model: its watched block's saved tensors
                    add += extra[tower] * saved[tower]
                elif after(_MARK_FORWARD_END) and not after(reached[tower]):
                    freed = self.holds_gradients and after(_MARK_GRADIENTS_FREED)
                    kept = saved[tower] - first.grads[tower] if freed else saved[tower]
                    add += extra[tower] * max(0.0, kept)
            if self.holds_gradients and self.foreach and after(_MARK_OPTIMIZER_STEP) and first.trainable:
                start = self._size({key: t.starts[segment] for key, t in self.traces.items()}, batch, rows)
                add += growth * max(0.0, level - start) / first.trainable
            best = max(best, level + add)
        return best


def _running(sizes):
    held, level = [], 0.0
    for n in sizes:
        level += n
        held.append(level)
    return held


_PROBE_FORMAT = 1


def default_probe_cache() -> Path:
    """Where probe steps are kept between runs: ``$SKIPKERNELS_CACHE/memory-plan-probes.json``."""
    from skipkernels._build import cache_root
    return cache_root() / "memory-plan-probes.json"


_DISK: dict = {}


def _stored_probe(cache: Path | None, *key) -> ActivationProbe:
    """``_probe(*key)``, kept in the JSON file ``cache`` (None: in this process only)."""
    if cache is None:
        return _probe(*key)
    cache = Path(cache)
    name = json.dumps([_PROBE_FORMAT, torch.__version__, *key])
    stored = _DISK.setdefault(str(cache), json.loads(cache.read_text()) if cache.is_file() else {})
    if name in stored:
        return ActivationProbe.from_json(stored[name])
    probe = _probe(*key)
    stored[name] = probe.to_json()
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(cache.name + f".{os.getpid()}")
    partial.write_text(json.dumps(stored, indent=0, sort_keys=True))
    os.replace(partial, cache)
    return probe


@functools.lru_cache(maxsize=32)
def _probe(name: str, mode: str, amp: str, cache_dtype: str, update_in_backward: bool, foreach: bool,
           names_key: tuple, template: str) -> ActivationProbe:
    """Runs the real step on the CPU at the probe sizes (see the module's docstring)."""
    import copy

    from skipkernels.patch import patch_clip
    from skipkernels.skip.modes import mode_plan
    from skipkernels.skip.tuner import SkipConfig, SkipTuner
    from skipkernels.train.memory import CpuAllocatorPeak
    from skipkernels.train.step import EagerStep
    plan = mode_plan(mode, 1)
    caches = plan.caches_prefix
    skip_layers = 1 if caches else 0
    depth = (skip_layers + 3, skip_layers + 3)
    watched = skip_layers + 1  # a middle block: the first one's input may need no gradient
    model, tokenizer = build_model(name, "cpu", depth)
    model = patch_clip(model)
    tokenizer = _tokenizer_for(model, tokenizer)
    image_size = _image_size(model)
    autocast_dtype = _AMP[amp]
    traces = {}
    probe_info = {}
    state = {}
    for batch, rows in ((_PROBE_BATCHES[0], _PROBE_CLASSES[0]), (_PROBE_BATCHES[1], _PROBE_CLASSES[0]),
                        (_PROBE_BATCHES[0], _PROBE_CLASSES[1])):
        if rows not in state:
            names = list(names_key[:rows])
            # CSkip on, with K = rows - 1 and the one lower rank always kept: `rows` classes run
            config = SkipConfig(mode=mode, skip_layers=skip_layers if caches else None, max_top=rows,
                                cache_dtype=cache_dtype, template=template, top_count=rows - 1)
            # a PET mode's modules go into the model it is given: a model each
            tuner = SkipTuner(copy.deepcopy(model) if plan.trains == "pet" else model, names, tokenizer, config,
                              seed=0)
            # foreach: the update's path on a GPU, whose temporaries hold a copy of every gradient
            optimizer = torch.optim.SGD(tuner.parameter_groups(2e-5, 5e-6), lr=2e-5, momentum=0.9,
                                        weight_decay=5e-4, foreach=foreach or None)
            with CpuAllocatorPeak():  # allocated under the profiler, so that their frees are in the traces
                _steady_state(optimizer, update_in_backward)
            step = EagerStep(tuner, optimizer, autocast_dtype, update_in_backward=update_in_backward)
            step.loss_module = functools.partial(_loss_with_mark, tuner)
            optimizer.zero_grad = functools.partial(_zero_grad_with_mark, optimizer.zero_grad)
            optimizer.step = functools.partial(_step_with_mark, optimizer.step)
            state[rows] = (tuner, step)
            if not traces:  # first-call allocations (kernels' own caches) out of the traces
                _trace_step(step, tuner, *_probe_inputs(tuner, batch, image_size, autocast_dtype), watched)
        tuner, step = state[rows]
        inputs, labels = _probe_inputs(tuner, batch, image_size, autocast_dtype)
        traces[(batch, rows)] = _trace_step(step, tuner, inputs, labels, watched)
        if caches:
            probe_info["image_tokens"], probe_info["image_width"] = inputs.shape[1], inputs.shape[2]
        probe_info["text_length_cache"] = tuner.text_cache.tokens_at_block.shape[1] if tuner.text_cache else \
            tuner.step_length
    if not caches:
        from skipkernels import checks
        with torch.no_grad():
            tokens = state[_PROBE_CLASSES[0]][0].towers.image.stem(torch.zeros(1, 3, image_size, image_size))
        probe_info["image_tokens"], probe_info["image_width"] = tokens.shape[1], checks.token_width(model)
    tuner = state[_PROBE_CLASSES[0]][0]
    result = ActivationProbe(traces, not update_in_backward, foreach, image_size=image_size, context_length=tuner.class_tokens.shape[1],
                           embed_dim=_embed_dim(tuner), **probe_info)
    # the small models, their tuners and hooks hold reference cycles: gone now, not at some later collection
    del state, tuner, model
    gc.collect()
    return result


def _embed_dim(tuner) -> int:
    with torch.no_grad():
        return int(tuner.encode_classes(tuner.classnames[:1]).shape[-1])


def _image_size(model) -> int:
    from skipkernels.checks import image_size
    return int(image_size(model)[0])


def _loss_with_mark(tuner, inputs, labels):
    loss = tuner.loss(inputs, labels)
    torch.empty(_MARK_FORWARD_END, dtype=torch.uint8)  # the forward's end, in the allocator's trace
    return loss


def _zero_grad_with_mark(zero_grad, *args, **kwargs):
    zero_grad(*args, **kwargs)
    torch.empty(_MARK_GRADIENTS_FREED, dtype=torch.uint8)  # the gradients' frees, in the allocator's trace


def _step_with_mark(optimizer_step, *args, **kwargs):
    torch.empty(_MARK_OPTIMIZER_STEP, dtype=torch.uint8)  # the update's start, in the allocator's trace
    return optimizer_step(*args, **kwargs)


def _steady_state(optimizer, update_in_backward: bool) -> None:
    """What a run holds from its second step on: momentum for every trainable tensor, and its
    gradient where the update runs after backward."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
            if not update_in_backward:
                p.grad = torch.zeros_like(p)


def _probe_inputs(tuner, batch: int, image_size: int, autocast_dtype):
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(batch))
    labels = torch.zeros(batch, dtype=torch.long)
    if tuner.plan.caches_prefix:
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            images = tuner.image_prefix(images).to(tuner.cache_dtype)
    return images, labels


# ---------------------------------------------------------------------------------------------- the plan
@dataclasses.dataclass
class MemoryPlan:
    """A run's predicted memory (MB, 2**20 bytes) by kind (``KINDS``, as ``skipkernels bench``
    measures them), what it fits in, and the largest batch and smallest ω that fit
    ``device_memory_mb``."""
    model: str
    mode: str
    skip_layers: int
    batch_size: int
    num_classes: int
    classes_per_step: int
    amp: str
    device_type: str
    step: str
    update_in_backward: bool
    kinds_mb: dict
    trainable_weights_mb: float
    image_cache_mb: float
    image_cache_on_device: bool
    prefix_offloaded_mb: float = 0.0  # frozen prefix weights in host memory during the steps
    caching_pass_mb: float = 0.0  # the peak of an LSkip caching pass, the image prefix weights back on the device
    device_memory_mb: float | None = None
    largest_batch: int | None = None
    smallest_skip_layers: int | None = None
    notes: list = dataclasses.field(default_factory=list)
    step_reason: str = ""  # why --step auto takes this kind, where the device's memory decided it

    @property
    def steps_mb(self) -> float:
        """The peak during the training steps: the sum of the kinds."""
        return sum(self.kinds_mb.values())

    @property
    def total_mb(self) -> float:
        """The run's peak: the steps', or a caching pass's where the prefix weights come back."""
        return max(self.steps_mb, self.caching_pass_mb)

    @property
    def host_mb(self) -> float:
        return (0.0 if self.image_cache_on_device else self.image_cache_mb) + self.prefix_offloaded_mb

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory_mb is None else self.total_mb <= self.device_memory_mb

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(steps_mb=self.steps_mb, total_mb=self.total_mb, host_mb=self.host_mb, fits=self.fits)
        return out

    def table(self) -> str:
        omega = f"omega {self.skip_layers}, " if self.skip_layers else ""
        lines = [f"{self.model}, {self.mode}, {omega}batch {self.batch_size}, {self.num_classes} classes "
                 f"({self.classes_per_step} run per step), amp {self.amp}, {self.device_type}, step {self.step}"
                 f"{f' ({self.step_reason})' if self.step_reason else ''}, optimizer update {'inside' if self.update_in_backward else 'after'} backward",
                 f"{'kind':<27} {'predicted MB':>13}"]
        for kind in KINDS:
            lines.append(f"{kind:<27} {self.kinds_mb[kind]:13.1f}")
            if kind == "weights":
                lines.append(f"{'  of which trainable':<27} {self.trainable_weights_mb:13.1f}")
                if self.prefix_offloaded_mb:
                    lines.append(f"{'  frozen prefix':<27} {self.prefix_offloaded_mb:13.1f}  (not counted: in host "
                                 "memory between caching passes)")
            if kind == "caches_and_inputs" and self.image_cache_mb:
                where = "on the device" if self.image_cache_on_device else "not counted: in host memory"
                lines.append(f"{'  LSkip image cache':<27} {self.image_cache_mb:13.1f}  ({where})")
        if self.caching_pass_mb:
            lines.append(f"{'steps':<27} {self.steps_mb:13.1f}")
            lines.append(f"{'LSkip caching pass':<27} {self.caching_pass_mb:13.1f}  (the image prefix weights "
                         "back on the device)")
        lines.append(f"{'total (peak)':<27} {self.total_mb:13.1f}  ({self.total_mb / 1024:.2f} GiB)")
        if self.host_mb:
            lines.append(f"{'host memory':<27} {self.host_mb:13.1f}")
        if self.device_memory_mb is not None:
            verdict = "fits" if self.fits else "does not fit"
            lines.append(f"{verdict} in {self.device_memory_mb / 1024:.1f} GiB; largest batch that fits: "
                         f"{self.largest_batch if self.largest_batch else 'none'}"
                         + (f"; smallest omega that fits at batch {self.batch_size}: "
                            f"{self.smallest_skip_layers if self.smallest_skip_layers is not None else 'none'}"
                            if self.skip_layers else ""))
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _resolve_step(step: str, device_type: str, class_subset: bool, batch: int, top_k: int) -> str:
    """The step kind a run gets (train/step.py choose_step, assuming the compiled ops are built)."""
    if step != "auto":
        return step
    if device_type != "cuda":
        return "eager"
    static = not class_subset or batch <= top_k
    return "graph" if static else "eager"


def plan_memory(model_name: str, mode: str = "skip", skip_layers: int | None = None, batch_size: int = 4,
                num_classes: int = 100, top_ratio: float = 0.5, max_top: int = 50, lam: float = 0.3,
                top_count: int | None = None,
                amp: str = "auto", device_type: str = "cuda", step: str = "auto",
                update_in_backward: str = "auto", shots: int = 16, cache_images: int | None = None,
                cache_budget_gb: float = 8.0, device_memory: float | str | None = None,
                depth: tuple[int, int] | None = None, seed: int = 1, template: str = "a photo of a {}.",
                probe_cache: str | Path | None = None, offload_prefix: bool = True,
                search: bool = True) -> MemoryPlan:
    """Predicted peak training memory of ``model_name`` (an open_clip name or ``hf:<folder>``)
    trained in ``mode`` with ω = ``skip_layers`` (None: the model's default), ``batch_size``
    images a step and ``num_classes`` classes (named as ``skipkernels bench`` names them).

    ``amp``: auto (bf16 on cuda, fp32 on cpu), bf16, fp16 or none. ``device_type``: the device
    trained on, cuda or cpu. ``step``: the Trainer's step kind (auto: graph on cuda where its
    conditions hold, assuming the compiled ops are built, else eager); ``update_in_backward``:
    auto (inside backward for the eager and compiled steps), on or off. ``cache_images``: images
    in the epoch's LSkip image cache (None: ``shots`` per class). ``device_memory``: bytes or a
    size such as "24GB": then the plan says whether the run fits, and the largest batch and
    smallest ω that would. ``depth``: (image, text) blocks instead of the model's own.
    ``probe_cache``: a JSON file keeping the probe steps between runs (``default_probe_cache()``
    is the command line's); None keeps them in this process only. ``offload_prefix``: on a GPU, the
    frozen prefix weights are in host memory during the steps and come back for each caching pass
    (SkipConfig.offload_prefix), so the peak is the larger of the steps' and a caching pass's.
    ``search``: with ``device_memory``, also find the largest batch and the smallest ω that fit."""
    from skipkernels.data.names import class_names
    from skipkernels.ops.class_select import check_cskip_params, draw_rank_mask, top_k_for
    from skipkernels.skip.modes import MODES, default_skip_layers, mode_plan
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be cuda or cpu, got {device_type!r}")
    amp = {None: "none"}.get(amp, amp)
    if amp == "auto":
        amp = "bf16" if device_type == "cuda" else "none"
    if amp not in _AMP:
        raise ValueError(f"amp must be auto, bf16, fp16 or none, got {amp!r}")
    for label, value in (("batch size", batch_size), ("number of classes", num_classes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
    counted = {} if top_count is None else {"top_count": top_count}
    check_cskip_params(top_ratio, max_top, lam, **counted)
    if step not in ("auto", "eager", "compiled", "graph"):
        raise ValueError(f"step must be auto, eager, compiled or graph, got {step!r}")
    if update_in_backward not in ("auto", "on", "off"):
        raise ValueError(f"update_in_backward must be auto, on or off, got {update_in_backward!r}")
    if step == "graph" and device_type != "cuda":
        raise ValueError("the graph step needs a CUDA device")
    if step == "graph" and update_in_backward == "on":
        raise ValueError("the graph step keeps the update after backward (update_in_backward on cannot run)")
    memory = parse_memory(device_memory) if isinstance(device_memory, str) else device_memory
    meta = _meta_model(model_name, depth)
    n_image, n_text = tower_depths(meta)
    plan = mode_plan(mode, 1)
    if plan.caches_prefix:
        low = min(n_image, n_text)
        if skip_layers is None:
            skip_layers = default_skip_layers(n_image, n_text)[0]  # the tuner's default
        if not isinstance(skip_layers, int) or not 1 <= skip_layers < low:
            raise ValueError(f"omega (skip_layers) must be in [1, {low}) for {model_name} (image tower {n_image} "
                             f"blocks, text tower {n_text}), got {skip_layers}")
    else:
        if skip_layers not in (None, 0):
            raise ValueError(f"mode {mode} caches nothing: omega (skip_layers) does not apply")
        skip_layers = 0
    cache_dtype = ("bfloat16" if device_type == "cuda" else "float32") if plan.caches_prefix else "float32"
    names = class_names(num_classes)
    # classes run per step: K' under CSkip's fixed rank mask (the seed's), else all
    rows = num_classes
    top_k = num_classes
    if plan.class_subset:
        top_k = top_k_for(num_classes, top_ratio, max_top, **counted)
        if top_k < num_classes:
            mask = draw_rank_mask(num_classes, top_k, lam, torch.Generator().manual_seed(seed))
            rows = top_k + int(mask.sum())
    notes = []
    common = dict(model_name=model_name, mode=mode, names=names, template=template, amp=amp,
                  cache_dtype=cache_dtype, device_type=device_type, step=step, update=update_in_backward,
                  class_subset=plan.class_subset, top_k=top_k, rows=rows, num_classes=num_classes,
                  cache_images=cache_images, shots=shots, budget=cache_budget_gb * 2 ** 30, depth=depth,
                  n_image=n_image, n_text=n_text, probe_cache=probe_cache, offload_prefix=offload_prefix,
                  memory=memory)
    result = _evaluate(batch=batch_size, skip_layers=skip_layers, **common)
    result.notes = notes
    if device_memory is not None:
        result.device_memory_mb = memory / MB
    if device_memory is not None and search:
        def total_for(batch):
            return _evaluate(batch=batch, skip_layers=skip_layers, **common).total_mb
        # past K images a batch the auto step on a GPU is no longer the graph (the update moves into
        # backward), so the total grows with the batch within each side of K, not across it
        split = top_k if step == "auto" and device_type == "cuda" and plan.class_subset else 0
        result.largest_batch = _largest_batch(total_for, result.device_memory_mb, split + 1) if split else None
        result.largest_batch = result.largest_batch or _largest_batch(total_for, result.device_memory_mb, 1,
                                                                      split or (1 << 16))
        if plan.caches_prefix:
            result.smallest_skip_layers = next(
                (w for w in range(1, min(n_image, n_text))
                 if _evaluate(batch=batch_size, skip_layers=w, **common).total_mb <= result.device_memory_mb), None)
    if device_type == "cuda":
        notes.append("activations are the CPU's step under the same autocast; a GPU's kernels (flash attention, "
                     "cuBLAS workspace) keep somewhat different tensors")
    if plan.class_subset and rows < num_classes:
        notes.append(f"CSkip runs K' = {rows} of {num_classes} classes a step (K = {top_k}, seed {seed}'s rank mask)")
    return result


def _largest_batch(total_for, limit_mb: float, first: int = 1, last: int = 1 << 16) -> int | None:
    """The largest batch in [first, last] whose total fits, the total growing with the batch there."""
    if first > last or total_for(first) > limit_mb:
        return None
    low, high = first, first * 2
    while high <= last and total_for(high) <= limit_mb:
        low, high = high, high * 2
    high = min(high, last + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if total_for(mid) <= limit_mb else (low, mid)
    return low


def _evaluate(*, model_name, mode, names, template, amp, cache_dtype, device_type, step, update, class_subset,
              top_k, rows, num_classes, cache_images, shots, budget, depth, n_image, n_text, batch,
              skip_layers, probe_cache, offload_prefix, memory=None) -> MemoryPlan:
    arguments = dict(locals())  # for the compiled step's plan below, on the same terms
    kind = _resolve_step(step, device_type, class_subset, batch, top_k)
    in_backward = {"on": True, "off": False}.get(update, kind != "graph")
    if kind == "graph":
        in_backward = False
    counts = _weight_counts(model_name, depth, mode, skip_layers)
    probe_names = _probe_names(model_name, depth, template, tuple(names))
    probe = _stored_probe(probe_cache, model_name, mode, amp, cache_dtype, in_backward, device_type == "cuda",
                          probe_names, template)
    element = torch.empty((), dtype=getattr(torch, cache_dtype)).element_size()
    caches_prefix = skip_layers > 0
    text_width = _text_width(model_name, depth)
    held = num_classes * probe.context_length * 8 + num_classes * 8  # class tokens, pool positions
    if mode == "coop":
        held += num_classes * probe.context_length * 8  # the prompts with CoOp's placeholders
    if caches_prefix:
        held += num_classes * probe.text_length_cache * text_width * element
        batch_inputs = batch * probe.image_tokens * probe.image_width * element
    else:
        batch_inputs = batch * 3 * probe.image_size ** 2 * 4
    if class_subset and rows < num_classes:
        held += num_classes * probe.embed_dim * 4  # CSkip's prototypes
    images = shots * num_classes if cache_images is None else cache_images
    image_cache = images * probe.image_tokens * probe.image_width * element if caches_prefix else 0
    on_device = cache_on_device(image_cache, device_type, budget)
    caches = held + batch_inputs + batch * 8 + (image_cache if on_device else 0)
    low_image, low_text = n_image - skip_layers, n_text - skip_layers  # suffix blocks run
    activations = probe.peak(batch, rows, extra_text_blocks=low_text - 3, extra_image_blocks=low_image - 3)
    offloaded = counts["offloadable"] if offload_prefix and device_type == "cuda" and caches_prefix else 0
    kinds = {"weights": counts["weights"] - offloaded, "gradients": 0 if in_backward else counts["trainable"],
             "optimizer_state": counts["trainable"], "caches_and_inputs": caches,
             "activations_and_workspace": activations}
    caching_pass = 0
    if offloaded:
        # the weights with the image prefix back (the text prefix, cached once at set-up, stays in
        # host memory), the momentum and the caches, plus one no-grad batch through a prefix block:
        # its input, output and the MLP's hidden activations (4x the width)
        caching_pass = counts["weights"] - counts["offloadable_text"] + counts["trainable"] + caches + 6 * batch_inputs
    if step == "auto" and kind == "graph" and memory is not None:
        # the Trainer's rule (train/step.py choose_step) on the same terms: the card less the weights
        # on it during the steps, the momentum and the caches (the image cache where it is on the device)
        left = memory - kinds["weights"] - kinds["optimizer_state"] - held - (image_cache if on_device else 0)
        short = graph_memory_unavailable(counts["trainable"], left)
        if short is not None:
            compiled = _evaluate(**{**arguments, "step": "compiled", "memory": None})
            compiled.step_reason = f"auto on this card: graph is possible, but {short}"
            return compiled
    return MemoryPlan(model=model_name, mode=mode, skip_layers=skip_layers, batch_size=batch,
                      num_classes=num_classes, classes_per_step=rows, amp=amp, device_type=device_type, step=kind,
                      update_in_backward=in_backward, kinds_mb={k: v / MB for k, v in kinds.items()},
                      trainable_weights_mb=counts["trainable"] / MB, image_cache_mb=image_cache / MB,
                      image_cache_on_device=on_device, prefix_offloaded_mb=offloaded / MB,
                      caching_pass_mb=caching_pass / MB)


@functools.lru_cache(maxsize=8)
def _text_width(model_name, depth) -> int:
    from skipkernels.families import model_towers
    text = model_towers(_meta_model(model_name, depth))[1]
    return int(text.token_embedding.weight.shape[1])


@functools.lru_cache(maxsize=16)
def _probe_names(model_name, depth, template, names: tuple) -> tuple:
    """The probe's class names: the longest prompts of the run's, so its text runs as many tokens."""
    meta = _meta_model(model_name, depth)
    tokenizer = _tokenizer_for(meta, _named_tokenizer(model_name))
    if len(names) < max(_PROBE_CLASSES):
        from skipkernels.data.names import class_names
        names = names + tuple(n for n in class_names(max(_PROBE_CLASSES) * 2) if n not in names)
    return tuple(_names_of_longest_prompts(tokenizer, template, list(names), max(_PROBE_CLASSES)))


@functools.lru_cache(maxsize=8)
def _named_tokenizer(model_name):
    from skipkernels.models import HF_PREFIX
    if model_name.startswith(HF_PREFIX):
        return None
    return _offline_tokenizer(model_name, _meta_model(model_name, None))


# ---------------------------------------------------------------------------------------------- measured
def measure_memory(model_name: str, mode: str = "skip", skip_layers: int | None = None, batch_size: int = 4,
                   num_classes: int = 100, depth: tuple[int, int] | None = None, update_in_backward: bool = True,
                   top_ratio: float = 0.5, max_top: int = 50, seed: int = 1,
                   template: str = "a photo of a {}.") -> dict:
    """The same kinds measured on this CPU (fp32, eager step, random weights): weights, gradients
    and momentum from the tensors held after a first step; caches and inputs from the CPU
    allocator over the tuner's set-up and the batch's preparation (less the weights created
    there); activations and workspace as the allocator's peak over the next step above the level
    before it. MB."""
    from skipkernels.data.names import class_names
    from skipkernels.patch import patch_clip
    from skipkernels.skip.tuner import SkipConfig, SkipTuner
    from skipkernels.train.memory import CpuAllocatorPeak
    from skipkernels.train.step import EagerStep
    model, tokenizer = build_model(model_name, "cpu", depth)
    model = patch_clip(model)
    tokenizer = _tokenizer_for(model, tokenizer)
    size = _image_size(model)
    before = _bytes([*model.parameters(), *model.buffers()])
    with CpuAllocatorPeak(keep_trace=True) as setup:
        config = SkipConfig(mode=mode, skip_layers=skip_layers, top_ratio=top_ratio, max_top=max_top, template=template)
        tuner = SkipTuner(model, class_names(num_classes), tokenizer, config, seed=seed)
        inputs, labels = _probe_inputs(tuner, batch_size, size, None)
    created = _bytes([*tuner.parameters(), *model.buffers()]) - before
    optimizer = torch.optim.SGD(tuner.parameter_groups(2e-5, 5e-6), lr=2e-5, momentum=0.9, weight_decay=5e-4)
    step = EagerStep(tuner, optimizer, None, update_in_backward=update_in_backward)
    with CpuAllocatorPeak():  # gradients and momentum created under the profiler: their frees are recorded later
        step(inputs, labels)
    params = [p for p in tuner.parameters()]
    weights = _bytes([*model.parameters(), *model.buffers()])
    grads = _bytes([p.grad for p in params if p.grad is not None])
    state = _bytes([v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)])
    with CpuAllocatorPeak() as probe:
        step(inputs, labels)
    return {"weights": weights / MB, "gradients": grads / MB, "optimizer_state": state / MB,
            "caches_and_inputs": (sum(n for _, n in setup.trace) - created) / MB,
            "activations_and_workspace": probe.peak_bytes / MB,
            "skip_layers": tuner.skip_layers, "classes_per_step": _classes_run(tuner)}


def _classes_run(tuner) -> int:
    skipper = tuner.skipper
    return skipper.fixed_size if skipper is not None and skipper.enabled else len(tuner.classnames)


# ---------------------------------------------------------------------------------------------- command line
def add_arguments(p) -> None:
    from skipkernels.flags import positive_int
    from skipkernels.skip.modes import MODES
    p.add_argument("model", help="an open_clip model name (e.g. ViT-B-16, ViT-bigG-14) or hf:<folder with a "
                                 "config.json>; built on the meta device, no weights are read")
    p.add_argument("--mode", default="skip", help=f"tuning mode: {', '.join(MODES)}")
    p.add_argument("--skip-layers", type=int, default=None, help="omega (default: half the blocks of the "
                                                                 "shallower tower)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per step")
    p.add_argument("--classes", type=positive_int, default=100, help="classes C")
    p.add_argument("--top-ratio", type=float, default=0.5, help="CSkip's r")
    p.add_argument("--top-count", type=positive_int, default=None, help="CSkip: K top-ranked classes, a count "
                                                                        "given instead of --top-ratio")
    p.add_argument("--max-top", type=int, default=50, help="CSkip: at most this many top-ranked classes")
    p.add_argument("--shots", type=positive_int, default=16, help="images per class in the LSkip image cache")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
                   help="autocast: auto is bf16 on cuda, fp32 on cpu")
    p.add_argument("--device-type", default="cuda", choices=("cuda", "cpu"), help="the device trained on")
    p.add_argument("--step", default="auto", choices=("auto", "eager", "compiled", "graph"),
                   help="the Trainer's step kind (auto: graph on cuda where it can run, else eager)")
    p.add_argument("--update-in-backward", default="auto", choices=("auto", "on", "off"),
                   help="SGD's update inside backward (auto: for the eager and compiled steps)")
    p.add_argument("--gpu-memory", default=None, help="the card's memory, e.g. 24GB or 80GiB: says whether the run "
                                                      "fits, and the largest batch and smallest omega that do")
    p.add_argument("--no-offload-prefix", dest="offload_prefix", action="store_false",
                   help="the frozen prefix weights stay on the device (SkipConfig.offload_prefix off)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--probe-cache", default=None, help="JSON file keeping the small probe steps between runs "
                                                       "(default: $SKIPKERNELS_CACHE/memory-plan-probes.json); "
                                                       "none: keep nothing")


def command(args) -> int:
    memory = parse_memory(args.gpu_memory) if args.gpu_memory is not None else None
    probe_cache = {None: default_probe_cache(), "none": None}.get(args.probe_cache, args.probe_cache)
    result = plan_memory(args.model, mode=args.mode, skip_layers=args.skip_layers, batch_size=args.batch_size,
                         num_classes=args.classes, top_ratio=args.top_ratio, max_top=args.max_top,
                         top_count=args.top_count, amp=args.amp,
                         device_type=args.device_type, step=args.step, update_in_backward=args.update_in_backward,
                         shots=args.shots, device_memory=memory, probe_cache=probe_cache,
                         offload_prefix=args.offload_prefix)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


def predicted_for_bench(scenario, runner, device) -> dict:
    """``skipkernels bench``'s memory entry for a mode: ``predicted_mb``, the plan's kinds for the
    run the bench measures (its one batch, no epoch image cache), beside ``breakdown_mb``; on a CPU,
    whose window starts above the weights and caches, ``predicted_peak_mb`` is the part it sees
    (gradients, optimizer state, activations). Modes the plan does not model say why instead."""
    mode = runner.mode
    if mode.paper or mode.compile_graphs:
        return {"predicted_mb": None, "predicted_note": "the paper's step and the compiled-graphs base are not planned"}
    try:
        result = plan_memory(scenario.model, mode=mode.tuner_mode, skip_layers=runner.tuner.skip_layers or None,
                             batch_size=scenario.batch, num_classes=scenario.classes, device_type=device.type,
                             step=runner.train_step.kind,
                             update_in_backward="on" if runner.update_choice.in_backward else "off",
                             cache_images=0, seed=0, offload_prefix=False,  # the bench's steps keep the prefix
                             probe_cache=default_probe_cache())  # a probe run once, not in every mode's process
    except (ValueError, TypeError, RuntimeError) as err:
        return {"predicted_mb": None, "predicted_note": str(err)}
    out = {"predicted_mb": result.kinds_mb}
    if device.type == "cpu":
        out["predicted_peak_mb"] = sum(result.kinds_mb[k] for k in
                                       ("gradients", "optimizer_state", "activations_and_workspace"))
    return out
