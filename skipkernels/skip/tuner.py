"""SkipTuner: Skip Tuning (LSkip + CSkip) of an open_clip CLIP model, and the baselines the
paper compares against, computed on one engine (docs/ARCHITECTURE.md, "The algorithm").

The modes and what each caches, runs and trains: ``skipkernels.skip.modes``. The tuner resolves
its mode once (``SkipTuner.plan``) and reads the plan, never the name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from skipkernels import _ext, checks
from skipkernels.families import model_towers, token_function
from skipkernels.ops import policy as policies
from skipkernels.ops.class_select import check_cskip_params, check_label_range
from skipkernels.ops.policy import resolve as resolve_policy
from skipkernels.ops.subset_ce import SUBSET_LOGITS_CE
from skipkernels.options import option, outside_stacklevel
from skipkernels.skip.towers import ModelPlan, model_plan, model_policy
from skipkernels.skip.cskip import RESAMPLE_MODES, ClassSkipper
from skipkernels.skip.lskip import PrefixOffload, TextPrefixCache, keep_token_count
from skipkernels.skip.modes import MODES, PET_MODES, ModePlan, mode_plan  # noqa: F401 - re-exported

CACHE_DTYPES = ("float32", "bfloat16", "float16", "float64")  # of the LSkip caches; None: see _cache_dtype
DEFAULT_TOP_RATIO = 0.5  # CSkip's r, the paper's


# Each field's option() is also its command-line flag (skipkernels.options, skipkernels.cli).
@dataclasses.dataclass
class SkipConfig:
    mode: str = option("skip", "skip (LSkip+CSkip), lskip, cskip, ft, coop, a PET method (vlpet-large, "
                       "vlpet-middle-x, vlpet-middle-y, vlpet-small, adapter, lora) or lskip-<PET method>",
                       choices=MODES)
    skip_layers: int | None = option(None, "omega: blocks [0, omega) of both towers are frozen and cached "
                                     "(default: half the blocks of the shallower tower, 6 for ViT-B/16)")
    top_ratio: float = option(DEFAULT_TOP_RATIO, "CSkip's r: K = min(ceil(r*C), max_top) top-ranked classes; "
                              "1.0 keeps every class (CSkip off); r > 1, a count, is the older spelling of top_count")
    top_count: int | None = option(None, "CSkip: K = min(top_count, C, max_top) top-ranked classes, a count given "
                                   "instead of top_ratio (default: none, top_ratio gives K)")
    max_top: int = option(50, "CSkip: at most this many top-ranked classes")
    lam: float = option(0.3, "CSkip: scale of the exponential keep-probability over lower ranks")
    resample: str = option("fixed", "CSkip: fixed, one rank mask per run (static K'); step, one per step",
                           choices=RESAMPLE_MODES)
    drop_ratio: float = option(0.0, "LSkip token dropping; the class token is never dropped")
    truncate_text: bool = option(True, "exact text truncation: text blocks run only up to the last pooled token")
    prune_last_block: bool = option(True, "exact last-block pruning: the final block computes only the pooled row")
    template: str = option("a photo of a {}.", "prompt template; {} is the class name")
    cache_dtype: str | None = option(None, "dtype of the LSkip caches (default: the model's dtype; for float32 models "
                                     "bfloat16 on GPU, float32 on CPU)",
                                     choices=CACHE_DTYPES)
    cache_budget_gb: float = option(8.0, "image cache on the GPU up to this size, else in pinned host memory",
                                    identity=False)  # where the cache lives, not what it holds
    # where frozen weights wait between caching passes, not what they hold
    offload_prefix: bool = option(True, "frozen prefix weights (blocks below omega, stems) in pinned host memory "
                                  "between LSkip caching passes (CUDA)", identity=False)
    coop_n_ctx: int = option(4, "CoOp: learned context vectors")
    coop_init: str = option("a photo of a", "CoOp: the words the context starts from, if that many tokens")

    def __post_init__(self):
        mode_plan(self.mode, self.skip_layers)  # validates the mode
        if self.resample not in RESAMPLE_MODES:
            raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {self.resample!r}")
        check_cskip_params(self.top_ratio, self.max_top, self.lam, self.top_count)
        if self.top_count is not None and self.top_ratio != DEFAULT_TOP_RATIO:
            raise ValueError(f"top_count={self.top_count} and top_ratio={self.top_ratio} both give CSkip's K: give "
                             "top_count for a number of classes or top_ratio for a share of them, not both")
        if self.top_ratio > 1:
            count = math.ceil(self.top_ratio)
            warnings.warn(f"top_ratio={self.top_ratio} above 1 is a count of classes: use top_count={count}, which "
                          "keeps the same classes (a later version reads top_ratio only as a share)", FutureWarning,
                          stacklevel=outside_stacklevel())
        keep_token_count(2, self.drop_ratio)  # validates the range
        if "{}" not in self.template:
            raise ValueError(f"template must contain '{{}}' for the class name, got {self.template!r}")
        if self.cache_dtype not in (None, *CACHE_DTYPES):
            raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES} or None, got {self.cache_dtype!r}")
        if self.coop_n_ctx < 1:
            raise ValueError(f"coop_n_ctx must be >= 1, got {self.coop_n_ctx}")

    @staticmethod
    def canonical_identity(values: dict) -> dict:
        """The identity fields ``values`` as a run's identity records them (``options.identity_values``).
        top_count=T and the older top_ratio=T (T >= 2, a count) keep the same K classes and draw the
        same rank mask: one run, so they are one identity, recorded the older way (top_count left
        out while None). Run folders trained before top_count existed thus resume under either
        spelling. T = 1 has no older spelling (top_ratio=1.0 keeps every class) and stays apart, as
        does a count written as a fraction (top_ratio=2.5 keeps 3 classes but is recorded as 2.5)."""
        values = dict(values)
        count = values.pop("top_count", None)
        if count is not None and count >= 2:
            values["top_ratio"] = float(count)
        elif count is not None:
            values["top_count"] = count
        return values

    @property
    def plan(self) -> ModePlan:
        """What this mode caches, which classes it runs and what it trains."""
        return mode_plan(self.mode, self.skip_layers)

    @property
    def pet_method(self) -> str | None:
        return self.plan.pet_method


def exact_savings(towers: ModelPlan, config: SkipConfig) -> dict:
    """Each exact saving: "on", or "off (why)" where the config turns it off or it would not be exact
    for this model (e.g. SigLIP's bidirectional text pooled at the last position, 'map' pooling).
    ``towers``: the model's plan (``ModelPlan(model)``)."""
    checks = {
        "text truncation": (config.truncate_text, towers.text.truncation_off_reason),
        "image last-block pruning": (config.prune_last_block, towers.image.pruning_off_reason),
        "text last-block pruning": (config.prune_last_block, towers.text.pruning_off_reason),
    }
    out = {}
    for name, (wanted, off_reason) in checks.items():
        reason = off_reason() if wanted else "turned off in the config"
        out[name] = "on" if reason is None else f"off ({reason})"
    return out


def check_tokens(text, tokens) -> None:
    """The tokenizer must fit the model (``text``: its ``TextPlan``): ids inside its vocabulary,
    length its context."""
    embedding = text.token_embedding
    context = text.context_length
    if tokens.shape[1] > context:
        raise ValueError(f"the tokenizer makes sequences of {tokens.shape[1]} tokens but the model's text context "
                         f"is {context}: create it with context_length={context}")
    if tokens.numel() and int(tokens.max()) >= embedding.num_embeddings:
        raise ValueError(f"the tokenizer makes token id {int(tokens.max())} but the model's vocabulary has "
                         f"{embedding.num_embeddings} tokens: use the model's own tokenizer")


def config_with_overrides(config: SkipConfig | None, overrides: dict) -> SkipConfig:
    """The tuner's one config. Keyword overrides of its fields still work, with a FutureWarning
    that names the SkipConfig spelling."""
    if config is not None and not isinstance(config, SkipConfig):
        raise TypeError(f"config must be a SkipConfig, got {type(config).__name__}")
    if not overrides:
        return config if config is not None else SkipConfig()
    fields = {f.name for f in dataclasses.fields(SkipConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"SkipTuner got unexpected keyword arguments {unknown}: the SkipConfig fields are "
                        f"{sorted(fields)}")
    given = ", ".join(f"{name}={value!r}" for name, value in overrides.items())
    spelling = f"SkipConfig({given})" if config is None else f"dataclasses.replace(config, {given})"
    warnings.warn(f"SkipTuner(..., {given}) is deprecated: pass config={spelling}", FutureWarning,
                  stacklevel=outside_stacklevel())
    return SkipConfig(**overrides) if config is None else dataclasses.replace(config, **overrides)


def check_class_list(classnames: list[str]) -> None:
    """At least one class, each a non-empty string, no two the same."""
    if not classnames:
        raise ValueError("classnames is empty: SkipTuner needs at least one class")
    if any(not isinstance(c, str) or not c.strip() for c in classnames):
        raise ValueError("every class name must be a non-empty string")
    if len(set(classnames)) != len(classnames):
        duplicates = sorted({c for c in classnames if classnames.count(c) > 1})
        raise ValueError(f"duplicated class names make classes indistinguishable: {duplicates[:5]}")


class _PrefixBack:
    """A model's state_dict / load_state_dict pre-hook: its tuner's offloaded prefix weights back on
    the device first. It holds the tuner weakly; a pickled or copied model gets an inert one."""

    def __init__(self, tuner):
        self.tuner = weakref.ref(tuner)

    def __call__(self, *_):
        tuner = self.tuner() if self.tuner is not None else None
        if tuner is not None:
            tuner.restore_prefix()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.tuner = None


class PromptLearner(nn.Module):
    """CoOp's shared context: ``n_ctx`` learned vectors replacing placeholder tokens 1..n_ctx."""

    def __init__(self, text, tokenizer, n_ctx: int, init: str | None):
        """``text``: the model's ``TextPlan``."""
        super().__init__()
        embedding = text.token_embedding
        width = embedding.weight.shape[1]
        ctx = torch.empty(n_ctx, width).normal_(std=0.02)
        if init:
            init_tokens = tokenizer([init])[0].to(embedding.weight.device)
            n_init = int(text.pool_index(init_tokens[None])[0]) - 1  # words between SOT and EOT
            if n_init == n_ctx:
                with torch.no_grad():
                    ctx = embedding(init_tokens[1:1 + n_ctx]).float().cpu()
        self.ctx = nn.Parameter(ctx)
        self.n_ctx = n_ctx
        self.tokenizer = tokenizer

    def prompts(self, classnames: list[str]):
        placeholder = " ".join(["X"] * self.n_ctx)
        return self.tokenizer([f"{placeholder} {name}." for name in classnames])

    def embeddings(self, text, tokens):
        emb = text.token_embedding(tokens)
        ctx = self.ctx.to(emb.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return torch.cat([emb[:, :1], ctx, emb[:, 1 + self.n_ctx:]], dim=1)


class SkipTuner(nn.Module):
    """Fine-tunes ``model`` on ``classnames`` with Skip Tuning or one of the baselines.

    ``tuner.loss(inputs, labels)`` is one training step's loss: ``inputs`` are the cached tokens at
    block ω from ``tuner.image_prefix`` (modes whose ``plan.caches_prefix``) or images (other modes).
    ``tuner.plan`` is the mode resolved once: what is cached, which classes run, what trains.
    """

    def __init__(self, model, classnames, tokenizer, config: SkipConfig | None = None, *, policy=None,
                 seed: int = 0, **overrides):
        """``config``: what to tune and how (None: ``SkipConfig()``); keyword overrides of its fields
        still work but are deprecated. ``policy``: the KernelPolicy (or backend name) of every op the
        tuner runs; None: the one ``patch_clip`` gave the model, else the ambient policy at each
        call. ``seed``: CSkip's random rank mask; ``finetune`` passes its run's one seed
        (``TrainConfig.seed``)."""
        super().__init__()
        checks.check_model("model", model)
        classnames = checks.check_classnames("classnames", classnames)
        checks.check_tokenizer(tokenizer)
        config = config_with_overrides(config, overrides)
        if policy is not None:
            resolve_policy(policy)
        _ext.load()  # the compiled ops' first use (may compile them once), before any torch.compile trace
        self.policy = policy if policy is not None else model_policy(model)
        # The plan of both towers, built once (again when PET modules change): every step runs it.
        # Clear errors for unsupported models, towers and text masks.
        self.towers = model_plan(model, self.policy)  # the one plan the model holds
        self.config, self.skip_layers_reason = self._resolve_skip_layers(config)
        self.plan = self.config.plan
        self.skip_layers = self.plan.skip_layers
        self._check_model_fits()
        check_class_list(classnames)
        self.model = model
        self.classnames = classnames
        if self.plan.caches_prefix:
            self.towers.check_skip_layers(self.skip_layers)
        self.prefix_offload = {}  # nothing off the device during set-up (_set_up_prefix_offload)
        self._weights_back = None  # the state_dict hooks that bring offloaded weights back, once set up
        self._set_up_precision()
        self._set_up_prompts(tokenizer)
        self._set_trainable()
        self._set_up_savings()
        self._set_up_text_cache_and_cskip(seed)
        self.bind_ops()
        self._set_up_prefix_offload()

    def bind_ops(self) -> None:
        """Bind the step's own ops (the loss, CSkip's selection) under the tuner's policy; the
        blocks' ops are bound by the tower plans (``self.towers``)."""
        self.bound_policy = policies.resolve(self.policy)
        self.subset_logits_ce = SUBSET_LOGITS_CE.bind(self.bound_policy)
        if self.skipper is not None:
            self.skipper.bind(self.bound_policy)

    # ------------------------------------------------------------------ set-up, in the order __init__ runs it
    def _resolve_skip_layers(self, config: SkipConfig) -> tuple[SkipConfig, str]:
        """The config with ω resolved, and why it is that ω. None in the config means the model's
        default, resolved here once. One number: the plan's (0 in a mode that caches nothing),
        which tuner.config and tuner.skip_layers repeat."""
        reason = "given"
        if config.skip_layers is None and mode_plan(config.mode, 1).caches_prefix:
            omega, reason = self.towers.default_skip_layers()
            config = dataclasses.replace(config, skip_layers=omega)
        return dataclasses.replace(config, skip_layers=config.plan.skip_layers), reason

    def _check_model_fits(self) -> None:
        """Refuse a mode this model's towers cannot run as configured."""
        image_tower, text_tower = self.towers.image.tower, self.towers.text.tower
        if self.plan.pet_method is not None:
            from skipkernels.pet.layouts import attaches_in_forward
            foreign = {type(b).__name__ for t in (image_tower, text_tower) for b in t.blocks
                       if not attaches_in_forward(b)}
            if foreign:  # apply_pet would silently leave those blocks without modules
                raise ValueError(f"PET methods attach to open_clip's transformer blocks; this model's "
                                 f"{', '.join(sorted(foreign))} blocks would get none")
        if self.config.drop_ratio > 0 and image_tower.token_dropping_off_reason() is not None:
            raise ValueError(f"drop_ratio > 0 is not possible for this model: {image_tower.token_dropping_off_reason()}")

    def _set_up_precision(self) -> None:
        """Where the tuner runs, its compute dtype and the dtype of the LSkip caches."""
        self.device = next(self.model.parameters()).device
        self.token_width = checks.token_width(self.model)  # the last dim of a cached prefix
        # The model's compute dtype (bf16, fp16, fp32 or fp64 weights): the cached prefix re-enters
        # the suffix blocks in it, whatever the cache's dtype.
        self.dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        self.cache_dtype = self._cache_dtype()

    def _cache_dtype(self) -> torch.dtype:
        name = self.config.cache_dtype
        if name is None and self.dtype != torch.float32:
            return self.dtype  # a bf16 / fp16 / fp64 model: its own dtype
        if name is None:  # fp32 weights: on GPUs the bf16 cache halves its bytes (autocast runs bf16 anyway)
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return getattr(torch, name)

    def _set_up_prompts(self, tokenizer) -> None:
        """The tokenizer, the class prompts tokenised once (the prefix cache, the prototypes, the
        steps and ``encode_classes`` of these classes reuse them) and CoOp's prompt learner."""
        # a Hugging Face tokenizer or processor is called with padding to the context
        self.tokenizer = tokenizer = token_function(tokenizer, self.towers.text.context_length)
        self.class_tokens = tokenizer([self.config.template.format(c) for c in self.classnames]).to(self.device)
        check_tokens(self.towers.text, self.class_tokens)
        self.prompt_learner = None
        if self.plan.trains == "prompt":
            self.prompt_learner = PromptLearner(self.towers.text, tokenizer, self.config.coop_n_ctx,
                                                self.config.coop_init).to(self.device)

    def _set_trainable(self) -> None:
        """Freezes the model but for what ``plan.trains``: all, suffix, prompt (only the prompt
        learner's context) or pet (the PET method's modules, added here)."""
        model, plan = self.model, self.plan
        self.pet = None
        if plan.trains == "pet":
            from skipkernels.pet import apply_pet, trainable_modules_for_mode
            # apply_pet freezes everything but its modules; they go only in blocks >= skip_layers
            self.pet = apply_pet(model, trainable_modules_for_mode(plan.pet_method, skip_layers=plan.skip_layers))
            return
        for p in model.parameters():
            p.requires_grad_(False)
        if plan.trains == "prompt":
            return  # only the prompt learner's context trains
        if plan.trains == "all":
            for p in model.parameters():
                p.requires_grad_(True)
        elif plan.trains == "suffix":  # blocks [skip_layers, L) and the heads (norm, pooling, projection)
            for tower in model_towers(model):
                for p in [*tower.blocks[plan.skip_layers:].parameters(), *tower.head_parameters()]:
                    p.requires_grad_(True)
        else:
            raise ValueError(f"_set_trainable does not set up {plan.trains!r}")
        # logit_scale (and a SigLIP bias, which CE ignores) stay frozen in every mode
        model.logit_scale.requires_grad_(False)
        if getattr(model, "logit_bias", None) is not None:
            model.logit_bias.requires_grad_(False)

    def _set_up_savings(self) -> None:
        """The exact savings the steps use, and the prompts a step runs when it runs them all."""
        # after PET: its modules decide where last-block pruning stays exact
        self.savings = exact_savings(self.towers, self.config)
        self.truncate_text = self.savings["text truncation"] == "on"
        self.prune_image = self.savings["image last-block pruning"] == "on"
        self.prune_text = self.savings["text last-block pruning"] == "on"
        # The prompts every step runs when it runs them all (ft, coop), and how many of their
        # tokens it runs: known now, so no step reads the pool positions back from the device.
        self.step_tokens = self.class_tokens
        if self.prompt_learner is not None:
            self.step_tokens = self.prompt_learner.prompts(self.classnames).to(self.device)
        self.step_length = self.towers.text.length(self.step_tokens, self.truncate_text)

    @torch.no_grad()
    def _set_up_text_cache_and_cskip(self, seed: int) -> None:
        """LSkip's text prefix cache and CSkip's class skipper, whose prototypes are the zero-shot
        text features of the pretrained model, computed once before any update."""
        was_training = self.model.training
        self.model.eval()
        self.text_cache = None
        prototypes = None
        if self.plan.caches_prefix:
            chunks = []

            def prototypes_from(x, pool_index):
                # Each chunk of prompts goes on from block omega in the compute dtype: the cache
                # may hold a lower precision, which the prototypes must not see.
                chunks.append(self.towers.text.encode_from(x, self.skip_layers, pool_index, self.prune_text))

            self.text_cache = TextPrefixCache(self.towers.text, self.class_tokens, self.skip_layers, self.cache_dtype,
                                              truncate=self.truncate_text,
                                              each_chunk=prototypes_from if self.plan.class_subset else None)
            if chunks:
                prototypes = F.normalize(torch.cat(chunks), dim=-1)
        elif self.plan.class_subset:
            prototypes = self.encode_classes(self.classnames, normalize=True)
        self.skipper = None
        if self.plan.class_subset:
            self.skipper = ClassSkipper(prototypes, self.config.top_ratio, self.config.max_top, self.config.lam,
                                        self.config.resample, seed=seed, policy=self.policy,
                                        top_count=self.config.top_count)
        self.model.train(was_training)

    def _set_up_prefix_offload(self, force: bool = False) -> None:
        """The frozen weights that only LSkip's caching passes read, per tower (``PrefixOffload``):
        the parameters of blocks [0, omega) and of the stem (image: patch embedding, class and
        position embeddings, pre-norm; text: token and position embeddings). The trainer moves them to pinned host
        memory after each caching pass and back for the next (``offload_prefix``,
        ``restore_prefix``). ``force``: also where the device is the CPU, the host copy then a
        second CPU tensor (tests of the data path)."""
        if getattr(self, "prefix_offload", None):
            self.restore_prefix()  # set up again: from the weights on the device
        self.prefix_offload = {}
        reason = None
        if not self.plan.caches_prefix:
            reason = f"nothing is cached in mode {self.config.mode}"
        elif not self.config.offload_prefix:
            reason = "turned off in the config"
        elif self.device.type != "cuda" and not force:
            reason = f"on {self.device.type} the host is the device"
        if reason is not None:
            self.prefix_offload_state = f"off ({reason})"
            return
        omega = self.skip_layers
        image, text = self.towers.image, self.towers.text
        # Weights the steps read stay: the suffix blocks, the heads, whatever shares their storage.
        steps_read = [t for plan in (image, text) for block in plan.blocks[omega:]
                      for t in (*block.parameters(), *block.buffers())]
        steps_read += [*image.tower.head_parameters(), *text.tower.head_parameters()]
        in_blocks = {id(p) for block in image.blocks for p in block.parameters()}
        in_blocks |= {id(p) for p in image.tower.head_parameters()}
        image_stem = [p for p in image.tower.parameters() if id(p) not in in_blocks]
        text_stem = [*text.token_embedding.parameters()]
        if isinstance(text.tower.positional_embedding, nn.Parameter):
            text_stem.append(text.tower.positional_embedding)
        # Parameters only: buffers are a few constants (masks, position ids, rotary tables) that
        # DistributedDataParallel may broadcast at a step and suffix blocks may share.
        parts = {"image": image_stem + [p for block in image.blocks[:omega] for p in block.parameters()],
                 "text": text_stem + [p for block in text.blocks[:omega] for p in block.parameters()]}
        candidates = {id(t) for tensors in parts.values() for t in tensors}
        others = [t for t in (*self.parameters(), *self.buffers()) if id(t) not in candidates] + steps_read
        kept = {t.untyped_storage().data_ptr() for t in others}
        pin = self.device.type == "cuda"
        for name, tensors in parts.items():
            frozen = [t for t in tensors if not t.requires_grad and t.untyped_storage().data_ptr() not in kept]
            self.prefix_offload[name] = PrefixOffload(frozen, pin)
        total = sum(part.nbytes for part in self.prefix_offload.values())
        where = "pinned host memory" if pin else "a host copy"
        self.prefix_offload_state = f"on ({total / 2**20:.1f} MiB of frozen prefix weights in {where} between " \
                                    "caching passes)"
        if self._weights_back is None:
            # model.state_dict() and model.load_state_dict() bring offloaded weights back first
            back = _PrefixBack(self)
            self._weights_back = back
            self.model.register_state_dict_pre_hook(back)
            self.model.register_load_state_dict_pre_hook(back)

    @property
    def prefix_offloaded(self) -> bool:
        """Whether frozen prefix weights are off the device now (``offload_prefix``)."""
        return any(part.offloaded for part in self.prefix_offload.values())

    def offload_prefix(self) -> None:
        """The frozen prefix weights of both towers to host memory until ``restore_prefix``:
        the steps of an LSkip mode run from the caches and never read them. Nothing where
        offloading is off (``prefix_offload_state`` says why)."""
        for part in self.prefix_offload.values():
            part.offload()

    def restore_prefix(self, tower: str | None = None) -> None:
        """The frozen prefix weights of ``tower`` ("image", "text"; None: both) back on the device."""
        for name, part in self.prefix_offload.items():
            if tower in (None, name):
                part.restore()

    @contextlib.contextmanager
    def prefix_on_device(self, tower: str | None = None):
        """The frozen prefix weights on the device inside the block (evaluation, export), and
        back off it after where they were off before."""
        were_off = [part for name, part in self.prefix_offload.items() if part.offloaded and tower in (None, name)]
        for part in were_off:
            part.restore()
        try:
            yield
        finally:
            for part in were_off:
                part.offload()
    
    def trainable_named_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def parameter_groups(self, lr: float, lr_image: float | None = None, weight_decay: float = 5e-4):
        """SGD groups: the image tower at ``lr_image`` (the paper's 5e-6), the rest at ``lr``."""
        checks.check_positive("lr", lr)
        if lr_image is not None:
            checks.check_positive("lr_image", lr_image)
        checks.check_positive("weight_decay", weight_decay, allow_zero=True)
        image, other = [], []
        in_image = {id(p) for p in self.towers.image.tower.parameters()}
        for _, p in self.trainable_named_parameters():
            (image if id(p) in in_image else other).append(p)
        groups = []
        if image:
            groups.append({"params": image, "lr": lr if lr_image is None else lr_image,
                           "weight_decay": weight_decay, "name": "image"})
        if other:
            groups.append({"params": other, "lr": lr, "weight_decay": weight_decay, "name": "text"})
        return groups

    # ------------------------------------------------------------------ encoders
    def image_prefix(self, images):
        """Frozen prefix of the image tower: tokens entering block ω = ``skip_layers`` (no autograd)."""
        checks.check_images("images", images, self.model)
        self.restore_prefix("image")
        with torch.no_grad():
            image = self.towers.image
            return image.blocks_between(image.stem(images), 0, self.skip_layers)

    def encode_images(self, images, normalize: bool = False):
        """Image features of the current model (the whole tower; last block pruned when exact)."""
        checks.check_images("images", images, self.model)
        self.restore_prefix("image")
        f = self.towers.image.encode(images, self.prune_image)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_classes(self, classnames, normalize: bool = False, batch_size: int = 256):
        """Text features of any class list with the current model (CoOp: with the learned context)."""
        classnames = checks.check_classnames("classnames", classnames)
        checks.check_positive("batch_size", batch_size, integer=True)
        if not classnames:
            raise ValueError("classnames is empty: give at least one class")
        self.restore_prefix("text")
        tuner_classes = classnames == self.classnames  # their prompts are tokenised already
        outs = []
        for start in range(0, len(classnames), batch_size):
            names = classnames[start:start + batch_size]
            if self.prompt_learner is not None:
                tokens = self.prompt_learner.prompts(names).to(self.device)
                embeddings = self.prompt_learner.embeddings(self.towers.text, tokens)
            elif tuner_classes:
                tokens, embeddings = self.class_tokens[start:start + batch_size], None
            else:
                tokens = self.tokenizer([self.config.template.format(c) for c in names]).to(self.device)
                embeddings = None
            outs.append(self._encode_tokens(tokens, embeddings))
        t = torch.cat(outs)
        return F.normalize(t, dim=-1) if normalize else t

    def _encode_tokens(self, tokens, embeddings=None, length: int | None = None):
        return self.towers.text.encode(tokens, embeddings, self.truncate_text, self.prune_text, length)

    # ------------------------------------------------------------------ one step
    def image_features_for_step(self, inputs):
        if self.plan.trains == "prompt":  # the image tower is frozen: no graph through it
            with torch.no_grad():
                return self.encode_images(inputs)
        if self.plan.caches_prefix:
            # The cache may be bf16; the residual stream runs in the model's dtype (fp32 weights: fp32,
            # as in open_clip under autocast).
            return self.towers.image.encode_from(inputs.to(self.dtype), self.skip_layers, self.prune_image)
        return self.encode_images(inputs)

    def text_features_for_step(self, selected, static: bool = False):
        plan = self.plan
        if plan.trains == "prompt":
            tokens = self.step_tokens
            embeddings = self.prompt_learner.embeddings(self.towers.text, tokens)
            return self._encode_tokens(tokens, embeddings, self.step_length)
        if plan.caches_prefix:
            # static: truncate to the longest prompt of all classes (known at set-up), so the step
            # needs no host copy of the selection; otherwise to the longest selected prompt.
            dynamic = selected is not None and self.truncate_text and not static
            selected_host = selected.cpu() if dynamic else None
            x, pool_index = self.text_cache.gather(selected, selected_host)
            return self.towers.text.encode_from(x.to(self.dtype), self.skip_layers, pool_index, self.prune_text)
        if selected is None:
            return self._encode_tokens(self.step_tokens, length=self.step_length)
        return self._encode_tokens(self.class_tokens[selected])

    def loss(self, inputs, labels, static: bool = False):
        """Cross-entropy of one batch over the step's class subset.

        ``static=True`` makes the step free of host synchronisation (for CUDA-graph capture): labels
        are not range-checked here (check them before copying them in), the class subset has its
        fixed size and text is truncated to the longest prompt of all classes.
        """
        # shapes and dtypes (metadata only: also on the static path), then the label range, which
        # reads values (off the static path: check host labels before copying them in)
        if self.plan.caches_prefix:
            checks.check_prefix("inputs", inputs, self.token_width, self.device)
        else:
            checks.check_images("inputs", inputs, self.model)
        checks.check_labels("labels", labels, inputs.shape[0])
        if not static:
            self.check_labels(labels)  # before the copy: host labels need no device sync
        labels = labels.to(self.device)
        if self.policy is None and self.bound_policy is not policies.current_policy():
            self.bind_ops()  # the ambient policy changed (use_policy)
        f = self.image_features_for_step(inputs)
        selected, targets = None, labels
        if self.skipper is not None:
            selected, targets = self.skipper.select(f, labels, check=False)
        t = self.text_features_for_step(selected, static)
        self.last_selected = selected if selected is not None else torch.arange(len(self.classnames), device=self.device)
        self.last_labels = targets
        scale = self.model.logit_scale.detach().exp().reshape(())
        # A SigLIP model's logits are scale * cos + logit_bias; the bias is one scalar added to every
        # logit, which cross-entropy over the subset cancels, so the loss equals CE of the model's own
        # logits (get_logits) over the subset without adding it.
        return self.subset_logits_ce(f, t, scale, targets)

    def __repr__(self) -> str:
        # A summary: nn.Module's repr would print the whole model after it (print(tuner.model) does that).
        return f"{type(self).__name__}(\n  " + self.extra_repr().replace("\n", "\n  ") + "\n)"

    def extra_repr(self) -> str:
        cfg = self.config
        why = self.skip_layers_reason if self.plan.caches_prefix else f"nothing is cached in mode {cfg.mode}"
        lines = [f"mode={cfg.mode}, omega {self.skip_layers} ({why}), classes={len(self.classnames)}"]
        lines += [f"{name}: {state}" for name, state in self.savings.items()]
        lines.append(f"prefix weights off the device between caching passes: {self.prefix_offload_state}")
        if self.skipper is not None:
            lines.append(self.skipper.describe())
        lines.append(f"kernel policy: {self.bound_policy.backend}" + (
            f" (table {self.bound_policy.table})" if self.bound_policy.table else ""))
        lines.append(self.towers.describe())
        return "\n".join(lines)

    def check_labels(self, labels) -> None:
        check_label_range(labels, len(self.classnames))

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict:
        return {"skipper": self.skipper.state_dict() if self.skipper is not None else None}

    def load_extra_state(self, state: dict) -> None:
        if self.skipper is not None and state.get("skipper") is not None:
            self.skipper.load_state_dict(state["skipper"])
