"""One transformer block, computed through the op layer: ``BlockPlan``, the one route through a block.

The op layer knows no model class. It computes any pre-norm block given by its parts by role
(``BlockParts``: norms, the packed q/k/v projection, the out projection, the MLP's projections and
activation, LayerScales, qk-norms, a head scale), which an adapter (``skipkernels.adapters``)
reports for the blocks of its ecosystem (``register_block_reader``). A block no adapter reads, or
one it reads with a reason (e.g. scaled-cosine attention, Eva's rotary blocks), runs its own
forward (``skipkernels.skip.towers``); ``unsupported_reason`` says why.

A ``BlockPlan`` is built once per block and policy: the block's parts by role, its PET hooks, its
activation, and the op each sub-layer runs, bound under the policy (``Op.bind``). Plain, patched,
PET and LSkip blocks all run ``BlockPlan.forward``. Parameter-efficient modules come in as
explicit ``BlockHooks`` (``skipkernels.pet.hooks`` builds them): a sub-layer hook replaces that
sub-layer's residual add, a LoRA hook adds its low-rank path to a projection's output. LoRA on a
weight the block reads as a tensor (a packed in-projection) needs no hook: the weight itself reads
W + ΔW, which is why the plan keeps the modules that own the weights and reads the weights at
each call, never the tensors themselves.

``query_index`` (B,) turns on last-block pruning: only the rows at those token positions (the
pooled CLS / EOT token) get a query, a residual and an MLP; keys and values still come from
every token, and under ``causal`` the row at position p sees keys 0..p, as in the full block.
Pruning is exact with hooks that treat every token row on its own (``BlockHooks.row_wise``).
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch
import torch.nn as nn

from skipkernels.ops import policy as policies
from skipkernels.ops.attention import ATTENTION
from skipkernels.ops.layer_norm import LAYER_NORM
from skipkernels.ops.layer_norm_linear import LAYER_NORM_LINEAR
from skipkernels.ops.layer_norm_mlp import LAYER_NORM_MLP
from skipkernels.ops.linear import LINEAR_ACT, LINEAR_RESIDUAL, activation_reference
from skipkernels.ops.op import runs
from skipkernels.ops.pet_gate import GATED_UPDATE
from skipkernels.ops.working_copies import read_through


def _is_identity(module) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _plain_layer_norm(module) -> bool:
    return isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1


class BlockHooks(NamedTuple):
    """Parameter-efficient modules' changes to a block, applied by ``BlockPlan.forward``.

    attn, mlp: ``hook(x, h, gate_op) -> x'`` replacing that sub-layer's residual add ``x + h``; h is
        the whole branch output (after the post-attention norm and LayerScale); ``gate_op`` is the
        VL-PET gated update (``ops.pet_gate``) bound under the plan's policy. None: ``x + h``.
    lora: role ("out", "fc1", "fc2") -> module whose output on the projection's input is added
        to the projection's output (LoRA on projections the block calls as modules).
    row_wise: every hook treats each token row on its own, so last-block pruning stays exact.
    """
    attn: Callable | None = None
    mlp: Callable | None = None
    lora: Mapping[str, nn.Module] = {}
    row_wise: bool = True


NO_HOOKS = BlockHooks()


class BlockParts(NamedTuple):
    """A pre-norm block by role: x += ls_1(ln_attn(out(ln_inner(attention(ln_1(x)))))), then
    x += ls_2(fc2(mlp_ln(act(fc1(ln_2(x)))))). The projections are given by the module that owns
    their weight and bias (``qkv``: e.g. an attention module with a packed ``in_proj_weight``, a
    packed Linear, or ``PackedProjections``), read at each call. An adapter
    (``skipkernels.adapters``) reports them for the blocks of its ecosystem.

    act_name: the op layer's name of ``act`` (``ACTIVATIONS``), or None: ``act`` runs as a module.
    calling: the signature of the block's own forward, which a routed block keeps: "x" (x, then
        an optional mask positionally or as ``attn_mask``, ``is_causal``) or "hidden_states"
        (hidden_states, attention_mask, ..., ``is_causal``).
    """
    ln_1: nn.Module
    qkv: nn.Module
    qkv_names: tuple[str, str]
    out: nn.Module
    heads: int
    dropout_p: float
    ln_q: nn.Module | None
    ln_k: nn.Module | None
    attn: nn.Module | None  # the module holding a per-head ``head_scale``, or None
    ln_inner: nn.Module | None
    ln_attn: nn.Module | None
    ls_1: nn.Module | None
    ln_2: nn.Module
    fc1: nn.Linear
    act: nn.Module
    mlp_ln: nn.Module | None
    fc2: nn.Linear
    ls_2: nn.Module | None
    act_name: str | None = None
    calling: str = "x"


class PackedProjections:
    """Separate q, k, v projections read as one packed (3D, D) projection, as the block computes
    them in one GEMM; the weights are read (and concatenated) at each call."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear):
        self.projections = (q, k, v)

    @property
    def weight(self):
        return torch.cat([p.weight for p in self.projections])

    @property
    def bias(self):
        biases = [p.bias for p in self.projections]
        return None if any(b is None for b in biases) else torch.cat(biases)


