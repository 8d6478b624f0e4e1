"""analyze_structure — find where equivalent transforms may go (analysis only; the graph is not changed).

TEQ and FSBR put a per-channel scale ``s`` between a *producer* that can absorb ``1/s`` and the *consumer*
linears that absorb ``s`` (METHODS.md §1-2). This pass finds those places in the ATen graph by what the ops
compute, not by parameter names:

* **norm -> linear groups**: RMSNorm (``aten.rms_norm``, or decomposed ``x * rsqrt(mean(x²) + eps) * w`` as
  HF LLaMA-family models export it) and LayerNorm (``layer_norm`` / ``native_layer_norm``) whose output is
  read by linears. ``exclusive`` says whether the linears are the *only* readers: a post-LN encoder's norm
  also feeds the residual, so folding into it would change that path too.
* **linear -> linear pairs**: a producer's output channels reach a consumer linear along paths on which
  every op is linear per channel in that input (see ``_Walker``): shape ops, multiplication by a tensor that
  does not depend on those channels (SwiGLU's ``silu(gate) * up``), the value input of attention, and
  positively homogeneous ReLU. GELU, SiLU, tanh, softmax, adds and the like stop a pair. Fused producers
  (``qkv_proj``, ``gate_up_proj``, GPT-2's ``c_attn``) are split into the channel ranges their outputs are
  sliced into, and each range is judged on its own.
* **attention** (``scaled_dot_product_attention`` or ``matmul -> softmax -> matmul``) with its q/k/v/o
  linears, heads, kv heads and head size; **gated MLPs** (SwiGLU: ``act(gate) * up -> down``); **RoPE**
  (rotate-half: ``x*cos + cat(-x2, x1)*sin``) and which of q/k it rotates; **residual adds** (``x + f(x)``
  where ``f`` contains a linear).

Results go to ``ctx.artifacts["structure"]`` (a :class:`Structure`) and to ``fxmeta(node)["structure"]``;
anything the pass could not place is listed in ``Structure.unclassified`` with a reason.
"""
from __future__ import annotations

import logging
import re
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import networkx as nx
from torch import fx

from fxquant.capture import CapturedGraph, fxmeta
from fxquant.errors import PassError
from fxquant.graphview import (LinearOp, as_linear, build_graphview, concrete_shape, flat_tensor_args,
                               is_identity, is_tensor, op_name, tensor_users, tensor_val, walk_back_shape_ops)
from fxquant.pipeline import Pass, PassContext, PassResult

log = logging.getLogger("fxquant")

Range = tuple[int, int]


# ---- records ---------------------------------------------------------------------------------------------
@dataclass
class NormGroup:
    """A norm whose output is read by one or more linears (TEQ/FSBR: the norm absorbs ``1/s``)."""

    norm: str                       # fx node whose value the linears read (after the weight multiply)
    kind: str                       # "rmsnorm" | "layernorm"
    form: str                       # "aten.layer_norm" | "aten.native_layer_norm" | "aten.rms_norm" | "decomposed"
    weight: str | None              # FQN of the norm's weight (None for a weightless norm)
    bias: str | None
    consumers: list[str]            # FQNs of the consumer linears' weights
    consumer_nodes: list[str]
    exclusive: bool                 # the consumers are the only readers of the norm output
    other_users: list[str]          # readers that are not consumer linears (e.g. a post-LN residual)
    final: bool = False             # consumers are the model's last linears (lm_head)
    layer: int | None = None
    weight_offset: float = 0.0      # the gain is ``offset + weight`` (Gemma's ``1 + w``): folds must keep the offset


@dataclass
class LinearPair:
    """Producer linear -> consumer linear, linear per channel of ``channels`` of the producer's output."""

    producer: str
    consumer: str
    producer_node: str
    consumer_node: str
    channels: Range                 # producer output channels [start, end) this pair scales
    kind: str                       # "attention" (through attention's value input) | "gated" | "activation" | "linear"
    through: list[str]              # the non-shape ops on the path, in order of first appearance
    n_rep: int = 1                  # consumer input channels reading each producer channel (GQA: heads/kv_heads)
    head_dim: int | None = None
    positive_scales_only: bool = False  # a ReLU on the path: only s > 0 commutes with it
    layer: int | None = None


@dataclass
class RejectedPair:
    """Why a producer's channel range does not pair with the linears downstream of it."""

    producer: str
    producer_node: str
    channels: Range
    blocked_at: str
    reason: str


@dataclass
class SwiGLU:
    """A gated MLP ``down(act(gate(x)) * up(x))``; SwiGLU when ``act`` is silu. Fused gate/up share a weight."""

    gate: str
    up: str
    down: str | None
    gate_node: str
    up_node: str
    down_node: str | None
    mul: str
    act: str
    gate_channels: Range
    up_channels: Range
    layer: int | None = None
    act_node: str | None = None     # the activation node (``act`` is its kind)


@dataclass
class Attention:
    """One attention: projections (FQNs; a fused qkv appears three times with its ranges), heads, form."""

    core: str                       # the sdpa node, or the ``softmax(...) @ v`` matmul
    form: str                       # "sdpa" | "matmul_softmax"
    q: str | None
    k: str | None
    v: str | None
    o: str | None
    q_node: str | None
    k_node: str | None
    v_node: str | None
    o_node: str | None
    q_channels: Range | None
    k_channels: Range | None
    v_channels: Range | None
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    n_rep: int | None
    layer: int | None = None


@dataclass
class RoPE:
    """Rotary embedding (rotate-half form) applied to an attention's q and/or k."""

    attention: str | None           # the attention's core node
    targets: list[str]              # subset of ["q", "k"]
    nodes: list[str]                # the add nodes that produce the rotated tensors
    head_dim: int | None
    rotary_dim: int | None
    layer: int | None = None


@dataclass
class ResidualAdd:
    """``skip + branch`` where the branch is computed from the skip through at least one linear."""

    node: str
    skip: str
    branch: str
    branch_kind: str                # "attention" | "mlp"
    layer: int | None = None


@dataclass
class Unclassified:
    node: str
    what: str                       # "linear" | "norm" | "attention" | "rope"
    reason: str
    fqn: str | None = None


