"""Activation fake-quantization at I-LLM's positions, and FSBR's SwiGLU act-smooth, on both forms of a model.

I-LLM (METHODS.md §2) quantizes more than the linear inputs: every operand of a non-linear op is an 8-bit integer.
:class:`ActAllocation` names the widths, one per kind of position (16 or more: that position stays float):

==============  ==========================================================  ==================================
field           position                                                    quantizer
==============  ==========================================================  ==================================
``linear``      input of every quantized linear                             per token, symmetric
``norm``        input of every norm read by a linear (RMSNorm, LayerNorm)   per token, symmetric, of ``x ⊘ a``
                                                                            (``a``: a static per-channel
                                                                            alignment, see below)
``swiglu``      the SwiGLU product's operands: ``gate'`` (into the SiLU)    per token, symmetric
                and ``up'``
``attn``        Q and K (after RoPE) and V                                  per token and head, symmetric
``softmax``     the softmax output P ∈ [0, 1]                               per row, unsigned, relative to
                                                                            the row's largest probability
==============  ==========================================================  ==================================

The residual stream stays float here: I-LLM carries it in 16 bits, which the integer-only lowering does
(``fxquant.passes.lower_integer_only``, ``inner_bits``), and this module's convention is that 16 bits is float.

Every position exists twice, and both compute the same function (a test checks it):

* on the **eager model** (:class:`EagerActQuant`): forward hooks on the norm, linear and gate/up modules, and an
  attention function registered with Hugging Face's ``AttentionInterface`` under :data:`ATTENTION_NAME` that
  quantizes Q, K, V and P and otherwise delegates to the model's own attention implementation; so ``model(...)``,
  ``model.generate()`` and FSBR's block training see the quantizers (training switches them on and off, with the
  straight-through estimator and a gradient to the per-token ranges);
* in the **captured ATen graph** (:func:`insert_graph_quantizers`): explicit ``abs/amax/div/round/clamp/mul`` nodes,
  and each ``scaled_dot_product_attention`` decomposed into ``matmul → softmax → fake-quant → matmul``.

**Norm-input alignment** (:func:`calibrate_norm_align`, :func:`aligned_fake_quantize`): the norm input is the
residual stream, whose outlier channels (a few hundred times the median on SmolLM2) leave a per-token 8-bit grid
nothing for the other channels. As in I-LLM's DI-Norm, which takes its input with per-channel scales aligned to a
common exponent, the quantizer reads ``x ⊘ a`` per token and multiplies ``a`` back: ``a = amax_c^β`` from
calibration (β = 0.5 by default; 0 is plain per-token), normalised to a largest entry of 1. It is a property of the
quantizer, not an equivalence: ``a`` stays at run time (a graph tensor, a hook's vector, a checkpoint tensor).
The per-token range cancels in the norm itself (``RMSNorm(c·x) = RMSNorm(x)``), so only the channel shape matters.

**The SwiGLU act-smooth** (:class:`SwiGLUSmooth`, :func:`smooth_swiglu_in_graph`): with ``gate' = s ⊙ gate`` and
``up' = up ⊘ s`` (folded into the rows of ``W_gate`` and ``W_up``), ``silu(gate) · up = gate' · σ(gate' ⊘ s) · up'``
exactly. The weights absorb ``s``, but the sigmoid must read the unscaled gate, so the SiLU becomes
``g · σ(g ⊘ s)`` at run time — a forward hook on the eager activation module, ``mul(g, sigmoid(div(g, s)))`` in the
graph. It moves magnitude between the product's two 8-bit operands; with float operands it changes nothing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import fx

from .capture import CapturedGraph, fxmeta
from .errors import PassError
from .graphview import is_identity, op_name

__all__ = ["ActAllocation", "ActSites", "EagerActQuant", "SwiGLUSmooth", "ATTENTION_NAME", "act_fake_quantize",
           "unit_fake_quantize", "aligned_fake_quantize", "channel_absmax", "norm_align_from_absmax",
           "calibrate_norm_align", "find_sites", "insert_graph_quantizers", "smooth_swiglu_in_graph", "module_path",
           "remember_runtime", "runtime_state", "install_runtime"]

#: the name of fxquant's fake-quant attention in Hugging Face's attention registry
ATTENTION_NAME = "fxquant_fakequant"
_ATTR = "_fxquant_act"            # on an attention module: the EagerActQuant that quantizes it
_ORIG = "_fxquant_attn_orig"      # on an attention module: the attention implementation to delegate to
aten = torch.ops.aten


# ---- the quantizers --------------------------------------------------------------------------------------------
class _RoundSTE(torch.autograd.Function):
    """``torch.round`` in the forward (bit-exact: ``(round(x) - x).detach() + x`` is not), identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _RoundSTE.apply(x)


