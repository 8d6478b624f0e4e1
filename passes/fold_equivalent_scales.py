"""``fold_equivalent_scales`` — fold per-channel equivalent-transform scales into the weights (TEQ, FSBR).

The identity every smoothing method rests on (METHODS.md §1): ``x Wᵀ = (x ⊘ s)(W · diag(s))ᵀ``. A *scale group*
is one vector ``s`` between a producer that can absorb ``1/s`` and the consumer linears that absorb ``s``:

* **norm -> linears** (``input_layernorm -> q, k, v``; ``post_attention_layernorm -> gate, up``): the norm's
  weight and bias are divided by ``s``, every consumer's input columns multiplied by ``s``;
* **linear -> linear** (``v -> o`` through attention, ``up -> down`` through SwiGLU's product, or through a ReLU):
  rows ``[lo, hi)`` of the producing linear and its bias are divided by ``s``, the consumer's input columns
  multiplied by ``s`` *re-indexed by the path*: with grouped-query attention, o_proj input channel
  ``h * head_dim + d`` reads kv head ``h // n_rep``, so it gets ``s[(h // n_rep) * head_dim + d]``.

Only places that :class:`~fxquant.passes.analyze_structure.AnalyzeStructure` accepted become groups (a GELU
between two linears is never folded across: the analysis rejects that pair, so no group exists), and a group is
dropped, with its reason recorded in :attr:`ScalePlan.skipped`, when folding it would change another path (a
norm whose output also feeds a residual), when its producer cannot absorb ``1/s`` (a weightless norm, a bias
that is not a parameter), or when every consumer stays float (``lm_head`` by default).

The plan is data (:class:`ScalePlan`: which tensor, which axis, which positions, which scale index, multiply or
divide), and :meth:`ScalePlan.apply` is the *one* function that turns scales into weights: the TEQ/FSBR training
calls it differentiably on every step (then fake-quantizes), and this pass calls it once to fold. So what was
trained is exactly what is folded.

Contract of :class:`FoldEquivalentScales`
-----------------------------------------
* **requires** the ``structure`` artifact and trained scales (``ctx.artifacts[source]``, an
  :class:`EquivalentScales` left by ``train_teq_scales`` / ``train_fsbr_scales``) or scales given to the
  constructor.
* **call** replaces every affected tensor in ``cg.tensors`` by its folded copy (the model's parameters are
  untouched until ``cg.write_back()``); the graph's topology is unchanged, so the fold costs nothing at run time.
* **ensures** (with verification on) that the float graph computes the same function as before the fold, on a
  fixed token input: relative error ≤ ``1e-4`` in float32 (≤ ``1e-9`` in float64).

:func:`insert_scale_nodes` builds the explicit form instead — ``x ⊘ s`` after each producer and ``W · diag(s)``
before each consumer, as graph nodes — for inspection and debugging (``FXQUANT_DEBUG`` dumps show it).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from fxquant.capture import CapturedGraph, fxmeta
from fxquant.errors import PassError
from fxquant.graphview import LinearOp, as_linear
from fxquant.passes.quantize_weights_rtn import matches
from fxquant.pipeline import Pass, PassContext, PassResult

log = logging.getLogger("fxquant")

__all__ = ["ScaleSite", "ScaleGroup", "ScalePlan", "EquivalentScales", "plan_scales", "linear_weights",
           "FoldEquivalentScales", "insert_scale_nodes", "random_scales"]

#: scales are clamped to at least this during training (METHODS.md §1), so folding never divides by zero
MIN_SCALE = 1e-5


# ---- the plan: scales as data -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ScaleSite:
    """One tensor that absorbs a group's scale: ``t[..., positions, ...] *= s[index] ** power`` along ``axis``."""

    fqn: str
    axis: int
    positions: torch.Tensor   # long: positions along ``axis``
    index: torch.Tensor       # long: which entry of ``s`` each position takes
    power: int                # +1: consumer (multiply by s); -1: producer (divide by s)
    #: the tensor enters the model as ``offset + t`` (Gemma's norm gain ``1 + w``): ``t -> (offset + t)·f - offset``
    offset: float = 0.0


