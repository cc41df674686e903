"""Parameter-efficient modules: VL-PET granularity-controlled modifications, Adapter, LoRA.

VL-PET (Hu et al., ICCV 2023) modifies a frozen sub-layer with input X (the residual stream it
reads) and output H (the branch output, before the residual add) as

    out = X + s · G ⊙ (H + ΔH),

ΔH = W_up · GELU(W_down · H) from a multi-head down-projection adapter, and G a gate whose
granularity sets its shape:

=============  =========================================  ===========  =============
granularity    G                                          shape        G at init
=============  =========================================  ===========  =============
``large``      σ(W_up^g · GELU(W_down^g · X))             (B, L, D)    0.5
``middle_x``   σ(w · (X + H + ΔH))                        (B, L, 1)    0.5
``middle_y``   1 + z, z ∈ R^D                             (D,)         1
``small``      mean over tokens of σ(w · [X; H + ΔH])      (B, 1, 1)    0.5
=============  =========================================  ===========  =============

Initialisation, and why. The adapter's up-projection is zero (ΔH = 0), as in the reference
implementation's "up zero init" options. Every sigmoid gate's last layer (W_up^g, w, including
its bias) is zero too, so G = σ(0) = 0.5 exactly, for every input; z starts at 0, so G = 1.
The default scale is s = 1 / G_init: 2 for the sigmoid gates, 1 for ``middle_y``. Then at
initialisation s · G = 1 exactly (2 · 0.5 is exact in every float format), ΔH = 0, and
out = X + H: the wrapped model computes exactly what the pre-trained one did, bit for bit, so
tuning starts from the pre-trained function. The paper's released scripts instead use s = 1
(BART) or s = 0.3 (T5) with σ-gates starting near 0.5, i.e. the initial model is X + 0.5·H or
X + 0.15·H, a different function; passing ``scale`` explicitly reproduces that (the initial
output is then X + s · G_init · H, which the tests check). The gate's first layer (W_down^g)
keeps nn.Linear's default init so that gradients reach W_up^g from the first step.

The multi-head down-projection: N_h heads of d → r/N_h, concatenated. Concatenating independent
linear maps is one d → r linear map whose weight is the heads' weights stacked, so it is
computed as a single GEMM; the weight is stored per head, (N_h, r/N_h, d), and each head is
initialised like its own nn.Linear(d, r/N_h). GELU is the tanh approximation, the reference
implementation's ``gelu_new``.

Baselines: ``HoulsbyAdapter`` (out = X + H + W_up · GELU(W_down · H), up-projection zero) and
LoRA (W + (α/r) · B · A with B zero). LoRA is applied where a layer is called as a module
through a forward hook on the low-rank path, x · Aᵀ · Bᵀ (no full-size weight is formed), and
where the owner reads the weight tensor directly (the packed q/k/v ``in_proj_weight`` of
nn.MultiheadAttention and open_clip's Attention, and nn.MultiheadAttention's ``out_proj``) at the
weight level: the module's class is swapped for a subclass whose property returns W + ΔW, so the
parameter keeps its name and object and every code path that reads it sees the adapted weight.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from skipkernels.ops.pet_gate import gated_update

GRANULARITIES = ("large", "middle_x", "middle_y", "small")


def _gelu(x):
    return F.gelu(x, approximate="tanh")


def _zero_(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


class MultiHeadDown(nn.Module):
    """N_h heads of d → r/N_h, concatenated (computed as one d → r GEMM)."""

    def __init__(self, width: int, rank: int, heads: int = 1):
        super().__init__()
        if heads < 1 or rank % heads:
            raise ValueError(f"rank {rank} must be a positive multiple of heads {heads}")
        self.width, self.rank, self.heads = width, rank, heads
        self.weight = nn.Parameter(torch.empty(heads, rank // heads, width))
        self.bias = nn.Parameter(torch.empty(heads, rank // heads))
        self.reset_parameters()

    def reset_parameters(self):
        # Each head as nn.Linear(d, r/N_h) would initialise itself (fan-in d).
        for i in range(self.heads):
            nn.init.kaiming_uniform_(self.weight[i], a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.width)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        return F.linear(x, self.weight.reshape(self.rank, self.width), self.bias.reshape(self.rank))

    def extra_repr(self):
        return f"width={self.width}, rank={self.rank}, heads={self.heads}"


class MultiHeadAdapter(nn.Module):
    """ΔH = W_up · GELU(multi-head down(H)); W_up (and its bias) start at zero, so ΔH = 0."""

    def __init__(self, width: int, rank: int, heads: int = 1):
        super().__init__()
        self.down = MultiHeadDown(width, rank, heads)
        self.up = _zero_(nn.Linear(rank, width))

    def forward(self, h):
        return self.up(_gelu(self.down(h)))


class LargeGate(nn.Module):
    """G = σ(W_up · GELU(W_down · X)), per token and channel, rank ``gate_rank``."""

    init_value = 0.5

    def __init__(self, width: int, gate_rank: int):
        super().__init__()
        self.down = nn.Linear(width, gate_rank)
        self.up = _zero_(nn.Linear(gate_rank, width))

    def forward(self, x, u):
        return torch.sigmoid(self.up(_gelu(self.down(x))))


class MiddleXGate(nn.Module):
    """G = σ(w · (X + H + ΔH)), one scalar per token: shape (..., 1)."""

    init_value = 0.5

    def __init__(self, width: int):
        super().__init__()
        self.proj = _zero_(nn.Linear(width, 1))

    def forward(self, x, u):
        return torch.sigmoid(self.proj(x + u))


class MiddleYGate(nn.Module):
    """G = 1 + z, z ∈ R^D learned (input-independent, per channel)."""

    init_value = 1.0

    def __init__(self, width: int):
        super().__init__()
        self.z = nn.Parameter(torch.zeros(width))

    def forward(self, x, u):
        return 1.0 + self.z


class SmallGate(nn.Module):
    """G = mean over tokens of σ(w · [X; H + ΔH]), one scalar per sample: shape (B, 1, 1).

    The mean is over every position, padding included, as in the reference implementation; it
    also makes this gate depend on all tokens, so a block pruned to its pooled row (last-block
    pruning) cannot compute it.
    """

    init_value = 0.5

    def __init__(self, width: int, token_dim: int = 1):
        super().__init__()
        self.width, self.token_dim = width, token_dim
        self.proj = _zero_(nn.Linear(2 * width, 1))

    def forward(self, x, u):
        # w · [X; U] = w_x · X + w_u · U: no concatenated copy of the activations.
        w = self.proj.weight
        logits = F.linear(x, w[:, :self.width], self.proj.bias) + F.linear(u, w[:, self.width:])
        return torch.sigmoid(logits).mean(dim=self.token_dim, keepdim=True)


def make_gate(granularity: str, width: int, gate_rank: int, token_dim: int = 1) -> nn.Module:
    if granularity == "large":
        return LargeGate(width, gate_rank)
    if granularity == "middle_x":
        return MiddleXGate(width)
    if granularity == "middle_y":
        return MiddleYGate(width)
    if granularity == "small":
        return SmallGate(width, token_dim)
    raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")


class VLPETModifier(nn.Module):
    """out = X + s · G ⊙ (H + ΔH) for one sub-layer (see the module docstring for the inits).

    ``forward(x, h)`` returns the full output; with ``x=None`` it returns the modified branch
    s · G ⊙ (H + ΔH) only, for hosts that add the residual themselves. ``gate_input`` is X for the
    gates that read it even when the residual is added elsewhere.
    """

    def __init__(self, width: int, granularity: str, rank: int, heads: int = 4,
                 gate_rank: int | None = None, scale: float | None = None, token_dim: int = 1,
                 backend: str | None = None):
        super().__init__()
        self.granularity = granularity
        self.adapter = MultiHeadAdapter(width, rank, heads)
        self.gate = make_gate(granularity, width, gate_rank or rank, token_dim)
        # Default s = 1 / G_init makes the initial model equal to the original one.
        self.scale = float(1.0 / self.gate.init_value if scale is None else scale)
        self.backend = backend

    def gate_value(self, x, h):
        """G for residual stream ``x`` and branch output ``h`` (for inspection and tests)."""
        return self.gate(x, h + self.adapter(h))

    def forward(self, x, h, gate_input=None, backend=None):
        """``backend``: the policy of the route calling it, used unless this modifier has its own."""
        dh, g = self._delta_and_gate(x, h, gate_input)
        return gated_update(x, h, dh, g, self.scale, backend=self.backend if self.backend is not None else backend)

    def update(self, x, h, gate_op):
        """``forward`` with the gated update run by ``gate_op``, the op bound by the block plan that
        calls it (unless this modifier was given its own backend)."""
        if self.backend is not None:
            return self.forward(x, h)
        dh, g = self._delta_and_gate(x, h, None)
        return gate_op(x, h, dh, g, self.scale)

    def _delta_and_gate(self, x, h, gate_input):
        dh = self.adapter(h)
        # The middle-X and small gates read H + ΔH; the others do not need it materialised.
        u = h + dh if self.granularity in ("middle_x", "small") else None
        return dh, self.gate(x if gate_input is None else gate_input, u)

    def extra_repr(self):
        return f"granularity={self.granularity}, scale={self.scale}"


class HoulsbyAdapter(nn.Module):
    """Bottleneck adapter on a sub-layer's output: out = X + H + W_up · GELU(W_down · H)."""

    def __init__(self, width: int, rank: int):
        super().__init__()
        self.down = nn.Linear(width, rank)
        self.up = _zero_(nn.Linear(rank, width))

    def forward(self, x, h, gate_input=None):
        h = h + self.up(_gelu(self.down(h)))
        return h if x is None else x + h