@dataclass
class Structure:
    """Everything :class:`AnalyzeStructure` found. Node names are FX node names of the captured graph."""

    model_class: str = ""
    norm_groups: list[NormGroup] = field(default_factory=list)
    pairs: list[LinearPair] = field(default_factory=list)
    rejected_pairs: list[RejectedPair] = field(default_factory=list)
    swiglus: list[SwiGLU] = field(default_factory=list)
    attentions: list[Attention] = field(default_factory=list)
    ropes: list[RoPE] = field(default_factory=list)
    residuals: list[ResidualAdd] = field(default_factory=list)
    unclassified: list[Unclassified] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Per-kind counters; ``norm_groups`` excludes final groups so per-layer counts stay exact."""
        kinds = ("attention", "gated", "activation", "linear")
        pairs_by_kind = {k: sum(p.kind == k for p in self.pairs) for k in kinds}
        return {
            "norm_groups": sum(not g.final for g in self.norm_groups),
            "final_norm_groups": sum(g.final for g in self.norm_groups),
            "pairs": len(self.pairs),
            **{f"pairs_{k}": v for k, v in pairs_by_kind.items()},
            "swiglu": len(self.swiglus),
            "attention": len(self.attentions),
            "rope": len(self.ropes),
            "residual_adds": len(self.residuals),
            "unclassified": len(self.unclassified),
        }

    def fqns(self) -> set[str]:
        """Every parameter FQN the records name (the pass ensures each exists in the graph)."""
        out: set[str] = set()
        for g in self.norm_groups:
            out.update(x for x in (g.weight, g.bias, *g.consumers) if x)
        for p in self.pairs:
            out.update((p.producer, p.consumer))
        for s in self.swiglus:
            out.update(x for x in (s.gate, s.up, s.down) if x)
        for a in self.attentions:
            out.update(x for x in (a.q, a.k, a.v, a.o) if x)
        out.update(u.fqn for u in self.unclassified if u.fqn)
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["counts"] = self.counts()
        return data

    def render(self) -> str:
        """A stable, readable listing (used by golden tests and the debug report)."""
        c = self.counts()
        lines = [f"structure of {self.model_class or 'graph'}: "
                 + ", ".join(f"{k}={v}" for k, v in c.items() if v or k in ("norm_groups", "pairs", "unclassified"))]
        if self.norm_groups:
            lines.append("norm groups:")
            for g in self.norm_groups:
                flags = "".join([" final" if g.final else "", "" if g.exclusive else f" shared-with={g.other_users}"])
                lines.append(f"  {g.kind}[{g.form}] {g.weight or '(no weight)'} -> {', '.join(g.consumers)}{flags}")
        if self.pairs:
            lines.append("linear pairs:")
            for p in self.pairs:
                extra = f" n_rep={p.n_rep}" + (f" head_dim={p.head_dim}" if p.head_dim else "")
                extra += " positive-only" if p.positive_scales_only else ""
                lines.append(f"  {p.kind}: {p.producer}[{p.channels[0]}:{p.channels[1]}] -> {p.consumer}"
                             f" via {'/'.join(p.through) or 'shape ops'}{extra}")
        if self.rejected_pairs:
            lines.append("not paired:")
            for r in self.rejected_pairs:
                lines.append(f"  {r.producer}[{r.channels[0]}:{r.channels[1]}]: {r.reason}")
        for a in self.attentions:
            lines.append(f"attention[{a.form}] heads={a.num_heads} kv_heads={a.num_kv_heads} head_dim={a.head_dim}"
                         f" q={a.q} k={a.k} v={a.v} o={a.o}")
        for s in self.swiglus:
            lines.append(f"gated mlp[{s.act}] gate={s.gate}[{s.gate_channels[0]}:{s.gate_channels[1]}]"
                         f" up={s.up}[{s.up_channels[0]}:{s.up_channels[1]}] down={s.down}")
        for r in self.ropes:
            lines.append(f"rope on {'+'.join(r.targets)} rotary_dim={r.rotary_dim} head_dim={r.head_dim}"
                         f" (layer {r.layer})")
        for r in self.residuals:
            lines.append(f"residual[{r.branch_kind}] {r.skip} + {r.branch} (layer {r.layer})")
        for u in self.unclassified:
            lines.append(f"unclassified {u.what} {u.fqn or u.node}: {u.reason}")
        return "\n".join(lines) + "\n"


def render_annotations(gm: fx.GraphModule) -> str:
    """One line per node the pass annotated: ``name  target  {annotation}`` (graph order, sorted keys)."""
    lines = []
    for node in gm.graph.nodes:
        info = node.meta.get("fxquant", {}).get("structure")
        if info:
            shown = ", ".join(f"{k}={info[k]}" for k in sorted(info))
            lines.append(f"{node.name:<28} {op_name(node) or node.op:<10} {shown}")
    return "\n".join(lines) + ("\n" if lines else "")


# ---- the per-channel linearity walk ----------------------------------------------------------------------
@dataclass(frozen=True)
class _Chan:
    """Where the producer's channels sit in the current tensor.

    ``kinds[i]`` is ``"c"`` (producer channels), ``"r"`` (a broadcast copy, e.g. GQA's expanded kv axis) or
    ``"t"`` (anything else: batch, tokens). ``lo, hi`` are the producer channels present while they are still
    one unmoved axis (``moved`` False); ``rep`` counts the copies of each channel merged into the channel axis.
    """

    kinds: tuple[str, ...]
    lo: int
    hi: int
    moved: bool = False
    rep: int = 1


@dataclass
class _Outcome:
    consumers: list[tuple[fx.Node, _Chan]] = field(default_factory=list)
    blockers: list[tuple[fx.Node, str]] = field(default_factory=list)
    through: list[str] = field(default_factory=list)
    positive_only: bool = False
    head_dim: int | None = None
    #: channel-slice nodes seen on the unmoved channel axis -> producer channels they carry
    slices: dict[str, Range] = field(default_factory=dict)


def _gain_of(node: object) -> tuple[object, float]:
    """A norm gain ``w`` or ``c + w`` (``add`` of the weight, through casts, and a Python number): (w, c)."""
    if isinstance(node, fx.Node) and op_name(node) == "add" and len(node.args) == 2 \
            and node.kwargs.get("alpha", 1) == 1:
        a, b = node.args
        for t, c in ((a, b), (b, a)):
            if isinstance(c, (int, float)) and not isinstance(c, bool) and isinstance(t, fx.Node):
                return walk_back_shape_ops(t), float(c)
    return node, 0.0


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _reshape_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Group the axes of a reshape from ``a`` to ``b`` into runs with equal products."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        gi, gj = [], []
        pa = pb = 1
        if i < len(a):
            gi.append(i); pa = a[i]; i += 1  # noqa: E702
        if j < len(b):
            gj.append(j); pb = b[j]; j += 1  # noqa: E702
        while pa != pb:
            if pa < pb:
                if i >= len(a):
                    return None
                gi.append(i); pa *= a[i]; i += 1  # noqa: E702
            else:
                if j >= len(b):
                    return None
                gj.append(j); pb *= b[j]; j += 1  # noqa: E702
        groups.append((gi, gj))
    return groups


def _split_pieces(node: fx.Node, size: int) -> list[Range] | None:
    """The [start, end) pieces a split/chunk/split_with_sizes node cuts an axis of ``size`` into."""
    name = op_name(node)
    arg = node.args[1]
    if name == "chunk":
        chunks = int(arg)
        step = -(-size // chunks)
        bounds = list(range(0, size, step)) + [size]
    elif name in ("split", "split_with_sizes", "split_copy"):
        if isinstance(arg, (list, tuple)):
            bounds = [0]
            for s in arg:
                bounds.append(bounds[-1] + int(s))
        else:
            step = int(arg)
            bounds = list(range(0, size, step)) + [size]
    else:
        return None
    return [(bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]


def _split_dim(node: fx.Node) -> int:
    if len(node.args) > 2:
        return int(node.args[2])
    return int(node.kwargs.get("dim", 0))


_RELU_LIKE = {"relu", "relu_", "leaky_relu", "leaky_relu_"}
_VIEW_OPS = {"view", "_unsafe_view", "reshape", "flatten", "unflatten", "view_copy"}


class _Walker:
    """Follows a producer's output channels forward and judges every op on the way.

    A per-channel scale ``s`` commutes with an op ``f`` in input ``x`` when ``f(x ⊙ s) = f(x) ⊙ s'`` with ``s'``
    the same scales re-indexed. That holds for data movement, for multiplication by a tensor independent of
    ``x``'s scaled channels, for the value input of attention (``softmax(qkᵀ) v`` mixes tokens, not channels)
    and for positively homogeneous ReLU (``s > 0``). A consumer linear then absorbs ``s'`` in its input
    channels. Everything else (add, GELU, SiLU, softmax, norms, graph output) blocks.
    """

    def __init__(self, linears: dict[fx.Node, LinearOp], producer: fx.Node, out_features: int,
                 tracked: Range | None, depends: Callable[[fx.Node], bool]):
        self.linears = linears
        self.producer = producer
        self.out_features = out_features
        self.tracked = tracked
        #: does a node's value depend on the tracked channels of the producer?
        self.depends = depends
        self.out = _Outcome()

    def run(self) -> _Outcome:
        ndim = len(concrete_shape(self.producer) or ())
        start = _Chan(tuple(["t"] * (ndim - 1) + ["c"]), 0, self.out_features)
        todo: deque[tuple[fx.Node, _Chan]] = deque([(self.producer, start)])
        seen: set[tuple[str, _Chan]] = set()
        while todo:
            node, chan = todo.popleft()
            if (node.name, chan) in seen:
                continue
            seen.add((node.name, chan))
            for user in tensor_users(node):
                for nxt, nchan in self._step(node, chan, user):
                    todo.append((nxt, nchan))
        return self.out

    # -- helpers
    def _block(self, node: fx.Node, reason: str) -> list:
        self.out.blockers.append((node, reason))
        return []

    def _note(self, what: str) -> None:
        if what not in self.out.through:
            self.out.through.append(what)

    def _slice_channels(self, user: fx.Node, chan: _Chan, a: int, b: int) -> list:
        """A cut of the unmoved channel axis: producer channels [lo+a, lo+b)."""
        lo, hi = chan.lo + a, chan.lo + min(b, chan.hi - chan.lo)
        self.out.slices[user.name] = (lo, hi)
        if self.tracked is not None:
            t0, t1 = self.tracked
            if hi <= t0 or lo >= t1:
                return []  # carries none of the tracked channels: not on the path
            if not (lo <= t0 and t1 <= hi):
                return self._block(user, f"{op_name(user)} cuts through the channel range [{t0}:{t1}]")
        return [(user, _Chan(chan.kinds, lo, hi, chan.moved, chan.rep))]

    # -- one op
    def _step(self, node: fx.Node, chan: _Chan, user: fx.Node) -> list[tuple[fx.Node, _Chan]]:
        if user.op == "output":
            return self._block(user, "reaches the graph output")
        name = op_name(user)
        positions = [i for i, a in flat_tensor_args(user) if a is node]
        if len(positions) > 1:
            return self._block(user, f"{name} uses the value twice (not linear)")
        pos = positions[0] if positions else -1
        kinds = chan.kinds
        lin = self.linears.get(user)
        if lin is not None and lin.input is node:
            return self._consume(user, chan)
        if is_identity(user):
            return [(user, chan)]
        shape_in = concrete_shape(node) or ()
        shape_out = concrete_shape(user) or ()
        if name in _VIEW_OPS:
            return self._reshape(user, chan, shape_in, shape_out)
        if name in ("transpose", "t"):
            d0, d1 = (0, 1) if name == "t" else (_norm_dim(int(user.args[1]), len(kinds)),
                                                 _norm_dim(int(user.args[2]), len(kinds)))
            k = list(kinds)
            k[d0], k[d1] = k[d1], k[d0]
            moved = chan.moved or ("c" in (kinds[d0], kinds[d1]) and d0 != d1)
            return [(user, _Chan(tuple(k), chan.lo, chan.hi, moved, chan.rep))]
        if name == "permute":
            dims = [_norm_dim(int(d), len(kinds)) for d in user.args[1]]
            k = tuple(kinds[d] for d in dims)
            moved = chan.moved or k.index("c") != kinds.index("c")
            return [(user, _Chan(k, chan.lo, chan.hi, moved, chan.rep))]
        if name == "unsqueeze":
            d = _norm_dim(int(user.args[1]), len(kinds) + 1)
            return [(user, _Chan(kinds[:d] + ("t",) + kinds[d:], chan.lo, chan.hi, chan.moved, chan.rep))]
        if name == "squeeze":
            k = [kd for kd, size_in in zip(kinds, shape_in) if not (size_in == 1 and len(shape_out) < len(shape_in))]
            if len(k) != len(shape_out):
                return self._block(user, "squeeze with an unexpected result shape")
            return [(user, _Chan(tuple(k), chan.lo, chan.hi, chan.moved, chan.rep))]
        if name == "expand":
            lead = len(shape_out) - len(shape_in)
            k = ["t"] * lead + list(kinds)
            for i, size_in in enumerate(shape_in):
                if size_in == 1 and shape_out[lead + i] > 1:
                    k[lead + i] = "r"  # a broadcast copy of the value (GQA's repeat_kv)
            return [(user, _Chan(tuple(k), chan.lo, chan.hi, chan.moved, chan.rep))]
        if name == "slice":
            dim = _norm_dim(int(user.args[1]) if len(user.args) > 1 else 0, len(kinds))
            if kinds[dim] != "c":
                return [(user, chan)]
            if chan.moved or kinds.count("c") > 1:
                return self._block(user, "slices producer channels after they were reshaped")
            start = user.args[2] if len(user.args) > 2 else 0
            end = user.args[3] if len(user.args) > 3 else None
            size = shape_in[dim]
            a = 0 if start is None else max(0, min(int(start) if int(start) >= 0 else int(start) + size, size))
            b = size if end is None else max(0, min(int(end) if int(end) >= 0 else int(end) + size, size))
            if len(user.args) > 4 and user.args[4] not in (1, None):
                return self._block(user, "strided slice of producer channels")
            return self._slice_channels(user, chan, a, b)
        if name in ("split", "split_with_sizes", "chunk"):
            dim = _norm_dim(_split_dim(user), len(kinds))
            out: list[tuple[fx.Node, _Chan]] = []
            pieces = _split_pieces(user, shape_in[dim]) if kinds[dim] == "c" else None
            if kinds[dim] == "c" and (chan.moved or pieces is None or kinds.count("c") > 1):
                return self._block(user, "splits producer channels after they were reshaped")
            for item in tensor_users(user):
                if op_name(item) != "getitem":
                    return self._block(item, f"{name} result used as a tuple")
                index = int(item.args[1])
                if pieces is None:
                    out.append((item, chan))
                else:
                    out.extend(self._slice_channels(item, chan, *pieces[index]))
            return out
        if name == "select":
            dim = _norm_dim(int(user.args[1]), len(kinds))
            if kinds[dim] == "c":
                return self._block(user, "selects one producer channel")
            return [(user, _Chan(kinds[:dim] + kinds[dim + 1:], chan.lo, chan.hi, chan.moved, chan.rep))]
        if name in ("mul", "div"):
            if name == "div" and pos != 0:
                return self._block(user, "divides by the value (not linear)")
            others = [a for i, a in flat_tensor_args(user) if a is not node]
            if any(self.depends(o) for o in others):
                return self._block(user, f"{name} of two tensors that both depend on the producer's channels")
            if any(is_tensor(o) and (concrete_shape(o) or ()) != () for o in others):
                self._note(name)
            return [(user, self._broadcast(chan, shape_out))]
        if name == "neg":
            return [(user, chan)]
        if name in _RELU_LIKE:
            slope = user.args[1] if name.startswith("leaky") and len(user.args) > 1 else 0.0
            if slope is not None and float(slope) < 0:
                return self._block(user, "leaky_relu with a negative slope")
            self.out.positive_only = True
            self._note(name)
            return [(user, chan)]
        if name == "scaled_dot_product_attention":
            if pos != 2:
                return self._block(user, f"is attention's {('query', 'key')[pos] if pos in (0, 1) else 'mask'} input "
                                         "(softmax of qkᵀ is not linear in it)")
            qk = [a for a in user.args[:2] if isinstance(a, fx.Node)]
            if any(self.depends(a) for a in qk):
                return self._block(user, "attention's query/key also depend on these channels")
            if kinds[-2] != "t":
                return self._block(user, "producer channels on attention's sequence axis")
            k = list(self._broadcast(chan, shape_out).kinds)
            rep = chan.rep
            q_heads = (concrete_shape(user.args[0]) or (0,) * 3)[-3]
            if user.kwargs.get("enable_gqa") and shape_in[-3] != q_heads and kinds[-3] == "c":
                rep *= q_heads // shape_in[-3]
            self._note("sdpa")
            self.out.head_dim = shape_in[-1]
            return [(user, _Chan(tuple(k), chan.lo, chan.hi, chan.moved, rep))]
        if name in ("matmul", "bmm"):
            if pos != 1:
                return self._block(user, f"{name} contracts the producer's channels with an activation")
            if self.depends(user.args[0]):
                return self._block(user, f"{name}'s other operand also depends on these channels")
            if kinds[-2] != "t":
                return self._block(user, f"{name} contracts over producer channels")
            self._note("matmul")
            self.out.head_dim = shape_in[-1]
            return [(user, self._broadcast(chan, shape_out))]
        return self._block(user, f"{name or user.op} is not linear per channel")

    def _broadcast(self, chan: _Chan, shape_out: tuple[int, ...]) -> _Chan:
        lead = len(shape_out) - len(chan.kinds)
        return _Chan(("t",) * max(0, lead) + chan.kinds, chan.lo, chan.hi, chan.moved, chan.rep)

    def _reshape(self, user: fx.Node, chan: _Chan, a: tuple[int, ...], b: tuple[int, ...]) -> list:
        groups = _reshape_groups(a, b)
        if groups is None:
            return self._block(user, "reshape with unmatched sizes")
        kinds_out = ["t"] * len(b)
        rep, moved = chan.rep, chan.moved
        for gi, gj in groups:
            # a size-1 token axis is neutral; a size-1 channel axis (one kv head) still carries channels
            ks = {chan.kinds[i] for i in gi if not (a[i] == 1 and chan.kinds[i] == "t")}
            if "c" not in ks:
                continue
            if "t" in ks:
                return self._block(user, "reshape mixes producer channels with token axes")
            wide = [j for j in gj if b[j] != 1]
            if len(wide) > 1 and (len([i for i in gi if a[i] != 1]) > 1):
                return self._block(user, "reshape regroups several channel axes")
            for i in gi:
                if chan.kinds[i] == "r":
                    rep *= a[i]
            for j in gj:  # size-1 axes included: one kv head is still a channel axis for GQA's merge
                kinds_out[j] = "c"
            if not (len(gi) == 1 and len(gj) == 1 and a[gi[0]] == b[gj[0]]):
                moved = True
        return [(user, _Chan(tuple(kinds_out), chan.lo, chan.hi, moved, rep))]

    def _consume(self, user: fx.Node, chan: _Chan) -> list:
        kinds = chan.kinds
        if kinds[-1] != "c" or kinds.count("c") != 1:
            return self._block(user, "producer channels are not the consumer's input channels")
        self.out.consumers.append((user, chan))
        return []


# ---- the pass --------------------------------------------------------------------------------------------
_NORM_OPS = {"layer_norm": "layernorm", "native_layer_norm": "layernorm", "rms_norm": "rmsnorm"}
_ACTS = {"silu": "silu", "gelu": "gelu", "relu": "relu", "sigmoid": "sigmoid"}
_SOFTMAX = {"softmax", "_softmax", "_safe_softmax"}


def _layer_of(fqn: str | None) -> int | None:
    """A display label only: the first integer component of a parameter name (``layers.3.`` -> 3)."""
    if not fqn:
        return None
    m = re.search(r"\.(\d+)\.", fqn)
    return int(m.group(1)) if m else None


class AnalyzeStructure(Pass):
    """Find norm->linear groups, per-channel-linear linear pairs, attention, gated MLPs, RoPE and residuals."""

    name = "analyze_structure"
    description = "find norm->linear groups, linear->linear pairs, attention, SwiGLU, RoPE, residual adds"

    def requires(self, cg: CapturedGraph, ctx: PassContext) -> None:
        if not any(n.op == "placeholder" and n.name in cg.fqn for n in cg.gm.graph.nodes):
            raise PassError("analyze_structure needs a captured graph with parameter placeholders",
                            "capture the model with fxquant.capture(model)")

    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        self._node_count = len(cg.gm.graph.nodes)
        analysis = _Analysis(cg)
        structure = analysis.run()
        ctx.artifacts["structure"] = structure
        ctx.artifacts["structure_view"] = analysis.labelled_view()
        counts = structure.counts()
        log.info("analyze_structure: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
        return PassResult(modified=False, stats=counts)

    def ensures(self, cg: CapturedGraph, ctx: PassContext) -> None:
        expected = getattr(self, "_node_count", None)
        if expected is not None and len(cg.gm.graph.nodes) != expected:
            raise PassError(f"analyze_structure changed the graph ({expected} -> {len(cg.gm.graph.nodes)} nodes)",
                            "an analysis pass must not rewrite the graph")
        structure = ctx.artifacts.get("structure")
        if not isinstance(structure, Structure):
            raise PassError("analyze_structure left no Structure in ctx.artifacts['structure']", "report a bug")
        known = set(cg.fqn.values())
        missing = sorted(structure.fqns() - known)
        if missing:
            raise PassError(f"analyze_structure recorded parameter names not in the graph: {missing[:5]}",
                            "report a bug")


class _Analysis:
    """One run of the analysis over a captured graph (state shared by the finders)."""

    def __init__(self, cg: CapturedGraph):
        self.cg = cg
        self.graph = cg.gm.graph
        self.view = build_graphview(cg.gm, cg.fqn)
        self.nodes = {n.name: n for n in self.graph.nodes}
        self.is_param: Callable[[fx.Node], bool] = lambda n: n.op == "placeholder" and n.name in cg.tensors
        self.linears: dict[fx.Node, LinearOp] = {}
        for node in self.graph.nodes:
            lin = as_linear(node, self.is_param) if node.op == "call_function" else None
            if lin is not None:
                self.linears[node] = lin
        self.s = Structure(model_class=cg.model_class)
        self.norm_outputs: dict[fx.Node, dict[str, Any]] = {}
        self.slices: dict[fx.Node, dict[str, Range]] = {}
        self.residual_nodes: set[fx.Node] = set()
        self.linear_desc: dict[fx.Node, bool] = {}
        self.order: dict[fx.Node, int] = {n: i for i, n in enumerate(self.graph.nodes)}

    def labelled_view(self) -> nx.DiGraph:
        """The networkx view with each node's ``structure`` annotation as a node attribute (for reports)."""
        labels = {n.name: n.meta["fxquant"]["structure"] for n in self.graph.nodes
                  if "structure" in n.meta.get("fxquant", {})}
        nx.set_node_attributes(self.view, labels, "structure")
        return self.view

    # -- small helpers
    def fqn(self, node: fx.Node | None) -> str | None:
        return None if node is None else self.cg.fqn.get(node.name)

    def wfqn(self, lin: LinearOp) -> str:
        return self.fqn(lin.weight) or lin.weight.name

    def meta(self, node: fx.Node) -> dict[str, Any]:
        return fxmeta(node).setdefault("structure", {})

    def run(self) -> Structure:
        self.find_norms()
        self.find_pairs()
        self.find_norm_groups()
        self.find_residuals()
        self.find_attention_and_rope()
        self.find_swiglu()
        self.find_unclassified_linears()
        return self.s

    # -- norms
    def find_norms(self) -> None:
        for node in self.graph.nodes:
            name = op_name(node)
            if name in _NORM_OPS:
                out = node
                if name == "native_layer_norm":
                    getters = [u for u in node.users if op_name(u) == "getitem" and u.args[1] == 0]
                    if not getters:
                        continue
                    out = getters[0]
                weight = node.args[2] if len(node.args) > 2 else None
                bias = node.args[3] if name != "rms_norm" and len(node.args) > 3 else None
                self.norm_outputs[out] = {"kind": _NORM_OPS[name], "form": f"aten.{name}",
                                          "weight": weight if isinstance(weight, fx.Node) else None,
                                          "bias": bias if isinstance(bias, fx.Node) else None}
            elif name == "rsqrt":
                found = self._decomposed_rms(node)
                if found is not None:
                    self.norm_outputs[found[0]] = {"kind": "rmsnorm", "form": "decomposed", "weight": found[1],
                                                   "bias": None, "offset": found[2]}
        for out, info in self.norm_outputs.items():
            self.meta(out)["norm"] = {"kind": info["kind"], "weight": self.fqn(info["weight"])}
            if info.get("offset"):
                self.meta(out)["norm"]["weight_offset"] = info["offset"]

    def _decomposed_rms(self, rsqrt: fx.Node) -> tuple[fx.Node, fx.Node | None, float] | None:
        """``x * rsqrt(mean(x², -1) + eps)`` [``* w`` or ``* (c + w)``]: returns (norm output, weight placeholder,
        the gain's offset ``c``: Gemma's ``1 + w``, else 0)."""
        inner = rsqrt.args[0]
        if isinstance(inner, fx.Node) and op_name(inner) == "add":
            inner = next((a for a in inner.args if isinstance(a, fx.Node)), None)
        if not isinstance(inner, fx.Node) or op_name(inner) != "mean":
            return None
        sq = inner.args[0]
        if not isinstance(sq, fx.Node):
            return None
        if op_name(sq) == "pow" and sq.args[1] == 2:
            x = sq.args[0]
        elif op_name(sq) == "mul" and sq.args[0] is sq.args[1]:
            x = sq.args[0]
        else:
            return None
        dims = inner.args[1] if len(inner.args) > 1 else None
        ndim = len(concrete_shape(x) or ())
        if not dims or [_norm_dim(int(d), ndim) for d in dims] != [ndim - 1]:
            return None
        x0 = walk_back_shape_ops(x)
        normed = None
        for user in rsqrt.users:
            if op_name(user) == "mul":
                other = user.args[0] if user.args[1] is rsqrt else user.args[1]
                if walk_back_shape_ops(other) is x0:
                    normed = user
        if normed is None:
            return None
        out = normed
        while True:
            users = tensor_users(out)
            if len(users) == 1 and is_identity(users[0]):
                out = users[0]
                continue
            break
        for user in tensor_users(out):
            if op_name(user) == "mul":
                other = user.args[0] if user.args[1] is out else user.args[1]
                w, offset = _gain_of(walk_back_shape_ops(other))
                if isinstance(w, fx.Node) and self.is_param(w) and len(concrete_shape(w) or ()) == 1:
                    return user, w, offset
        return out, None, 0.0

    # -- walking
    def _depends(self, producer: fx.Node, dead: set[str]) -> Callable[[fx.Node], bool]:
        """``node -> bool``: is ``producer`` upstream of ``node`` other than through ``dead`` nodes?

        The search runs backwards and never below the producer's position in the (topologically ordered)
        graph, so it stays within the few ops between the two instead of crossing the whole model.
        """
        floor = self.order[producer]
        cache: dict[fx.Node, bool] = {}

        def depends(node: object) -> bool:
            if not isinstance(node, fx.Node):
                return False
            if node in cache:
                return cache[node]
            seen: set[fx.Node] = set()
            todo, hit = [node], False
            while todo and not hit:
                n = todo.pop()
                if n is producer:
                    hit = True
                    break
                if n in seen or n.name in dead or self.order[n] < floor:
                    continue
                seen.add(n)
                todo.extend(n.all_input_nodes)
            cache[node] = hit
            return hit

        return depends

    def walk(self, producer: fx.Node, width: int, tracked: Range | None) -> _Outcome:
        slices = self.slices.get(producer, {})
        dead = set()
        if tracked is not None:
            dead = {n for n, (lo, hi) in slices.items() if hi <= tracked[0] or lo >= tracked[1]}
        return _Walker(self.linears, producer, width, tracked, self._depends(producer, dead)).run()

    def ranges_of(self, lin: LinearOp) -> list[Range]:
        """The channel ranges a (possibly fused) linear's output is cut into downstream."""
        discover = self.walk(lin.node, lin.out_features, None)
        self.slices[lin.node] = discover.slices
        bounds = {0, lin.out_features}
        for lo, hi in discover.slices.values():
            bounds.update((lo, hi))
        b = sorted(x for x in bounds if 0 <= x <= lin.out_features)
        return [(b[i], b[i + 1]) for i in range(len(b) - 1) if b[i + 1] > b[i]]

    def reaches_linear(self, node: fx.Node) -> bool:
        """Is any linear downstream of ``node``? (one reverse topological sweep, then a lookup)"""
        if not self.linear_desc:
            for n in reversed(self.graph.nodes):
                self.linear_desc[n] = any(u in self.linears or self.linear_desc.get(u, False) for u in n.users)
        return self.linear_desc[node]

    def _window(self, start: fx.Node, end: fx.Node) -> set[fx.Node]:
        """Nodes on some path from ``start`` to ``end`` (both included); empty if ``end`` does not depend on
        ``start``. Searches only between their positions in the graph, so a residual costs one block."""
        lo, hi = self.order[start], self.order[end]
        if lo >= hi:
            return set()
        up: set[fx.Node] = set()
        todo = [end]
        while todo:
            n = todo.pop()
            if n in up or self.order[n] < lo:
                continue
            up.add(n)
            todo.extend(n.all_input_nodes)
        if start not in up:
            return set()
        down: set[fx.Node] = set()
        todo = [start]
        while todo:
            n = todo.pop()
            if n in down or self.order[n] > hi or n not in up:
                continue
            down.add(n)
            todo.extend(n.users)
        return down

    # -- pairs
    def find_pairs(self) -> None:
        self.ranges: dict[fx.Node, list[Range]] = {}
        for node, lin in self.linears.items():
            ranges = self.ranges_of(lin)
            self.ranges[node] = ranges
            for rng in ranges:
                res = self.walk(node, lin.out_features, rng)
                if res.consumers and not res.blockers:
                    for cons, chan in res.consumers:
                        clin = self.linears[cons]
                        kind = ("attention" if {"sdpa", "matmul"} & set(res.through) else
                                "gated" if {"mul", "div"} & set(res.through) else
                                "activation" if res.positive_only else "linear")
                        pair = LinearPair(self.wfqn(lin), self.wfqn(clin), node.name, cons.name, rng, kind,
                                          list(res.through), chan.rep, res.head_dim, res.positive_only,
                                          _layer_of(self.fqn(lin.weight)))
                        index = len(self.s.pairs)
                        self.s.pairs.append(pair)
                        self.meta(node).setdefault("pairs_as_producer", []).append(index)
                        self.meta(cons).setdefault("pairs_as_consumer", []).append(index)
                else:
                    where, reason = res.blockers[0] if res.blockers else (node, "no consumer linear downstream")
                    self.s.rejected_pairs.append(RejectedPair(self.wfqn(lin), node.name, rng, where.name,
                                                              f"{where.name}: {reason}"))

    # -- norm groups
    def find_norm_groups(self) -> None:
        for out, info in self.norm_outputs.items():
            width = (concrete_shape(out) or (0,))[-1]
            res = self.walk(out, width, None)
            weight_fqn, bias_fqn = self.fqn(info["weight"]), self.fqn(info["bias"])
            if not res.consumers:
                reason = "no linear reads the norm output"
                if res.blockers:
                    reason += f" (readers: {', '.join(sorted({b.name for b, _ in res.blockers}))})"
                self.s.unclassified.append(Unclassified(out.name, "norm", reason, weight_fqn))
                continue
            cons = [c for c, _ in res.consumers]
            final = not any(self.reaches_linear(c) for c in cons)
            group = NormGroup(out.name, info["kind"], info["form"], weight_fqn, bias_fqn,
                              [self.wfqn(self.linears[c]) for c in cons], [c.name for c in cons],
                              not res.blockers, sorted({b.name for b, _ in res.blockers}), final,
                              _layer_of(weight_fqn) if not final else None, float(info.get("offset", 0.0)))
            index = len(self.s.norm_groups)
            self.s.norm_groups.append(group)
            self.meta(out)["norm"].update(group=index, final=final)
            for c in cons:
                self.meta(c)["norm_group"] = index
                if final:
                    self.meta(c).setdefault("role", "head")

    # -- residual adds
    def find_residuals(self) -> None:
        cores = {n for n in self.graph.nodes if op_name(n) in ({"scaled_dot_product_attention"} | _SOFTMAX)}
        for node in self.graph.nodes:
            if op_name(node) != "add" or len(node.args) < 2:
                continue
            a, b = node.args[0], node.args[1]
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                continue
            sa, sb, so = concrete_shape(a), concrete_shape(b), concrete_shape(node)
            val = tensor_val(node)
            if val is None or not val.is_floating_point() or not so or len(so) < 2 or sa != so or sb != so:
                continue
            for skip, branch in ((a, b), (b, a)):
                between = self._window(skip, branch)
                lins = sorted((n for n in between if n in self.linears), key=self.order.__getitem__)
                if not lins:
                    continue
                kind = "attention" if between & cores else "mlp"
                layer = _layer_of(self.fqn(self.linears[lins[0]].weight))
                index = len(self.s.residuals)
                self.s.residuals.append(ResidualAdd(node.name, skip.name, branch.name, kind, layer))
                self.meta(node)["residual"] = index
                self.residual_nodes.add(node)
                break

    # -- attention and RoPE
    def _back_to_linears(self, start: fx.Node) -> tuple[set[fx.Node], set[fx.Node]]:
        """Nearest linears upstream of ``start`` (and the nodes visited), stopping at norms, residuals,
        attention and softmax so that the search stays inside one projection's path."""
        found: set[fx.Node] = set()
        seen: set[fx.Node] = set()
        todo = [start]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in self.linears:
                found.add(n)
                continue
            if (n in self.norm_outputs or n in self.residual_nodes or n.op != "call_function"
                    or op_name(n) in ({"scaled_dot_product_attention", "embedding"} | _SOFTMAX)):
                continue
            todo.extend(n.all_input_nodes)
        return found, seen

    def _projection(self, arg: fx.Node, role: str, problems: list[str]) -> tuple[LinearOp | None, Range | None, set]:
        found, seen = self._back_to_linears(arg)
        if len(found) != 1:
            problems.append(f"{role}: {'no' if not found else len(found)} projection linears found")
            return None, None, seen
        node = next(iter(found))
        lin = self.linears[node]
        rng: Range = (0, lin.out_features)
        for sname, (lo, hi) in self.slices.get(node, {}).items():
            snode = self.nodes.get(sname)
            if snode in seen and (hi - lo) < (rng[1] - rng[0]):
                rng = (lo, hi)
        return lin, rng, seen

    def _attention_cores(self) -> list[tuple[fx.Node, str, fx.Node, fx.Node, fx.Node]]:
        """(core, form, q, k, v) for every sdpa and every ``softmax(q @ kᵀ ...) @ v``."""
        cores = []
        for node in self.graph.nodes:
            name = op_name(node)
            if name == "scaled_dot_product_attention":
                q, k, v = node.args[:3]
                cores.append((node, "sdpa", q, k, v))
            elif name in _SOFTMAX:
                scores = node.args[0]
                # scale, mask, and soft-cap (Gemma-2: c·tanh(s/c)) between the product and the softmax
                while isinstance(scores, fx.Node) and (op_name(scores) in ("add", "mul", "div", "sub", "tanh")
                                                       or is_identity(scores)):
                    scores = next((a for a in scores.args if isinstance(a, fx.Node)
                                   and op_name(a) in ("matmul", "bmm", "add", "mul", "div", "sub", "tanh", "to",
                                                      "_to_copy")),
                                  scores.args[0])
                if not isinstance(scores, fx.Node) or op_name(scores) not in ("matmul", "bmm"):
                    continue
                probs = node
                while len(tensor_users(probs)) == 1 and is_identity(tensor_users(probs)[0]):
                    probs = tensor_users(probs)[0]
                out = next((u for u in tensor_users(probs) if op_name(u) in ("matmul", "bmm") and u.args[0] is probs),
                           None)
                if out is not None:
                    cores.append((out, "matmul_softmax", scores.args[0], scores.args[1], out.args[1]))
        return cores

    def _rope_adds(self, visited: set[fx.Node]) -> tuple[list[fx.Node], int | None]:
        """Rotate-half RoPE adds among ``visited``: ``x*cos + cat([-x2, x1])*sin``."""
        adds, rot = [], None
        for n in visited:
            if op_name(n) != "add":
                continue
            muls = [a for a in n.args if isinstance(a, fx.Node) and op_name(a) == "mul"]
            if len(muls) != 2:
                continue
            for m_rot, m_id in ((muls[0], muls[1]), (muls[1], muls[0])):
                cat = next((a for a in m_rot.args if isinstance(a, fx.Node) and op_name(a) == "cat"), None)
                if cat is None:
                    continue
                parts = cat.args[0]
                if len(parts) != 2 or op_name(parts[0]) != "neg":
                    continue
                hi_slice, lo_slice = parts[0].args[0], parts[1]
                if op_name(hi_slice) != "slice" or op_name(lo_slice) != "slice":
                    continue
                x = walk_back_shape_ops(lo_slice.args[0])
                if walk_back_shape_ops(hi_slice.args[0]) is not x:
                    continue
                if not any(isinstance(a, fx.Node) and walk_back_shape_ops(a) is x for a in m_id.args):
                    continue
                adds.append(n)
                rot = (concrete_shape(cat) or (None,))[-1]
                break
        return sorted(adds, key=lambda n: n.name), rot

    def find_attention_and_rope(self) -> None:
        for core, form, q, k, v in self._attention_cores():
            problems: list[str] = []
            ql, qr, qseen = self._projection(q, "q", problems)
            kl, kr, kseen = self._projection(k, "k", problems)
            vl, vr, _ = self._projection(v, "v", problems)
            o_node = None
            cur = core
            for _ in range(16):
                users = tensor_users(cur)
                hit = next((u for u in users if u in self.linears and self.linears[u].input is cur), None)
                if hit is not None:
                    o_node = hit
                    break
                shape_users = [u for u in users if op_name(u) in _VIEW_OPS | {"transpose", "permute", "contiguous",
                                                                              "clone", "alias", "to", "_to_copy"}]
                if len(shape_users) != 1:
                    break
                cur = shape_users[0]
            if o_node is None:
                problems.append("o: no output projection after the attention")
            qshape = concrete_shape(q) or ()
            heads = qshape[-3] if len(qshape) >= 3 else None
            head_dim = qshape[-1] if qshape else None
            kv_heads = None
            if kr is not None and head_dim:
                kv_heads = (kr[1] - kr[0]) // head_dim
            elif len(concrete_shape(k) or ()) >= 3:
                kv_heads = (concrete_shape(k) or ())[-3]
            n_rep = heads // kv_heads if heads and kv_heads else None
            olin = self.linears.get(o_node) if o_node is not None else None
            att = Attention(core.name, form, ql and self.wfqn(ql), kl and self.wfqn(kl), vl and self.wfqn(vl),
                            olin and self.wfqn(olin), ql and ql.node.name, kl and kl.node.name,
                            vl and vl.node.name, o_node and o_node.name, qr, kr, vr, heads, kv_heads, head_dim,
                            n_rep, _layer_of(self.fqn((ql or vl or olin).weight) if (ql or vl or olin) else None))
            index = len(self.s.attentions)
            self.s.attentions.append(att)
            self.meta(core)["attention"] = index
            fused = ql is not None and ql is kl and kl is vl
            for role, lin in (("q", ql), ("k", kl), ("v", vl), ("o", olin)):
                if lin is not None:
                    m = self.meta(lin.node)
                    m["attention"] = index
                    m["role"] = "qkv" if fused and role != "o" else role
            if problems:
                self.s.unclassified.append(Unclassified(core.name, "attention", "; ".join(problems)))
            # RoPE on this attention's q / k
            targets, adds, rot = [], [], None
            for role, seen in (("q", qseen), ("k", kseen)):
                found, r = self._rope_adds(seen)
                if found:
                    targets.append(role)
                    adds.extend(found)
                    rot = rot or r
            if targets:
                rope = RoPE(core.name, targets, [a.name for a in adds], head_dim, rot, att.layer)
                rindex = len(self.s.ropes)
                self.s.ropes.append(rope)
                for a in adds:
                    self.meta(a)["rope"] = rindex

    # -- gated MLPs
    def _act_input(self, node: fx.Node) -> tuple[str, fx.Node] | None:
        name = op_name(node)
        if name in _ACTS and name != "relu":
            return _ACTS[name], node.args[0]
        if name == "mul":  # x * sigmoid(x): SiLU written out
            a, b = node.args[0], node.args[1]
            for x, sg in ((a, b), (b, a)):
                if isinstance(sg, fx.Node) and op_name(sg) == "sigmoid" and sg.args[0] is x:
                    return "silu", x
        return None

    def _trace_linear(self, node: object) -> tuple[LinearOp, Range] | None:
        """The linear (and its output channel range) whose value ``node`` is, through shape ops and slices."""
        while isinstance(node, fx.Node):
            if node in self.linears:
                lin = self.linears[node]
                return lin, (0, lin.out_features)
            for lin_node, sl in self.slices.items():
                if node.name in sl:
                    return self.linears[lin_node], sl[node.name]
            if not (is_identity(node) or op_name(node) in _VIEW_OPS):
                return None
            node = node.args[0]
        return None

    def find_swiglu(self) -> None:
        for node in self.graph.nodes:
            if op_name(node) != "mul" or len(node.args) < 2:
                continue
            a, b = node.args[0], node.args[1]
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                continue
            for act_node, up_val in ((a, b), (b, a)):
                act = self._act_input(act_node)
                if act is None:
                    continue
                gate = self._trace_linear(act[1])
                up = self._trace_linear(up_val)
                if gate is None or up is None:
                    continue
                (glin, grng), (ulin, urng) = gate, up
                if walk_back_shape_ops(glin.input) is not walk_back_shape_ops(ulin.input) or (
                        glin is ulin and grng == urng):
                    continue
                down = next((self.linears[self.nodes[p.consumer_node]] for p in self.s.pairs
                             if p.producer_node == ulin.node.name and p.channels == urng), None)
                sw = SwiGLU(self.wfqn(glin), self.wfqn(ulin), down and self.wfqn(down), glin.node.name,
                            ulin.node.name, down and down.node.name, node.name, act[0], grng, urng,
                            _layer_of(self.fqn(glin.weight)), act_node.name)
                index = len(self.s.swiglus)
                self.s.swiglus.append(sw)
                fused = glin is ulin
                for role, lin in (("gate", glin), ("up", ulin), ("down", down)):
                    if lin is not None:
                        m = self.meta(lin.node)
                        m["swiglu"] = index
                        m["role"] = "gate_up" if fused and role != "down" else role
                self.meta(node)["swiglu"] = index
                break

    # -- what is left
    def find_unclassified_linears(self) -> None:
        for node, lin in self.linears.items():
            m = self.meta(node)
            if any(key in m for key in ("norm_group", "pairs_as_producer", "pairs_as_consumer", "attention", "swiglu")):
                continue
            src = walk_back_shape_ops(lin.input)
            src_name = (op_name(src) or src.op) if isinstance(src, fx.Node) else "?"
            reason = f"input comes from {src_name}; in no norm group, pair, attention or gated MLP"
            upstream, _ = self._back_to_linears(lin.input)
            blocked = [r for r in self.s.rejected_pairs if self.nodes[r.producer_node] in upstream]
            if blocked:
                reason += f"; upstream {blocked[0].producer} does not pair: {blocked[0].reason}"
            self.s.unclassified.append(Unclassified(node.name, "linear", reason, self.wfqn(lin)))