def act_fake_quantize(x: torch.Tensor, bits: int, *, range_grad: bool = False) -> torch.Tensor:
    """Dynamic per-token symmetric fake quantization of activations (scale ``absmax(token) / (2^(b-1) - 1)``,
    over the last dimension), straight-through rounding in the backward. 16 bits or more is the identity.

    ``range_grad``: let the gradient reach the per-token range too (the LSQ-style term
    ``(round(x/Δ) - x/Δ) · ∂Δ/∂x`` at each token's largest entry). FSBR trains with it: a smoothing scale that
    blows one channel up coarsens the quantization step of every other channel of the token, and a detached range
    hides exactly that cost from the scales (with it detached, SmolLM2's norm scales ran into their lower clamp).
    The forward is the same either way."""
    if bits >= 16:
        return x
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = ((amax if range_grad else amax.detach()) / qmax).clamp(min=1e-8)
    return torch.clamp(round_ste(x / scale), -qmax - 1, qmax) * scale


def aligned_fake_quantize(x: torch.Tensor, align: torch.Tensor | None, bits: int, *,
                          range_grad: bool = False) -> torch.Tensor:
    """:func:`act_fake_quantize` of ``x ⊘ align`` times ``align`` (a per-channel vector over the last dim; None:
    plain per-token). 16 bits or more is the identity."""
    if bits >= 16 or align is None:
        return act_fake_quantize(x, bits, range_grad=range_grad)
    a = align.to(dtype=x.dtype, device=x.device)
    return act_fake_quantize(x / a, bits, range_grad=range_grad) * a