# How blocks are read: each adapter registers a reader, ``reader(block) -> BlockParts`` (the op
# layer computes it), a str (why it cannot), or None (not a block of that adapter's ecosystem).
_BLOCK_READERS: list[Callable] = []


def register_block_reader(reader: Callable) -> None:
    _BLOCK_READERS.append(reader)


def read_block(block) -> "BlockParts | str":
    """The parts of ``block`` by role, or why the op layer does not compute it."""
    for reader in _BLOCK_READERS:
        found = reader(block)
        if found is not None:
            return found
    return f"{type(block).__name__} is not a block the op layer computes (no adapter reads it)"


def unsupported_reason(block) -> str | None:
    """Why the op layer cannot compute ``block`` (it then runs its own forward), or None."""
    found = read_block(block)
    return found if isinstance(found, str) else None


def block_parts(block) -> BlockParts:
    """The parts of ``block`` (a ValueError naming why the op layer does not compute it)."""
    found = read_block(block)
    if isinstance(found, str):
        raise ValueError(f"the op layer does not compute this block: {found}")
    return found


def _gamma_owner(module):
    """The LayerScale module whose ``gamma`` scales a branch, or None for an identity."""
    if _is_identity(module):
        return None
    if getattr(module, "gamma", None) is None:
        raise TypeError(f"unsupported layer-scale module {type(module).__name__}")
    return module