@dataclass
class ScaleGroup:
    """One trainable scale vector and every tensor that absorbs it."""

    name: str                 # unique, readable: "<producer fqn> -> <consumer modules>"
    kind: str                 # "norm" | "attention" | "gated" | "activation" | "linear" (FSBR adds more)
    size: int
    producer: str             # FQN of the norm weight or producing linear weight
    consumers: list[str]      # FQNs of the consumer linear weights
    sites: list[ScaleSite]
    layer: int | None = None
    #: the channel range of the producer's output (pairs), or (0, size) for norms
    channels: tuple[int, int] = (0, 0)
    #: groups that must keep ``s_i = s_{i + half}`` (q/k under RoPE): half the rotary width, else None
    tie_half: int | None = None
    #: FX node whose output carries the producer's channels (the norm output, or the producing linear)
    producer_node: str | None = None
    #: FSBR's SwiGLU act-smooth (kind "swiglu"): the SiLU node that must read ``gate' ⊘ s`` at run time
    act_node: str | None = None


@dataclass
class ScalePlan:
    """Every scale group of a model plus what was left out and why."""

    groups: list[ScaleGroup] = field(default_factory=list)
    #: (what, reason) for every candidate the plan refused
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def fqns(self) -> set[str]:
        """FQNs of every tensor some group rescales."""
        return {site.fqn for g in self.groups for site in g.sites}

    def group(self, name: str) -> ScaleGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def init_scales(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """All-ones scales (the identity transform), one vector per group."""
        return {g.name: torch.ones(g.size, dtype=dtype, device=device) for g in self.groups}

    def factors(self, fqn: str, shape: Sequence[int], scales: Mapping[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        """axis -> the multiplier along that axis for tensor ``fqn`` (differentiable in ``scales``)."""
        out: dict[int, torch.Tensor] = {}
        for g in self.groups:
            s = scales.get(g.name)
            if s is None:
                continue
            for site in g.sites:
                if site.fqn != fqn:
                    continue
                vals = s[site.index.to(s.device)]
                if site.power < 0:
                    vals = 1.0 / vals
                vec = torch.ones(shape[site.axis], dtype=s.dtype, device=s.device)
                vec = vec.index_put((site.positions.to(s.device),), vals)
                out[site.axis] = out[site.axis] * vec if site.axis in out else vec
        return out

    def apply_one(self, fqn: str, tensor: torch.Tensor, scales: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``tensor`` with every scale of the plan that touches ``fqn`` folded in (a new tensor)."""
        factors = self.factors(fqn, tensor.shape, scales)
        offset = next((site.offset for g in self.groups for site in g.sites if site.fqn == fqn and site.offset), 0.0)
        result = tensor + offset if offset and factors else tensor
        for axis, vec in factors.items():
            view = [1] * tensor.dim()
            view[axis] = -1
            result = result * vec.to(tensor.dtype).reshape(view)
        return result - offset if offset and factors else result

    def apply(self, tensors: Mapping[str, torch.Tensor], scales: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """FQN -> folded copy, for every tensor in ``tensors`` that some group rescales."""
        touched = self.fqns()
        return {fqn: self.apply_one(fqn, t, scales) for fqn, t in tensors.items() if fqn in touched}

    def check_scales(self, scales: Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`PassError` unless every group has a finite, positive vector of the right size."""
        for g in self.groups:
            s = scales.get(g.name)
            if s is None:
                raise PassError(f"no scale for group {g.name!r}", "pass one vector per group (ScalePlan.init_scales())")
            if tuple(s.shape) != (g.size,):
                raise PassError(f"scale of group {g.name!r} has shape {tuple(s.shape)}, expected ({g.size},)")
            if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
                raise PassError(f"scale of group {g.name!r} has non-finite or non-positive entries "
                                f"(min {float(s.min()):.3g})",
                                "training diverged: lower the learning rate or the step count, and clamp s >= 1e-5")

    def render(self) -> str:
        lines = [f"{len(self.groups)} scale groups, {len(self.skipped)} skipped"]
        for g in self.groups:
            tie = f" tied-rope(half={g.tie_half})" if g.tie_half else ""
            lines.append(f"  {g.kind:<10} {g.name} [{g.size}]{tie}")
        for what, why in self.skipped:
            lines.append(f"  skipped {what}: {why}")
        return "\n".join(lines) + "\n"


@dataclass
class EquivalentScales:
    """What a training pass leaves for the fold: the plan, the trained scales and the training record."""

    plan: ScalePlan
    scales: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    method: str = "teq"
    #: per-group init (to show how far the scales moved)
    init: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def moved(self) -> float:
        """Largest |s - s_init| over all groups (0 means training changed nothing)."""
        worst = 0.0
        for name, s in self.scales.items():
            ref = self.init.get(name, torch.ones_like(s))
            worst = max(worst, float((s - ref).abs().max()) if s.numel() else 0.0)
        return worst


# ---- building the plan from the structure analysis --------------------------------------------------------
def _is_param(cg: CapturedGraph):
    return lambda n: n.op == "placeholder" and n.name in cg.tensors and n.name in cg.fqn


def _linears_by_name(cg: CapturedGraph) -> dict[str, LinearOp]:
    is_param = _is_param(cg)
    out = {}
    for node in cg.gm.graph.nodes:
        if node.op == "call_function":
            lin = as_linear(node, is_param)
            if lin is not None:
                out[node.name] = lin
    return out


def linear_weights(cg: CapturedGraph) -> dict[str, str]:
    """FQN -> layout (``"out_in"`` / ``"in_out"``) of every parameter that is the weight of a linear-like op."""
    out: dict[str, str] = {}
    for lin in _linears_by_name(cg).values():
        fqn = cg.fqn_of(lin.weight)
        if fqn is not None:
            out.setdefault(fqn, lin.layout)
    return out


def _tensor_by_fqn(cg: CapturedGraph) -> dict[str, torch.Tensor]:
    return {fqn: cg.tensors[ph] for ph, fqn in cg.fqn.items() if ph in cg.tensors}


def _storage(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def _gqa_index(in_features: int, size: int, n_rep: int, head_dim: int | None) -> torch.Tensor | None:
    """Scale index of every consumer input channel for a pair whose producer channels are read ``n_rep`` times.

    Identity when ``n_rep == 1``; with grouped-query attention query head ``h`` reads kv head ``h // n_rep`` (HF's
    ``repeat_kv`` and sdpa's ``enable_gqa``), so channel ``h * head_dim + d`` takes ``s[(h // n_rep) * head_dim + d]``.
    None when the widths do not fit that pattern (the group is then skipped, never guessed).
    """
    if n_rep == 1 and in_features == size:
        return torch.arange(size)
    if not head_dim or in_features != size * n_rep or size % head_dim:
        return None
    j = torch.arange(in_features)
    head, d = j // head_dim, j % head_dim
    return (head // n_rep) * head_dim + d


def _narrowest_float(cg: CapturedGraph, dtype: torch.dtype) -> torch.dtype:
    """The least precise float dtype the graph computes in (a float64 model whose norms cast to float32, like
    Gemma's, is only float32-exact), or ``dtype`` if none is narrower."""
    eps = torch.finfo(dtype).eps
    for node in cg.gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype.is_floating_point and torch.finfo(val.dtype).eps > eps:
            dtype, eps = val.dtype, torch.finfo(val.dtype).eps
    return dtype


def plan_scales(cg: CapturedGraph, structure: Any, *, exclude: Sequence[str] = ("lm_head*",),
                kinds: Sequence[str] = ("norm", "attention", "gated", "activation", "linear")) -> ScalePlan:
    """One scale group per norm group and linear pair the analysis accepted (see the module docstring).

    ``exclude`` are the weight patterns that stay float: a group whose consumers all stay float is skipped (its
    scale could only hurt: nothing downstream is quantized). ``kinds`` selects which groups to build.
    """
    plan = ScalePlan()
    linears = _linears_by_name(cg)
    tensors = _tensor_by_fqn(cg)
    # a tensor shared by two names (tied lm_head / embedding) must not be rescaled through one of them
    by_storage: dict[tuple, set[str]] = {}
    for fqn, t in tensors.items():
        by_storage.setdefault(_storage(t), set()).add(fqn)

    def tied(fqn: str) -> bool:
        t = tensors.get(fqn)
        return t is not None and len(by_storage.get(_storage(t), ())) > 1

    def all_float(consumers: list[str]) -> bool:
        return all(any(matches(c, p) for p in exclude) for c in consumers)

    def consumer_site(lin: LinearOp, index: torch.Tensor) -> ScaleSite:
        axis = 1 if lin.layout == "out_in" else 0
        return ScaleSite(cg.fqn_of(lin.weight), axis, torch.arange(lin.in_features), index, +1)

    if "norm" in kinds:
        for g in structure.norm_groups:
            what = f"norm {g.weight or g.norm}"
            consumers = list(dict.fromkeys(g.consumers))  # a fused qkv is listed once per slice
            if not g.exclusive:
                plan.skipped.append((what, f"its output also feeds {', '.join(g.other_users)}; folding 1/s into "
                                           "the norm would change that path too"))
                continue
            if g.weight is None:
                plan.skipped.append((what, "a norm without weight cannot absorb 1/s"))
                continue
            if all_float(consumers):
                plan.skipped.append((what, f"every consumer ({', '.join(consumers)}) stays float"))
                continue
            bad = [x for x in (g.weight, g.bias, *consumers) if x and tied(x)]
            if bad:
                plan.skipped.append((what, f"{bad[0]} is tied to another parameter; untie it to fold into it"))
                continue
            size = tensors[g.weight].numel()
            sites = [ScaleSite(g.weight, 0, torch.arange(size), torch.arange(size), -1,
                               offset=getattr(g, "weight_offset", 0.0))]
            if g.bias:
                sites.append(ScaleSite(g.bias, 0, torch.arange(size), torch.arange(size), -1))
            ok = True
            seen: set[str] = set()
            for node_name in g.consumer_nodes:
                lin = linears.get(node_name)
                if lin is None or cg.fqn_of(lin.weight) in seen:
                    continue
                seen.add(cg.fqn_of(lin.weight))
                if lin.in_features != size:
                    plan.skipped.append((what, f"consumer {cg.fqn_of(lin.weight)} reads {lin.in_features} channels, "
                                               f"the norm has {size}"))
                    ok = False
                    break
                sites.append(consumer_site(lin, torch.arange(size)))
            if ok:
                short = ",".join(c.rsplit(".", 2)[-2] for c in consumers)
                plan.groups.append(ScaleGroup(f"{g.weight.rsplit('.', 1)[0]}->{short}", "norm", size, g.weight,
                                              consumers, sites, g.layer, (0, size),
                                              producer_node=g.norm))

    for p in structure.pairs:
        if p.kind not in kinds:
            continue
        lo, hi = p.channels
        what = f"pair {p.producer}[{lo}:{hi}] -> {p.consumer}"
        prod, cons = linears.get(p.producer_node), linears.get(p.consumer_node)
        if prod is None or cons is None:
            plan.skipped.append((what, "producer or consumer is no longer a linear in the graph"))
            continue
        if all_float([p.consumer]) and all_float([p.producer]):
            plan.skipped.append((what, "both linears stay float"))
            continue
        if tied(p.producer) or tied(p.consumer):
            plan.skipped.append((what, "a weight is tied to another parameter; untie it to fold into it"))
            continue
        size = hi - lo
        index = _gqa_index(cons.in_features, size, p.n_rep, p.head_dim)
        if index is None:
            plan.skipped.append((what, f"consumer reads {cons.in_features} channels from {size} producer channels "
                                       f"(n_rep={p.n_rep}, head_dim={p.head_dim}): no channel map to fold along"))
            continue
        out_axis = 0 if prod.layout == "out_in" else 1
        sites = [ScaleSite(p.producer, out_axis, torch.arange(lo, hi), torch.arange(size), -1)]
        if prod.bias is not None:
            bias_fqn = cg.fqn_of(prod.bias)
            if bias_fqn is None:
                plan.skipped.append((what, "the producer's bias is computed in the graph, not a parameter"))
                continue
            sites.append(ScaleSite(bias_fqn, 0, torch.arange(lo, hi), torch.arange(size), -1))
        sites.append(consumer_site(cons, index))
        name = f"{p.producer.rsplit('.', 1)[0]}[{lo}:{hi}]->{p.consumer.rsplit('.', 2)[-2]}"
        plan.groups.append(ScaleGroup(name, p.kind, size, p.producer, [p.consumer], sites, p.layer, (lo, hi),
                                      producer_node=p.producer_node))
    return plan


def random_scales(plan: ScalePlan, *, spread: float = 1.0, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Log-normal positive scales (``exp(spread · N(0, 1))``), RoPE ties respected: for equivalence tests."""
    out = {}
    for g in plan.groups:
        s = torch.exp(spread * torch.randn(g.size, generator=generator, dtype=torch.float64))
        if g.tie_half:
            s = _tie_rope(s, g.tie_half)
        out[g.name] = s.to(dtype)
    return out


def _tie_rope(s: torch.Tensor, half: int) -> torch.Tensor:
    """``s`` with ``s[i + half] = s[i]`` within every rotary block of ``2 * half`` channels."""
    blocks = s.reshape(-1, 2, half)
    return blocks[:, :1].expand(-1, 2, half).reshape(-1).clone()


# ---- the fold pass ----------------------------------------------------------------------------------------
def _probe_ids(cg: CapturedGraph) -> torch.Tensor | None:
    """A fixed small token input for the equivalence check (None for graphs that take no token ids)."""
    if not cg.meta.get("hf") or cg.model is None:
        return None
    vocab = int(getattr(cg.model.config, "vocab_size", 32) or 32)
    g = torch.Generator().manual_seed(1234)
    device = next((t.device for t in cg.tensors.values()), torch.device("cpu"))
    return torch.randint(0, vocab, (1, 8), generator=g).to(device)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).abs().max() / b64.abs().max().clamp_min(1e-30))


class FoldEquivalentScales(Pass):
    """Fold trained per-channel scales into producers (``1/s``) and consumers (``s``): no runtime cost."""

    name = "fold_equivalent_scales"
    description = "fold TEQ/FSBR scales into norm / producing-linear rows (1/s) and consumer columns (s)"

    def __init__(self, source: str = "teq", scales: EquivalentScales | None = None):
        self.source = source
        self.scales = scales
        self._reference: tuple[torch.Tensor, torch.Tensor] | None = None

    def _record(self, ctx: PassContext) -> EquivalentScales:
        found = self.scales if self.scales is not None else ctx.artifacts.get(self.source)
        if not isinstance(found, EquivalentScales):
            raise PassError(f"fold_equivalent_scales found no trained scales in ctx.artifacts[{self.source!r}]",
                            "run train_teq_scales (or train_fsbr_scales) before it, or pass "
                            "FoldEquivalentScales(scales=EquivalentScales(plan, scales))")
        return found

    def requires(self, cg: CapturedGraph, ctx: PassContext) -> None:
        record = self._record(ctx)
        record.plan.check_scales(record.scales)
        missing = sorted(record.plan.fqns() - set(cg.fqn.values()))
        if missing:
            raise PassError(f"the scale plan names parameters not in this graph: {missing[:3]}",
                            "build the plan (plan_scales) from the same captured graph")

    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        record = self._record(ctx)
        plan, scales = record.plan, record.scales
        self._reference = None
        if ctx.verify:
            ids = _probe_ids(cg)
            if ids is not None:
                with torch.no_grad():
                    self._reference = (ids, cg(ids).detach().clone())
        touched = plan.fqns()
        rewritten = 0
        with torch.no_grad():
            for ph, fqn in cg.fqn.items():
                if fqn not in touched or ph not in cg.tensors:
                    continue
                old = cg.tensors[ph]
                cg.tensors[ph] = plan.apply_one(fqn, old, {k: v.to(old.device) for k, v in scales.items()}).to(old.dtype)
                rewritten += 1
        for node in cg.gm.graph.nodes:
            if node.op == "placeholder" and cg.fqn.get(node.name) in touched:
                fxmeta(node)["folded"] = record.method
        smoothed = self._smooth_swiglus(cg, ctx, plan, scales)
        ctx.artifacts.setdefault("folded_scales", {})[record.method] = {k: v.detach().clone()
                                                                        for k, v in scales.items()}
        log.info("fold_equivalent_scales: %d groups folded into %d tensors", len(plan.groups), rewritten)
        # without act-smooth groups the topology is unchanged: only tensors behind placeholders moved
        stats = {"groups": len(plan.groups), "tensors": rewritten, "skipped": len(plan.skipped)}
        if smoothed:
            stats["swiglu_smoothed"] = smoothed
        return PassResult(modified=bool(smoothed), stats=stats)

    @staticmethod
    def _smooth_swiglus(cg: CapturedGraph, ctx: PassContext, plan: ScalePlan, scales: Mapping[str, torch.Tensor]) -> int:
        """FSBR's act-smooth groups: the weights took ``s``; the SiLU must now read ``gate' ⊘ s`` (graph and eager
        model). A group whose scale is exactly 1 changes nothing and is left out."""
        from fxquant.actquant import SwiGLUSmooth, module_path, remember_runtime, smooth_swiglu_in_graph
        n = 0
        for k, g in enumerate(plan.groups):
            if g.kind != "swiglu":
                continue
            s = scales[g.name].detach()
            if bool((s == 1).all()):
                continue
            act = next((x for x in cg.gm.graph.nodes if x.name == g.act_node), None)
            path = module_path(cg, act) if act is not None and cg.model is not None else None
            if cg.model is not None and path is None:
                raise PassError(f"act-smooth group {g.name}: the SiLU {g.act_node} has no module in the eager model",
                                "train FSBR with act_smooth: false")
            smooth_swiglu_in_graph(cg, g.act_node, s, f"fsbr_swiglu_scale_{k}")
            if cg.model is not None:
                dtype = next(cg.model.parameters()).dtype
                hook = SwiGLUSmooth(cg.model, path, s.to(dtype).clone())
                ctx.artifacts.setdefault("activation_hooks", []).append(hook)
                ctx.artifacts.setdefault("swiglu_smooth", {})[path] = hook.scale
                remember_runtime(cg.model, swiglu=(path, hook.scale))   # a checkpoint re-installs the hook
            n += 1
        return n

    def ensures(self, cg: CapturedGraph, ctx: PassContext) -> None:
        if self._reference is None:
            return
        ids, before = self._reference
        with torch.no_grad():
            after = cg(ids)
        dtype = _narrowest_float(cg, before.dtype)
        tol = 1e-9 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 2e-2
        err = _rel_err(after, before)
        if not err <= tol:
            raise PassError(f"fold_equivalent_scales changed the float model's output (max relative error {err:.3g}, "
                            f"tolerance {tol:g})",
                            "a scale group folds across an op that does not commute with it; dump the plan "
                            "(ScalePlan.render()) and report the group")


# ---- the explicit form, for inspection --------------------------------------------------------------------
def insert_scale_nodes(cg: CapturedGraph, plan: ScalePlan, scales: Mapping[str, torch.Tensor]) -> int:
    """Rewrite the graph into TEQ's explicit form: ``x ⊘ s`` after every producer, ``W · diag(s)`` before every
    consumer, each scale a new placeholder (``teq_inv_scale_<k>``, ``teq_scale_<k>_<j>``). Returns the number of
    nodes inserted.

    The result computes the same function as the original graph (for any positive ``s``); it is the form TEQ is
    described in, kept for debugging and dumps — :class:`FoldEquivalentScales` is what recipes run. Groups the
    fold pass handles by tensor alone (FSBR's q/k and SwiGLU groups) have no single producer node and are
    refused here.
    """
    aten = torch.ops.aten
    linears = _linears_by_name(cg)
    params = cg.parameter_nodes()
    nodes = {n.name: n for n in cg.gm.graph.nodes}
    graph = cg.gm.graph
    inserted = 0
    for k, g in enumerate(plan.groups):
        if g.producer_node is None or g.producer_node not in nodes:
            raise PassError(f"group {g.name!r} ({g.kind}) has no producer node to divide by s",
                            "insert_scale_nodes handles norm and linear-pair groups only")
        s = scales[g.name].detach()
        out_node = nodes[g.producer_node]
        width = g.size if g.kind == "norm" else linears[g.producer_node].out_features
        lo, hi = g.channels
        inv = torch.ones(width, dtype=s.dtype)
        inv[lo:hi] = 1.0 / s
        inv_node = cg.add_tensor(f"teq_inv_scale_{k}", inv)
        users = list(out_node.users)
        with graph.inserting_after(out_node):
            div = graph.call_function(aten.mul.Tensor, (out_node, inv_node))
        div.meta["val"] = out_node.meta.get("val")
        fxmeta(div)["teq"] = {"group": g.name, "side": "producer"}
        for u in users:
            u.replace_input_with(out_node, div)
        inserted += 1
        for j, site in enumerate(site for site in g.sites if site.power > 0):
            w_node = params[site.fqn]
            view = [1, 1]
            view[site.axis] = -1
            s_node = cg.add_tensor(f"teq_scale_{k}_{j}", s[site.index].reshape(view))
            order = {n: i for i, n in enumerate(graph.nodes)}
            first = min((u for u in w_node.users), key=order.__getitem__)
            with graph.inserting_before(first):
                mul = graph.call_function(aten.mul.Tensor, (w_node, s_node))
            mul.meta["val"] = w_node.meta.get("val")
            fxmeta(mul)["teq"] = {"group": g.name, "side": "consumer"}
            for u in [u for u in w_node.users if u is not mul]:
                u.replace_input_with(w_node, mul)
            inserted += 1
    graph.lint()
    cg.gm.recompile()
    return inserted