def unit_fake_quantize(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake quantization of probabilities (softmax output, rows over the last dim) to ``bits`` unsigned, relative to
    each row's largest: ``round(p / Δ) · Δ`` with ``Δ = max(p) / (2^b − 1)`` — what fxquant's DI-ClippedSoftmax
    outputs (``normalize_to="max"``: ``round(E · (2^b − 1) / E_max)`` with a per-row scale; I-LLM's fixed step
    ``1 / (2^b − 1)`` rounds every probability under ``1 / 510`` to zero in a 512-token row). Straight-through;
    16 bits or more is the identity."""
    if bits >= 16:
        return p
    levels = float(2 ** bits - 1)
    step = (p.detach().amax(dim=-1, keepdim=True) / levels).clamp(min=1e-12)
    return torch.clamp(round_ste(p / step), 0, levels) * step


# ---- the allocation --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActAllocation:
    """Bit widths per kind of activation position (module docstring); 16 or more keeps that position float."""

    linear: int = 8
    norm: int = 8
    swiglu: int = 8
    attn: int = 8
    softmax: int = 8

    def __post_init__(self) -> None:
        for name, bits in asdict(self).items():
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 32:
                raise PassError(f"activation width {name}={bits!r} must be an integer in 2..32 (16 or more: float)",
                                f"e.g. {name}: 8")

    @classmethod
    def linear_only(cls, bits: int) -> "ActAllocation":
        """Only the linear inputs quantized (the allocation of fxquant before I-LLM's 8-bit positions)."""
        return cls(linear=bits, norm=16, swiglu=16, attn=16, softmax=16)

    def active(self) -> dict[str, int]:
        """The quantized positions and their widths."""
        return {k: v for k, v in asdict(self).items() if v < 16}

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class ActSites:
    """Where the positions are, in the graph (node names) and in the eager model (module paths)."""

    #: (linear node, module path) of every quantized linear
    linears: list[tuple[str, str | None]] = field(default_factory=list)
    #: (node whose output the norm reads, norm module path)
    norms: list[tuple[str, str | None]] = field(default_factory=list)
    #: (gate linear node, up linear node, gate module path, up module path, act module path)
    swiglus: list[tuple[str, str, str | None, str | None, str | None]] = field(default_factory=list)
    #: (sdpa node, attention module path)
    attentions: list[tuple[str, str | None]] = field(default_factory=list)
    #: positions left out, and why
    skipped: list[tuple[str, str]] = field(default_factory=list)


def module_path(cg: CapturedGraph, node: fx.Node) -> str | None:
    """The eager model's path of the innermost module that produced ``node`` (None when it cannot be resolved)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack or cg.model is None:
        return None
    path = list(stack.values())[-1][0]
    # torch.export names modules from the exported wrapper (fxquant's HF wrapper holds the model as ``model``)
    candidates = [path] + ([path.split(".", 1)[1]] if "." in path else [])
    for cand in candidates:
        try:
            cg.model.get_submodule(cand)
            return cand
        except AttributeError:
            continue
    return None


def _module_input(cg: CapturedGraph, path: str, paths: dict[fx.Node, str | None]) -> fx.Node | None:
    """The one activation that flows into module ``path`` in the graph (None unless exactly one); ``paths``: the
    module path of every call node (computed once per graph)."""
    inside = [n for n, p in paths.items() if p == path]
    if not inside:
        return None
    members = set(inside)
    outside = {a for n in inside for a in n.all_input_nodes
               if a not in members and not (a.op == "placeholder" and a.name in cg.tensors)}
    return next(iter(outside)) if len(outside) == 1 else None


def find_sites(cg: CapturedGraph, structure: Any, quantized_fqns: Iterable[str]) -> ActSites:
    """The positions of :class:`ActAllocation` in ``cg``, from the structure analysis."""
    from fxquant.passes.fold_equivalent_scales import _linears_by_name
    nodes = {n.name: n for n in cg.gm.graph.nodes}
    linears = _linears_by_name(cg)
    wanted = set(quantized_fqns)
    sites = ActSites()
    for name, lin in linears.items():
        fqn = cg.fqn_of(lin.weight)
        if fqn in wanted:
            sites.linears.append((name, fqn.rsplit(".", 1)[0] if cg.model is not None else None))
    if structure is None:
        return sites
    seen: set[str] = set()
    paths = {n: module_path(cg, n) for n in cg.gm.graph.nodes if n.op == "call_function"}
    for g in structure.norm_groups:
        out = nodes.get(g.norm)
        path = g.weight.rsplit(".", 1)[0] if g.weight else (module_path(cg, out) if out is not None else None)
        if path is None or path in seen:
            if path is None:
                sites.skipped.append((f"norm {g.norm}", "no norm module found for it"))
            continue
        seen.add(path)
        x = _module_input(cg, path, paths)
        if x is None:
            sites.skipped.append((f"norm {path}", "its input could not be told apart in the graph"))
            continue
        sites.norms.append((x.name, path))
    for s in structure.swiglus:
        act = nodes.get(s.act_node or "")
        gate, up = linears.get(s.gate_node), linears.get(s.up_node)
        if gate is None or up is None:
            sites.skipped.append((f"swiglu {s.act_node}", "gate or up is not a linear of the graph"))
            continue
        # a fused gate_up projection (Phi-3): its output is quantized once, per token over both halves (the
        # integer-only graph's pieces share that scale too)
        sites.swiglus.append((s.gate_node, s.up_node, s.gate.rsplit(".", 1)[0], s.up.rsplit(".", 1)[0],
                              module_path(cg, act) if act is not None else None))
    for a in structure.attentions:
        core = nodes.get(a.core)
        if core is None or a.form not in ("sdpa", "matmul_softmax"):
            sites.skipped.append((f"attention {a.core}", f"form {a.form}: no fake-quant attention for it"))
            continue
        sites.attentions.append((a.core, module_path(cg, core)))
    return sites


@torch.no_grad()
def channel_absmax(model: torch.nn.Module, batches: torch.Tensor, *, inputs: Iterable[str] = (),
                   outputs: Iterable[str] = (), params: dict[str, torch.Tensor] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-channel ``max |x|`` (float32, last dim) of the first input of every module in ``inputs`` and of the
    output of every module in ``outputs`` (module paths), over one forward per row of ``batches`` (token ids) —
    one pass for all the statistics a calibration needs. ``params``: run with these tensors in place of the
    model's own (``functional_call``). Raises if a module never ran."""
    seen_in: dict[str, torch.Tensor] = {}
    seen_out: dict[str, torch.Tensor] = {}

    def record(into: dict[str, torch.Tensor], path: str, t: torch.Tensor) -> None:
        v = t.detach().abs().reshape(-1, t.shape[-1]).amax(dim=0).float()
        into[path] = torch.maximum(into[path], v) if path in into else v

    inputs, outputs = list(dict.fromkeys(inputs)), list(dict.fromkeys(outputs))
    handles = [model.get_submodule(p).register_forward_pre_hook(
        lambda mod, args, p=p: record(seen_in, p, args[0])) for p in inputs]
    handles += [model.get_submodule(p).register_forward_hook(
        lambda mod, args, out, p=p: record(seen_out, p, out)) for p in outputs]
    try:
        for b in range(batches.shape[0]):
            kwargs = {"input_ids": batches[b:b + 1], "use_cache": False}
            if params is None:
                model(**kwargs)
            else:
                torch.func.functional_call(model, params, args=(), kwargs=kwargs, strict=False)
    finally:
        for h in handles:
            h.remove()
    missing = [p for p in inputs if p not in seen_in] + [p for p in outputs if p not in seen_out]
    if missing:
        raise PassError(f"module {missing[0]} was not run by the calibration forwards", "report the model")
    return seen_in, seen_out


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise PassError(f"the norm-input alignment exponent must lie in [0, 1], got {beta!r}",
                        "e.g. norm_align: 0.5 (0: plain per-token quantization)")


def norm_align_from_absmax(absmax: dict[str, torch.Tensor], beta: float = 0.5) -> dict[str, torch.Tensor]:
    """The per-channel alignment ``a`` of each norm input (module docstring) from its per-channel ``max |x|``:
    ``amax_c^β / max_c amax_c^β``. A channel quieter than a tenth of the median counts as a tenth of the median,
    so a channel that was silent in calibration is not blown up by ``⊘ a`` when it wakes."""
    _check_beta(beta)
    out = {}
    for p, m in absmax.items():
        m = m.cpu()
        a = m.clamp(min=float(m.median()) * 0.1 + 1e-12) ** beta
        out[p] = a / a.max()
    return out


def calibrate_norm_align(model: torch.nn.Module, paths: Iterable[str], batches: torch.Tensor, beta: float = 0.5, *,
                         params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """:func:`norm_align_from_absmax` of the norm modules ``paths``' inputs over the float model's forwards on
    ``batches`` (:func:`channel_absmax`)."""
    _check_beta(beta)   # before the forwards
    absmax, _ = channel_absmax(model, batches, inputs=[p for p in paths if p is not None], params=params)
    return norm_align_from_absmax(absmax, beta)


# ---- the eager model -------------------------------------------------------------------------------------------
def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def _fake_quant_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs: Any):
    """Hugging Face attention function: Q, K, V and P fake-quantized when the module's quantizer is on, else the
    module's own attention implementation."""
    aq = getattr(module, _ATTR, None)
    if aq is None or not aq.enabled:
        return _original_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                   **kwargs)
    a = aq.allocation
    rg = aq.range_grad
    q = act_fake_quantize(query, a.attn, range_grad=rg)
    k = act_fake_quantize(key, a.attn, range_grad=rg)
    v = act_fake_quantize(value, a.attn, range_grad=rg)
    n_rep = q.shape[1] // k.shape[1]
    # contiguous operands, as in the graph (insert_graph_quantizers): the same BLAS path, the same rounding
    q, k, v = q.contiguous(), _repeat_kv(k, n_rep).contiguous(), _repeat_kv(v, n_rep).contiguous()
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    softcap = kwargs.get("softcap")
    if softcap is not None:                      # Gemma-2: c·tanh(s/c), before the mask, as its eager attention
        scores = torch.tanh(scores / softcap) * softcap
    if kwargs.get("s_aux") is not None:
        raise PassError(f"{type(module).__name__}: attention sinks (s_aux) have no fake-quant attention",
                        "set attn: 16 and softmax: 16")
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., : k.shape[-2]], float("-inf"))
        else:
            scores = scores + attention_mask[..., : k.shape[-2]]
    elif q.shape[2] > 1 and getattr(module, "is_causal", False):
        t, s = q.shape[2], k.shape[2]
        causal = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        scores = scores.masked_fill(~causal, float("-inf"))
    p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    p = unit_fake_quantize(p, a.softmax)
    out = torch.matmul(p, v).transpose(1, 2).contiguous()
    return out, p