class ParallelAdapter(nn.Module):
    """y = layer(x) + W_up · GELU(W_down · x), beside a linear layer (VL-PET's decoder design:
    on the cross-attention value projection). W_up starts at zero."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank)
        self.up = _zero_(nn.Linear(rank, out_features))

    def forward(self, x):
        return self.up(_gelu(self.down(x)))


# ----------------------------------------------------------------------------------------- LoRA

class LoRAFactors(nn.Module):
    """ΔW = (α / r) · B · A with A (r, in) initialised like nn.Linear and B (out, r) zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None,
                 dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scaling = float(rank if alpha is None else alpha) / rank
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self):
        return (self.B @ self.A) * self.scaling

    def forward(self, x):
        """The low-rank path x · Aᵀ · Bᵀ · (α / r)."""
        return F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scaling

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling}"


class PackedLoRA(nn.Module):
    """LoRA on a packed (3d, d) q/k/v in-projection: one factor pair per chosen slice
    ('q', 'k', 'v'), or one pair over the whole packed weight ('in_proj')."""

    SLICES = ("q", "k", "v")

    def __init__(self, width: int, slices, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        slices = tuple(slices)
        self.width = width
        if slices == ("in_proj",):
            self.whole = LoRAFactors(width, 3 * width, rank, alpha, dropout)
            self.slices = slices
            return
        bad = [s for s in slices if s not in self.SLICES]
        if bad or not slices:
            raise ValueError(f"packed LoRA slices must be a subset of {self.SLICES} or ('in_proj',), got {slices}")
        self.slices = tuple(s for s in self.SLICES if s in slices)
        for s in self.slices:
            self.add_module(s, LoRAFactors(width, width, rank, alpha, dropout))

    def delta_weight(self):
        if self.slices == ("in_proj",):
            return self.whole.delta_weight()
        parts = []
        for s in self.SLICES:
            if s in self.slices:
                parts.append(getattr(self, s).delta_weight())
            else:
                ref = getattr(self, self.slices[0]).B
                parts.append(ref.new_zeros(self.width, self.width))
        return torch.cat(parts, 0)


# Weight-level LoRA: swap the owner's class for a subclass with a property per adapted weight.

_WEIGHT_LORA_CLASSES: dict = {}


def lora_child_name(weight_name: str) -> str:
    return f"lora_{weight_name}"


def _weight_lora_class(base: type, names: tuple[str, ...]) -> type:
    key = (base, names)
    cls = _WEIGHT_LORA_CLASSES.get(key)
    if cls is None:
        attrs = {"_pet_base_class": base, "_pet_lora_weights": names}
        for name in names:
            def getter(self, _name=name):
                w = self._parameters[_name]
                return w + self._modules[lora_child_name(_name)].delta_weight().to(w.dtype)
            attrs[name] = property(getter)
        cls = type(f"LoRA{base.__name__}", (base,), attrs)
        _WEIGHT_LORA_CLASSES[key] = cls
    return cls


def install_weight_lora(module: nn.Module, weight_name: str, lora: nn.Module) -> None:
    """Make ``module.<weight_name>`` read W + lora.delta_weight(); W itself is not touched."""
    if weight_name not in module._parameters:
        raise ValueError(f"{type(module).__name__} has no parameter {weight_name!r}")
    base = getattr(type(module), "_pet_base_class", type(module))
    names = tuple(getattr(type(module), "_pet_lora_weights", ())) + (weight_name,)
    module.add_module(lora_child_name(weight_name), lora)
    module.__class__ = _weight_lora_class(base, names)


def uninstall_weight_lora(module: nn.Module, weight_name: str, merge: bool = False) -> None:
    """Remove a weight-level LoRA; with ``merge`` fold ΔW into W first (in place)."""
    lora = module._modules[lora_child_name(weight_name)]
    if merge:
        with torch.no_grad():
            w = module._parameters[weight_name]
            # The same rounding as the property's out-of-place W + ΔW: merged outputs are bitwise equal.
            w.add_(lora.delta_weight().to(w.dtype))
    del module._modules[lora_child_name(weight_name)]
    base = type(module)._pet_base_class
    names = tuple(n for n in type(module)._pet_lora_weights if n != weight_name)
    module.__class__ = _weight_lora_class(base, names) if names else base


def _lora_hook(module, args, output):
    return output + module._modules["lora"](args[0]).to(output.dtype)


def install_linear_lora(linear: nn.Linear, lora: LoRAFactors):
    """LoRA on an nn.Linear that is called as a module: y = linear(x) + lora(x). Returns the hook
    handle (remove it to uninstall)."""
    linear.add_module("lora", lora)
    return linear.register_forward_hook(_lora_hook)


def uninstall_linear_lora(linear: nn.Linear, hook, merge: bool = False) -> None:
    hook.remove()
    lora = linear._modules.pop("lora")
    if merge:
        with torch.no_grad():
            linear.weight.add_(lora.delta_weight().to(linear.weight.dtype))


def _value_adapter_hook(module, args, output):
    return output + module._modules["pet_value_adapter"](args[0]).to(output.dtype)


def install_value_adapter(linear: nn.Linear, adapter: ParallelAdapter):
    linear.add_module("pet_value_adapter", adapter)
    return linear.register_forward_hook(_value_adapter_hook)


def uninstall_value_adapter(linear: nn.Linear, hook) -> None:
    hook.remove()
    linear._modules.pop("pet_value_adapter")