class BlockPlan:
    """One block under one policy, decided once (see the module docstring).

    ``forward(x, causal=False, attn_mask=None, query_index=None)``: x (B, L, D) -> (B, L, D), or
    the (B, 1, D) rows at ``query_index``. ``hooks``: the block's PET hooks (``NO_HOOKS``: none).
    ``policy``: a ``KernelPolicy``, a backend name, or None for the ambient policy, which the plan
    follows (it binds its ops again when the ambient policy is a different one).
    """

    def __init__(self, block: nn.Module, policy=None, hooks: BlockHooks | None = NO_HOOKS,
                 own_forward: Callable | None = None, parts: BlockParts | None = None):
        self.block = block
        self.policy = policy
        self.hooks = hooks
        self.own_forward = own_forward
        self.parts = parts = block_parts(block) if parts is None else parts
        # a training step's working copies of those tensors (ops.working_copies), set by the step
        # around its forward; None: the forward reads the tensors themselves
        self.working = None
        self.act = parts.act_name
        self.gamma_1, self.gamma_2 = _gamma_owner(parts.ls_1), _gamma_owner(parts.ls_2)
        self.bind(policies.resolve(policy))

    def bind(self, policy) -> None:
        """Bind every sub-layer's op under ``policy`` (a KernelPolicy)."""
        parts, hooks = self.parts, self.hooks or NO_HOOKS
        lora = hooks.lora
        self.bound_policy = policy
        self.layer_norm = LAYER_NORM.bind(policy)
        self.linear = LINEAR_ACT.bind(policy)
        self.attention = ATTENTION.bind(policy)
        self.qkv_fused = _plain_layer_norm(parts.ln_1)
        self.layer_norm_linear = LAYER_NORM_LINEAR.bind(policy)
        self.out_fused = hooks.attn is None and lora.get("out") is None and _is_identity(parts.ln_attn)
        self.linear_residual = LINEAR_RESIDUAL.bind(policy)
        # The common MLP is one op, which may keep fc1's pre-activation instead of its output.
        self.mlp_fused = (self.act is not None and _plain_layer_norm(parts.ln_2) and _is_identity(parts.mlp_ln)
                          and hooks.mlp is None and lora.get("fc1") is None and lora.get("fc2") is None)
        self.layer_norm_mlp = LAYER_NORM_MLP.bind(policy)
        self.gated_update = GATED_UPDATE.bind(policy)

    def follow_ambient(self) -> None:
        """A plan given no policy binds again when the ambient policy changed (``use_policy``)."""
        if self.policy is None:
            ambient = policies.current_policy()
            if ambient is not self.bound_policy:
                self.bind(ambient)

    def describe(self) -> dict:
        """What each sub-layer runs, and why (``print(tuner)``, ``skipkernels info --model``)."""
        if self.hooks is None:
            return {"block": type(self.block).__name__, "runs": "its own forward (PET modules the op layer "
                    "would not apply)"}
        parts, hooks, lora = self.parts, self.hooks, self.hooks.lora
        qkv = f"layer_norm_linear: {runs(self.layer_norm_linear)}" if self.qkv_fused else \
            f"{type(parts.ln_1).__name__} then linear_act: {runs(self.linear)}"
        if self.out_fused:
            out = f"linear_residual: {runs(self.linear_residual)}"
        else:
            out = "linear_act then " + ", ".join(filter(None, [
                "LoRA" if lora.get("out") is not None else None,
                "post-attention norm" if not _is_identity(parts.ln_attn) else None,
                "the PET hook's residual add" if hooks.attn is not None else "the residual add"]))
        if self.mlp_fused:
            mlp = f"layer_norm_mlp ({self.act}): {runs(self.layer_norm_mlp)}"
        else:
            why = [w for w, on in (("a PET hook", hooks.mlp is not None),
                                   ("LoRA", bool(lora.get("fc1") or lora.get("fc2"))),
                                   ("an MLP norm", not _is_identity(parts.mlp_ln)),
                                   (f"activation {type(parts.act).__name__}", self.act is None)) if on]
            mlp = "fc1 then fc2 as separate ops" + (f" ({', '.join(why)})" if why else "")
        return {"block": type(self.block).__name__, "qkv": qkv, "attention": runs(self.attention), "out": out,
                "mlp": mlp, "pruning": "exact" if hooks.row_wise else "off (a PET module reads every token)"}

    def gemm_weights(self) -> tuple:
        """The GEMM weights and biases the forward reads now, each GEMM's weight then its bias (None
        where absent): the packed q/k/v projection, the out projection, fc1, fc2."""
        parts = self.parts
        qkv, (weight, bias) = parts.qkv, parts.qkv_names
        out, fc1, fc2 = parts.out, parts.fc1, parts.fc2
        return (getattr(qkv, weight), getattr(qkv, bias), out.weight, out.bias, fc1.weight, fc1.bias,
                fc2.weight, fc2.bias)

    def gemm_parameters(self) -> tuple:
        """The parameters behind ``gemm_weights`` without computing anything: each that a module
        holds as a plain parameter, else None (a weight computed at each read, such as a
        parametrised one or separate q, k, v projections read as one)."""
        parts = self.parts
        owners = (parts.qkv, parts.qkv, parts.out, parts.out, parts.fc1, parts.fc1, parts.fc2, parts.fc2)
        names = (*parts.qkv_names, "weight", "bias", "weight", "bias", "weight", "bias")
        return tuple(owner._parameters.get(name) if isinstance(owner, nn.Module) else None
                     for owner, name in zip(owners, names))

    # ------------------------------------------------------------------ sub-layers
    def _norm(self, module, x):
        if _is_identity(module):
            return x
        if _plain_layer_norm(module):
            return self.layer_norm(x, module.weight, module.bias, module.eps)
        return module(x)

    def _norm_linear(self, norm, x, weight, bias, activation: str, lora=None):
        """``activation(norm(x) @ weight.T + bias (+ lora(norm(x))))``."""
        if lora is not None:
            h = self._norm(norm, x)
            return activation_reference(self.linear(h, weight, bias, "none") + lora(h).to(h.dtype), activation)
        if _plain_layer_norm(norm):
            return self.layer_norm_linear(x, norm.weight, norm.bias, norm.eps, weight, bias, activation)
        return self.linear(self._norm(norm, x), weight, bias, activation)

    def _residual_linear(self, x, weight, bias, residual, gamma, hook, lora, norm=None):
        """``residual + gamma * norm(x @ weight.T + bias + lora(x))``, or ``hook(residual, branch)``."""
        h = self.linear(x, weight, bias, "none")
        if lora is not None:
            h = h + lora(x).to(h.dtype)
        h = self._norm(norm, h)
        if gamma is not None:
            h = h * gamma.gamma
        return residual + h if hook is None else hook(residual, h, self.gated_update)

    # ------------------------------------------------------------------ the block
    def forward(self, x, causal: bool = False, attn_mask=None, query_index=None):
        parts, hooks = self.parts, self.hooks
        if hooks is None:
            raise ValueError("this block holds PET modules the op layer would not apply: it runs its own forward")
        if parts.dropout_p and self.block.training:
            raise ValueError("attention dropout during training is not supported by the op layer")
        if query_index is not None and not hooks.row_wise:
            raise ValueError("last-block pruning needs hooks that treat every token row on its own")
        batch, length, width = x.shape
        heads = parts.heads
        head_dim = width // heads
        weights = self.gemm_weights()
        if self.working is not None:  # a training step's working copies (ops.working_copies)
            weights = read_through(weights, self.working)
        w_in, b_in, w_out, b_out, w_1, b_1, w_2, b_2 = weights

        if query_index is None:
            qkv = self._norm_linear(parts.ln_1, x, w_in, b_in, "none")
            q, k, v = qkv.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            residual = x
            key_limit = None
        else:
            # Pruned block: keys/values from every token, a query only for the pooled rows (the norm
            # is per row, so normalising the gathered rows equals gathering the normalised ones).
            rows = torch.arange(batch, device=x.device)
            kv = self._norm_linear(parts.ln_1, x, w_in[width:], None if b_in is None else b_in[width:], "none")
            k, v = kv.view(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            residual = x[rows, query_index].unsqueeze(1)
            q = self._norm_linear(parts.ln_1, residual, w_in[:width], None if b_in is None else b_in[:width], "none")
            q = q.view(batch, 1, heads, head_dim).transpose(1, 2)
            if attn_mask is not None:
                raise ValueError("query_index supports the causal mask or no mask, not a custom attn_mask")
            key_limit = (query_index + 1) if causal else None
            causal = False
        q = self._norm(parts.ln_q, q)
        k = self._norm(parts.ln_k, k)
        if key_limit is not None:
            a = self.attention(q, k, v, key_limit=key_limit)
        else:
            a = self.attention(q, k, v, causal=causal, attn_mask=attn_mask)
        if parts.attn is not None:
            a = a * parts.attn.head_scale
        a = a.transpose(1, 2).reshape(residual.shape[0], residual.shape[1], width)
        a = self._norm(parts.ln_inner, a)

        lora, gamma_1, gamma_2 = hooks.lora, self.gamma_1, self.gamma_2
        if self.out_fused:
            x = self.linear_residual(a, w_out, b_out, residual, None if gamma_1 is None else gamma_1.gamma)
        else:
            x = self._residual_linear(a, w_out, b_out, residual, gamma_1, hooks.attn, lora.get("out"), parts.ln_attn)

        if self.mlp_fused:
            ln_2 = parts.ln_2
            return self.layer_norm_mlp(x, ln_2.weight, ln_2.bias, ln_2.eps, w_1, b_1, self.act,
                                       w_2, b_2, None if gamma_2 is None else gamma_2.gamma)
        if self.act is not None:
            h = self._norm_linear(parts.ln_2, x, w_1, b_1, self.act, lora.get("fc1"))
        else:
            h = parts.act(parts.fc1(self._norm(parts.ln_2, x)))  # the module, as the block calls it
        h = self._norm(parts.mlp_ln, h)
        if hooks.mlp is None and lora.get("fc2") is None:
            return self.linear_residual(h, w_2, b_2, x, None if gamma_2 is None else gamma_2.gamma)
        return self._residual_linear(h, w_2, b_2, x, gamma_2, hooks.mlp, lora.get("fc2"))

    __call__ = forward

    def module_forward(self, x, *args, attn_mask=None, is_causal: bool = False):
        """The block's ``forward`` once ``patch_clip`` routes it here, for blocks called as
        (x, k_x, v_x, attn_mask) (gradient checkpointing passes these positionally), (x, attn_mask)
        or (x, attn_mask=, is_causal=); cross-attention inputs are refused."""
        if len(args) == 3:
            k_x, v_x, attn_mask = args
            if k_x is not None or v_x is not None:
                raise ValueError("cross-attention inputs are not supported by patched blocks")
        elif len(args) == 1:
            attn_mask = args[0]
        elif args:
            raise TypeError(f"unexpected block arguments: {len(args) + 1} positional")
        if self.hooks is None:
            return self.own_forward(x, attn_mask=attn_mask)
        self.follow_ambient()
        return self.forward(x, causal=is_causal, attn_mask=attn_mask)

    def as_forward(self):
        """The bound method a routed block's ``forward`` becomes: its family's signature."""
        return self.hf_module_forward if self.parts.calling == "hidden_states" else self.module_forward

    def hf_module_forward(self, hidden_states, attention_mask=None, *args, is_causal: bool = False, **kwargs):
        """The block's ``forward`` once ``patch_clip`` routes a block called as (hidden_states,
        attention_mask, ..., is_causal=) here: ``attention_mask`` is the layer's 4-D mask
        (causality included) or None, with ``is_causal`` then saying whether the attention is
        causal."""
        if self.hooks is None:
            return self.own_forward(hidden_states, attention_mask, *args, is_causal=is_causal, **kwargs)
        self.follow_ambient()
        if attention_mask is not None:
            return self.forward(hidden_states, attn_mask=attention_mask)
        return self.forward(hidden_states, causal=bool(is_causal))


# The attribute under which a model holds its one plan of both towers (``skip.towers.ModelPlan``):
# whatever changes what the blocks run (PET modules, a new policy) asks that plan to rebuild.
MODEL_PLAN_ATTRIBUTE = "skipkernels_plan"


def held_plan(model: nn.Module):
    """The plan ``model`` holds (``skip.towers.ModelPlan``), or None."""
    return model.__dict__.get(MODEL_PLAN_ATTRIBUTE)


def routed_plan(block) -> BlockPlan | None:
    """The plan ``patch_clip`` routed ``block``'s forward through, or None."""
    forward = block.__dict__.get("forward")
    plan = getattr(forward, "__self__", None)
    return plan if isinstance(plan, BlockPlan) else None


def block_forward(block, x, causal: bool = False, attn_mask=None, query_index=None, policy=None,
                  hooks: BlockHooks = NO_HOOKS):
    """One call of ``block`` through a plan built for it (tests and benchmarks; a training step
    runs plans it built once)."""
    return BlockPlan(block, policy, hooks).forward(x, causal=causal, attn_mask=attn_mask, query_index=query_index)


def blocks_forward(blocks, x, causal: bool = False, attn_mask=None, prune_last_index=None, policy=None):
    """Run a sequence of blocks; with ``prune_last_index`` the last one is pruned to those rows."""
    plans = [BlockPlan(block, policy) for block in blocks]
    for i, plan in enumerate(plans):
        index = prune_last_index if i == len(plans) - 1 else None
        x = plan.forward(x, causal=causal, attn_mask=attn_mask, query_index=index)
    return x