def _original_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs: Any):
    """The attention the module's model used before the fake-quant attention replaced it (``sdpa`` or ``eager``).
    Masks reach this function built for sdpa (bool, or None for a plain causal one); eager attention adds a float
    mask, so it gets one."""
    import sys
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    orig = getattr(module, _ORIG, None)
    if orig == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if orig != "eager" or fn is None:
        raise PassError(f"{type(module).__name__} runs fxquant's fake-quant attention, but its own attention "
                        f"({orig!r}) cannot be restored", "install the quantizers with EagerActQuant on a model loaded "
                                                          "with attn_implementation='sdpa' or 'eager'")
    t, s = query.shape[2], key.shape[2]
    low = torch.finfo(query.dtype).min
    if attention_mask is None and t > 1 and getattr(module, "is_causal", False):
        attention_mask = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(diagonal=s - t)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype,
                                     device=query.device).masked_fill(~attention_mask, low)
    return fn(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    AttentionInterface.register(ATTENTION_NAME, _fake_quant_attention)
    # the mask this attention receives is built as for sdpa (a bool mask, or None for a plain causal one), as in
    # the captured graph, so that both mask the same way (masked_fill with -inf)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


class EagerActQuant:
    """Fake-quant hooks on an eager model at the allocation's positions; ``enabled`` switches them all.

    ``norm_align``: norm module path → its input's per-channel alignment (:func:`calibrate_norm_align`); a norm
    without one is quantized plain per token. The dict is read at every forward (FSBR puts live tensors in it).
    ``remove()`` takes every hook off and gives the model its attention implementation back."""

    def __init__(self, model: torch.nn.Module, sites: ActSites, allocation: ActAllocation, *,
                 range_grad: bool = False, enabled: bool = True,
                 norm_align: dict[str, torch.Tensor] | None = None):
        self.model, self.sites, self.allocation = model, sites, allocation
        self.range_grad, self.enabled = range_grad, enabled
        self.norm_align: dict[str, torch.Tensor] = dict(norm_align or {})
        self.handles: list[Any] = []
        self.attention_modules: list[torch.nn.Module] = []
        self._orig_attn: str | None = None
        a = allocation

        def pre(bits: int):
            def hook(mod, args):
                if not self.enabled:
                    return None
                return (act_fake_quantize(args[0], bits, range_grad=self.range_grad),) + tuple(args[1:])
            return hook

        def norm_pre(path: str):
            def hook(mod, args):
                if not self.enabled:
                    return None
                return (aligned_fake_quantize(args[0], self.norm_align.get(path), a.norm, range_grad=self.range_grad),) \
                    + tuple(args[1:])
            return hook

        def post(bits: int):
            def hook(mod, args, out):
                if not self.enabled:
                    return None
                return act_fake_quantize(out, bits, range_grad=self.range_grad)
            return hook

        get = model.get_submodule
        if a.linear < 16:
            for _, path in sites.linears:
                if path is not None:
                    self.handles.append(get(path).register_forward_pre_hook(pre(a.linear)))
        if a.norm < 16:
            for _, path in sites.norms:
                if path is not None:
                    self.handles.append(get(path).register_forward_pre_hook(norm_pre(path)))
        if a.swiglu < 16:
            for _, _, gate, up, _ in sites.swiglus:
                for path in dict.fromkeys((gate, up)):
                    if path is not None:
                        # after the linear's own input hook: the product's operands are the linears' outputs
                        self.handles.append(get(path).register_forward_hook(post(a.swiglu)))
        if (a.attn < 16 or a.softmax < 16) and sites.attentions:
            paths = [p for _, p in sites.attentions]
            if any(p is None for p in paths):
                raise PassError("an attention of the graph has no module in the eager model to quantize Q, K, V in",
                                "quantize attention operands only on Hugging Face models (attn: 16, softmax: 16)")
            config = getattr(model, "config", None)
            if config is None or not hasattr(model, "set_attn_implementation"):
                raise PassError(f"{type(model).__name__} is not a Hugging Face model: its attention cannot be "
                                "replaced by the fake-quant attention", "set attn: 16 and softmax: 16")
            orig = config._attn_implementation or "sdpa"
            if orig not in ("sdpa", "eager", ATTENTION_NAME):
                raise PassError(f"fake-quant Q/K/V/softmax need the model's attention to be 'sdpa' or 'eager', it is "
                                f"{orig!r}", "load the model with attn_implementation='sdpa', or set attn: 16 and "
                                             "softmax: 16")
            _register_attention()
            # a second quantizer on the same model delegates to what the first one replaced
            self._orig_attn = (getattr(get(paths[0]), _ORIG, "sdpa") if orig == ATTENTION_NAME else orig)
            for p in paths:
                mod = get(p)
                setattr(mod, _ATTR, self)
                setattr(mod, _ORIG, self._orig_attn)
                self.attention_modules.append(mod)
            model.set_attn_implementation(ATTENTION_NAME)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for mod in self.attention_modules:
            if getattr(mod, _ATTR, None) is self:
                delattr(mod, _ATTR)
        if self._orig_attn is not None and not any(getattr(m, _ATTR, None) is not None
                                                   for m in self.model.modules()):
            self.model.set_attn_implementation(self._orig_attn)
        self.attention_modules = []


class SwiGLUSmooth:
    """The act-smooth's runtime half on an eager model: the activation module computes ``g · σ(g ⊘ s)``.

    ``scale`` is the vector ``s`` (None: the module's own activation). FSBR sets it to the live, trainable
    scale during its quantized forwards; the fold sets it to the trained value for good."""

    def __init__(self, model: torch.nn.Module, act_path: str, scale: torch.Tensor | None = None):
        mod = model.get_submodule(act_path)
        if sum(m is mod for m in model.modules()) > 1:
            raise PassError(f"the activation module {act_path} is shared by several MLPs", "report a bug")
        self.path, self.scale = act_path, scale
        self.handle = mod.register_forward_hook(self._hook)

    def _hook(self, mod, args, out):
        if self.scale is None:
            return None
        g = args[0]
        return g * torch.sigmoid(g / self.scale.to(g.dtype))

    def remove(self) -> None:
        self.handle.remove()


# ---- the graph -------------------------------------------------------------------------------------------------
def _graph_token_fq(graph: fx.Graph, x: fx.Node, bits: int, tag: dict) -> fx.Node:
    """``clamp(round(x / s), -qmax-1, qmax) · s`` with ``s = max(absmax(x, -1) / qmax, 1e-8)``, after ``x``."""
    qmax = float(2 ** (bits - 1) - 1)
    amax = graph.call_function(aten.amax.default, (graph.call_function(aten.abs.default, (x,)), [-1], True))
    s = graph.call_function(aten.clamp.default, (graph.call_function(aten.div.Tensor, (amax, qmax)), 1e-8))
    r = graph.call_function(aten.round.default, (graph.call_function(aten.div.Tensor, (x, s)),))
    c = graph.call_function(aten.clamp.default, (r, -qmax - 1, qmax))
    out = graph.call_function(aten.mul.Tensor, (c, s))
    out.meta["val"] = x.meta.get("val")
    fxmeta(out)["act_quant"] = {"bits": bits, "granularity": "per-token", "dynamic": True, **tag}
    return out


def _quantize_output(graph: fx.Graph, x: fx.Node, bits: int, tag: dict, users: list[fx.Node] | None = None,
                     align: fx.Node | None = None) -> fx.Node:
    """Insert the per-token quantizer of ``x`` before its first user and make ``users`` (default: all) read it;
    ``align``: a per-channel tensor node, quantize ``x ⊘ align`` and multiply it back."""
    users = list(x.users) if users is None else list(users)
    order = {n: i for i, n in enumerate(graph.nodes)}
    with graph.inserting_before(min(users, key=order.__getitem__)):
        if align is None:
            xq = _graph_token_fq(graph, x, bits, tag)
        else:
            xa = graph.call_function(aten.div.Tensor, (x, align))
            xa.meta["val"] = x.meta.get("val")
            xq = graph.call_function(aten.mul.Tensor, (_graph_token_fq(graph, xa, bits, tag), align))
            xq.meta["val"] = x.meta.get("val")
            fxmeta(xq)["act_quant"] = {**fxmeta(xq.args[0])["act_quant"], "granularity": "per-token, channel-aligned",
                                       "align": align.name}
    for u in users:
        u.replace_input_with(x, xq)
    return xq


_ALIASES = ("to", "_to_copy", "alias", "clone", "detach", "contiguous")


def _norm_reads(cg: CapturedGraph, x: fx.Node, path: str) -> list[tuple[fx.Node, list[fx.Node]]]:
    """(value, the norm's ops that read it) for the norm module ``path`` reading ``x``. The export may hand the
    norm's own no-op cast of its input (``to(float32)`` of a float32 tensor) to the residual add outside the
    module: such an alias keeps the float value and its readers inside the norm read the quantized one, as in the
    eager model, where the quantizer is a pre-hook of the norm alone."""
    out, todo = [], [x]
    while todo:
        v = todo.pop()
        readers = []
        for u in v.users:
            if module_path(cg, u) != path or op_name(u) == "_assert_tensor_metadata":
                continue
            if op_name(u) in _ALIASES and any(module_path(cg, w) != path for w in u.users):
                todo.append(u)
            else:
                readers.append(u)
        if readers:
            out.append((v, readers))
    return out


def _decompose_sdpa(graph: fx.Graph, node: fx.Node, a: ActAllocation) -> None:
    """``scaled_dot_product_attention(q, k, v, mask)`` as explicit ops with Q/K/V/P fake-quant."""
    args = list(node.args) + [None] * (4 - len(node.args))
    q, k, v, mask = args[:4]
    kw = dict(node.kwargs)
    mask = kw.get("attn_mask", mask)
    dropout = kw.get("dropout_p", args[4] if len(node.args) > 4 else 0.0)
    causal = kw.get("is_causal", node.args[5] if len(node.args) > 5 else False)
    if dropout:
        raise PassError(f"{node.name}: attention dropout {dropout} in an inference graph", "capture the model in eval()")
    if kw.get("enable_gqa"):
        raise PassError(f"{node.name}: grouped-query sdpa (enable_gqa) is not decomposed", "report the model")
    qv = q.meta.get("val")
    d = qv.shape[-1] if qv is not None else None
    scale = kw.get("scale") or (d ** -0.5 if d else None)
    if scale is None:
        raise PassError(f"{node.name}: attention scale unknown (no shape on q)", "re-capture the model")
    with graph.inserting_before(node):
        qq, kq, vq = (graph.call_function(aten.clone.default, (_graph_token_fq(graph, t, a.attn, {"what": w})
                                                               if a.attn < 16 else t,),
                                          {"memory_format": torch.contiguous_format})
                      for t, w in ((q, "q"), (k, "k"), (v, "v")))
        kt = graph.call_function(aten.transpose.int, (kq, -2, -1))
        scores = graph.call_function(aten.mul.Tensor, (graph.call_function(aten.matmul.default, (qq, kt)), scale))
        if mask is not None:
            mv = mask.meta.get("val")
            if mv is not None and mv.dtype == torch.bool:
                scores = graph.call_function(aten.masked_fill.Scalar, (
                    scores, graph.call_function(aten.logical_not.default, (mask,)), float("-inf")))
            else:
                scores = graph.call_function(aten.add.Tensor, (scores, mask))
        if causal:
            raise PassError(f"{node.name}: is_causal sdpa is not decomposed (masks come as tensors in fxquant's capture)",
                            "report the model")
        p = graph.call_function(aten._softmax.default, (scores, -1, False))
        if a.softmax < 16:
            p = _graph_unit_fq(graph, p, a.softmax)
        out = graph.call_function(aten.matmul.default, (p, vq))
    out.meta["val"] = node.meta.get("val")
    fxmeta(out)["decomposed_sdpa"] = node.name
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _graph_unit_fq(graph: fx.Graph, p: fx.Node, bits: int) -> fx.Node:
    """:func:`unit_fake_quantize` in the graph: the softmax output on ``2^bits - 1`` levels of its row maximum."""
    levels = float(2 ** bits - 1)
    pmax = graph.call_function(aten.amax.default, (p, [-1], True))
    step = graph.call_function(aten.clamp.default, (graph.call_function(aten.div.Tensor, (pmax, levels)), 1e-12))
    r = graph.call_function(aten.round.default, (graph.call_function(aten.div.Tensor, (p, step)),))
    out = graph.call_function(aten.mul.Tensor, (graph.call_function(aten.clamp.default, (r, 0.0, levels)), step))
    out.meta["val"] = p.meta.get("val")
    fxmeta(out)["act_quant"] = {"bits": bits, "granularity": "per-row, max-relative", "what": "softmax"}
    return out


def _quantize_eager_attention(graph: fx.Graph, out: fx.Node, a: ActAllocation) -> None:
    """Eager attention (``softmax(q @ kᵀ · scale [soft-cap] + mask) @ v``, ``out`` the second product): Q, K (before
    its transpose) and V per token, P per row — the positions and quantizers of :func:`_decompose_sdpa`."""
    probs, v = out.args[0], out.args[1]
    soft = probs
    while isinstance(soft, fx.Node) and (is_identity(soft) or op_name(soft) == "dropout"):
        soft = soft.args[0]
    if op_name(soft) not in ("softmax", "_softmax"):
        raise PassError(f"{out.name}: the attention's probabilities do not come from a softmax", "report the model")
    scores = soft.args[0]
    while isinstance(scores, fx.Node) and op_name(scores) not in ("matmul", "bmm"):
        scores = next((x for x in scores.args if isinstance(x, fx.Node) and op_name(x) in (
            "matmul", "bmm", "add", "mul", "div", "sub", "tanh", "to", "_to_copy")), None)
    kt = scores.args[1] if isinstance(scores, fx.Node) else None
    if not (isinstance(kt, fx.Node) and op_name(kt) == "transpose"
            and sorted(d % len(kt.meta["val"].shape) for d in kt.args[1:3]) == [len(kt.meta["val"].shape) - 2,
                                                                                len(kt.meta["val"].shape) - 1]):
        raise PassError(f"{out.name}: the keys reach q @ kᵀ other than through a transpose of their last two dims",
                        "report the model")
    q, k = scores.args[0], kt.args[0]
    if a.attn < 16:
        for user, x, what in ((scores, q, "q"), (kt, k, "k"), (out, v, "v")):
            with graph.inserting_before(user):
                xq = graph.call_function(aten.clone.default, (_graph_token_fq(graph, x, a.attn, {"what": what}),),
                                         {"memory_format": torch.contiguous_format})
                xq.meta["val"] = x.meta.get("val")
            user.replace_input_with(x, xq)
    if a.softmax < 16:
        with graph.inserting_before(out):
            pq = _graph_unit_fq(graph, probs, a.softmax)
        out.replace_input_with(probs, pq)
    fxmeta(out)["quantized_attention"] = {"form": "matmul_softmax"}


def insert_graph_quantizers(cg: CapturedGraph, sites: ActSites, allocation: ActAllocation, *,
                            norm_align: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Insert the allocation's fake-quant nodes into ``cg``'s graph; returns counts per position. ``norm_align``
    (norm module path → vector) becomes graph tensors ``fxquant_norm_align_<i>`` read by the norm quantizers."""
    graph = cg.gm.graph
    nodes = {n.name: n for n in graph.nodes}
    a = allocation
    from fxquant.passes.fold_equivalent_scales import _linears_by_name
    linears = _linears_by_name(cg)
    counts = {"linear": 0, "norm": 0, "swiglu": 0, "attn": 0}
    if a.linear < 16:
        for name, _ in sites.linears:
            lin = linears[name]
            x = lin.input
            with graph.inserting_before(lin.node):
                xq = _graph_token_fq(graph, x, a.linear, {"what": "linear"})
            lin.node.replace_input_with(x, xq)
            counts["linear"] += 1
    if a.norm < 16:
        for i, (x_name, path) in enumerate(sites.norms):
            done = False
            align = None
            if norm_align and path in norm_align:
                val = nodes[x_name].meta.get("val")
                vec = norm_align[path].detach().to(val.dtype if val is not None else torch.float32)
                align = cg.add_tensor(f"fxquant_norm_align_{i}", vec)
            for value, users in _norm_reads(cg, nodes[x_name], path):
                _quantize_output(graph, value, a.norm, {"what": "norm"}, users, align)
                done = True
            counts["norm"] += done
    if a.swiglu < 16:
        for gate, up, *_ in sites.swiglus:
            for name in dict.fromkeys((gate, up)):
                _quantize_output(graph, nodes[name], a.swiglu, {"what": "swiglu"})
            counts["swiglu"] += 1
    if a.attn < 16 or a.softmax < 16:
        for core, _ in sites.attentions:
            if op_name(nodes[core]) == "scaled_dot_product_attention":
                _decompose_sdpa(graph, nodes[core], a)
            else:
                _quantize_eager_attention(graph, nodes[core], a)
            counts["attn"] += 1
    graph.lint()
    cg.gm.recompile()
    return counts


def smooth_swiglu_in_graph(cg: CapturedGraph, act_node: str, scale: torch.Tensor, name: str) -> fx.Node:
    """Replace ``silu(g)`` by ``g · σ(g ⊘ s)`` (``s`` a new tensor placeholder ``name``); returns the new output."""
    graph = cg.gm.graph
    node = next((n for n in graph.nodes if n.name == act_node), None)
    if node is None or node.op != "call_function" or node.target not in (aten.silu.default, aten.silu_.default):
        raise PassError(f"the SwiGLU act-smooth needs the SiLU node {act_node!r}, found "
                        f"{None if node is None else node.target}", "re-run the structure analysis on this graph")
    g = node.args[0]
    val = g.meta.get("val")
    s = scale.detach().to(val.dtype if val is not None else scale.dtype)
    s_node = cg.add_tensor(name, s)
    with graph.inserting_before(node):
        inner = graph.call_function(aten.div.Tensor, (g, s_node))
        sig = graph.call_function(aten.sigmoid.default, (inner,))
        out = graph.call_function(aten.mul.Tensor, (g, sig))
    for n in (inner, sig, out):
        n.meta["val"] = node.meta.get("val")
        n.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    fxmeta(out)["swiglu_smooth"] = {"replaces": act_node, "scale": name}
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    graph.lint()
    cg.gm.recompile()
    return out



# ---- what a saved checkpoint must restore ---------------------------------------------------------------------
#: attribute of a quantized model that holds what its hooks do (read by ``fxquant.checkpoint``)
RUNTIME_ATTR = "_fxquant_runtime"


def remember_runtime(model: torch.nn.Module, *, activations: tuple[ActSites, ActAllocation] | None = None,
                     swiglu: tuple[str, torch.Tensor] | None = None,
                     norm_align: dict[str, torch.Tensor] | None = None) -> None:
    """Note on ``model`` the activation quantizers, norm-input alignments and act-smooth scales its hooks apply,
    so that a checkpoint of it can re-install them (weights alone would compute another function)."""
    rt = model.__dict__.setdefault(RUNTIME_ATTR, {"activations": None, "swiglu_smooth": {}})
    rt.setdefault("norm_align", {})
    if activations is not None:
        sites, alloc = activations
        rt["norm_align"] = {p: a.detach().cpu().clone() for p, a in (norm_align or {}).items()}
        rt["activations"] = {"allocation": alloc.to_dict(),
                             "linears": [p for _, p in sites.linears if p is not None],
                             "norms": [p for _, p in sites.norms if p is not None],
                             "swiglus": [[g, u] for _, _, g, u, _ in sites.swiglus if g is not None and u is not None],
                             "attentions": [p for _, p in sites.attentions if p is not None]}
    if swiglu is not None:
        path, scale = swiglu
        rt["swiglu_smooth"][path] = scale.detach().cpu().clone()


def runtime_state(model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(JSON part, tensors) of what :func:`remember_runtime` noted, or None."""
    rt = model.__dict__.get(RUNTIME_ATTR)
    if not rt or (rt.get("activations") is None and not rt.get("swiglu_smooth")):
        return None
    tensors = {f"swiglu_smooth.{p}": s.contiguous() for p, s in rt["swiglu_smooth"].items()}
    align = rt.get("norm_align") or {}
    tensors.update({f"norm_align.{p}": a.contiguous() for p, a in align.items()})
    return {"activations": rt.get("activations"), "swiglu_smooth": sorted(rt["swiglu_smooth"]),
            "norm_align": sorted(align)}, tensors


def install_runtime(model: torch.nn.Module, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[Any]:
    """Re-install on a loaded model the hooks :func:`runtime_state` describes; returns them (each has ``remove``)."""
    hooks: list[Any] = []
    dtype = next(model.parameters()).dtype

    def stored(key: str, what: str) -> torch.Tensor:
        if key not in tensors:
            raise PassError(f"the checkpoint lacks the {what} {key}", "the checkpoint is corrupted; quantize again")
        return tensors[key].to(dtype)

    for path in info.get("swiglu_smooth", []):
        s = stored(f"swiglu_smooth.{path}", "act-smooth scale")
        hooks.append(SwiGLUSmooth(model, path, s))
        remember_runtime(model, swiglu=(path, s))
    align = {path: stored(f"norm_align.{path}", "norm-input alignment") for path in info.get("norm_align", [])}
    act = info.get("activations")
    if act:
        alloc = ActAllocation(**act["allocation"])
        sites = ActSites(linears=[(None, p) for p in act.get("linears", [])],
                         norms=[(None, p) for p in act.get("norms", [])],
                         swiglus=[(None, None, g, u, None) for g, u in act.get("swiglus", [])],
                         attentions=[(None, p) for p in act.get("attentions", [])])
        hooks.append(EagerActQuant(model, sites, alloc, norm_align=align))
        remember_runtime(model, activations=(sites, alloc), norm_align=align)
    return hooks
