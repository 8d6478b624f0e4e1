"""Integer-only lowering (I-LLM, METHODS.md §5): every layer of the model in integer arithmetic.

The pass rewrites the captured ATen graph so that the activations are quantized **once**, at the output of each
``aten.embedding`` (``fxquant::quantize_rows``, per token, 16 bits: the ``enter`` boundary), every op after it
runs on integer tensors through the ``fxquant::di_*`` ops and plain integer ATen ops, and the graph's outputs are
dequantized (``fxquant::dequantize``: the ``exit`` boundary). Float tensors computed from positions only (RoPE's
cos/sin tables) enter as 14-bit fixed point (``fxquant::quantize_fixed``); weights, norm gains and biases are
quantized once, here, to integer constants. :func:`fxquant.verify.verify_integer_only` then proves that no float
op or tensor is left between the boundaries.

**An integer value** in the rewritten graph is ``(q, m, k)`` — codes and a dyadic scale ``m·2^-k`` with size 1
along the dimensions over which it is constant (:class:`IntValue` tracks which dimensions those are, and an
identity ``key`` so that two values with provably the same scale add without alignment, as in RoPE).

**One rule per ATen op** (:data:`RULES`): a node that reads an integer value is lowered by the rule of its op,
or the pass stops with an error naming the op, the node and the rules that exist. Widths follow I-LLM's
allocation: linear inputs at ``act_bits`` (8 or 4), the residual stream and the other intermediates at
``inner_bits`` (16; I-LLM uses 8 for the norm/softmax/act inputs — ``inner_bits=8`` reproduces that),
attention operands at 8 bits, softmax output 8 bits unsigned.

==========================  ==================================================================================
ATen op                     integer rule
==========================  ==================================================================================
embedding                   (float table lookup) -> ``quantize_rows`` per token: the enter boundary
linear                      ``di_linear``: input requantized to ``act_bits``; weight codes from the RTN pass (or
                            RTN per channel here), per-channel multipliers; bias as an integer
RMSNorm (pow/mean/rsqrt)    ``di_rmsnorm`` (the decomposed pattern is matched as one unit at its ``rsqrt``)
layer_norm                  ``di_layernorm``
scaled_dot_product_attn     ``di_matmul`` (Q Kᵀ, per-key column multipliers) -> ``rescale`` (1/sqrt(d)) ->
                            ``di_clipped_softmax`` (bool/causal mask) -> ``di_matmul`` (P V, value scales
                            folded into P); causal attention (``is_causal``, or a boolean mask proven to be the
                            causal one) uses DI-MatMul's causal modes: no row depends on a key it does not see
matmul / bmm of two values  ``di_matmul`` (eager attention's Q Kᵀ and P V): left operand per row, right operand
                            per row (scale folded into the left's columns) or per column (Kᵀ), ``attn_bits``
add of a float mask         eager attention's ``scores + mask`` read only by a softmax: the mask's boolean form
                            (``mask_from_additive``, an enter boundary that refuses a position bias)
softmax                     ``di_clipped_softmax`` (with that mask), ``attn_bits`` unsigned
tanh                        ``di_tanh`` (Gemma-2's soft-caps; ``div`` by a number is scale-only, like ``mul``)
silu (·mul)                 ``di_swiglu`` when the SiLU feeds one product, else ``di_silu``
gelu                        ``di_gelu``
add                         same scale: integer add; else ``di_add`` (aligned, requantized to ``inner_bits``)
mul                         by an integer value: ``di_mul`` (exact); by a parameter: integer multiplier;
                            by a Python scalar: ``rescale``
view/reshape, transpose,    the same op on the codes and on the scale (a merge of dimensions whose scale
permute, unsqueeze, expand, differs is preceded by ``align_rows``)
slice, cat, neg, clone,
to/_to_copy (float), alias
==========================  ==================================================================================

**Causal masks and the KV cache.** transformers captures causal attention with an explicit boolean mask built from
positions. The pass evaluates such a mask (from parameters, buffers and the inputs' sizes only) at several lengths,
and just past a sliding window the config declares; if it is exactly ``tril`` it is replaced by the op's own causal
masking, and the graph becomes causal per token: a prefix's logits do not change when tokens follow. With
``kv_cache`` the past keys and values (int8 codes and their per-token scales, exactly as the attention reads them)
become inputs and their extensions outputs, and a ``past_length`` input shifts every ``arange`` over the sequence
(the positions); a decode step then gives the whole sequence's logits bit for bit. ``kv_cache="auto"`` (the
``illm-*`` recipes) adds the cache where every attention is causal SDPA and the positions come from such an
``arange``, and logs why not elsewhere (eager attention, a sliding window, positions counted from a mask).
"""
from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, replace
from typing import Any, Callable

import sympy as sp
import torch
from torch import fx

from fxquant.capture import CapturedGraph, fxmeta
from fxquant.errors import PassError
from fxquant.graphview import op_name
from fxquant.pipeline import Pass, PassContext, PassResult
from fxquant.verify import INTEGER_BOUNDARY  # the annotation the verifier reads: "enter" | "exit"

log = logging.getLogger("fxquant")

__all__ = ["IntegerOnlyConfig", "LowerIntegerOnly", "lower_integer_only", "RULES", "INTEGER_BOUNDARY",
           "LoweringError", "empty_kv_cache"]

aten = torch.ops.aten


class LoweringError(PassError):
    """The integer-only lowering met something it has no rule for."""


@dataclass
class IntegerOnlyConfig:
    """Widths and approximations of the integer-only graph."""

    act_bits: int = 8          # linear inputs (W·A8 / W·A4)
    weight_bits: int = 8       # weights that the pipeline did not quantize before (lm_head, or no RTN pass)
    inner_bits: int = 16       # residual stream, linear outputs, norm / activation / softmax inputs
    attn_bits: int = 8         # Q, K, V and the softmax output
    exp_order: int = 2         # 2^-f: 1 = I-LLM's shift-only 1 - f/2, 2 = quadratic
    softmax_clip: float = 15.0
    fixed_bits: int = 14       # fractional bits of position tables (RoPE cos/sin)
    gamma_bits: int = 16       # norm gains as 16-bit codes
    kv_cache: bool | str = False   # integer KV cache: past keys/values (codes + scales) in, the extended ones out;
                                   # "auto": when every attention allows one (causal SDPA), else none (logged)

    def __post_init__(self) -> None:
        for name in ("act_bits", "weight_bits", "inner_bits", "attn_bits"):
            v = getattr(self, name)
            if not 2 <= v <= 16:
                raise LoweringError(f"integer-only {name} must lie in 2..16, got {v}")
        if self.weight_bits > 8:
            raise LoweringError(f"integer-only weights are at most 8-bit codes, got weight_bits={self.weight_bits}")
        if self.exp_order not in (1, 2):
            raise LoweringError(f"exp_order must be 1 or 2, got {self.exp_order}")
        if self.kv_cache not in (True, False, "auto"):
            raise LoweringError(f"kv_cache must be true, false or 'auto', got {self.kv_cache!r}")


@dataclass
class IntValue:
    """An integer tensor in the rewritten graph: codes ``q`` and scale ``(m, k)`` nodes."""

    q: fx.Node
    m: fx.Node
    k: fx.Node
    bits: int                  # codes fit in this many bits (64: an exact int64 product)
    unsigned: bool
    vary: tuple[bool, ...]     # per dim of q: does the scale vary along it
    key: Any                   # equal keys <=> equal (m, k) values

    @property
    def ndim(self) -> int:
        return len(self.vary)


@dataclass
class _Deferred:
    """A SiLU whose only user is a product: lowered together with it as DI-SwiGLU."""

    gate: IntValue
    node: fx.Node


@dataclass
class _Masked:
    """Attention scores plus an additive mask (eager attention's ``scores + mask``), read only by a softmax:
    lowered with it as DI-ClippedSoftmax with the mask's boolean form."""

    scores: IntValue
    mask: fx.Node              # bool, True = attend (``fxquant::mask_from_additive`` of the float mask)


def _dims(node: Any) -> list[sp.Expr]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise LoweringError(f"node {getattr(node, 'name', node)} has no shape information (meta['val'])",
                            "lower a graph captured by fxquant.capture (torch.export keeps the shapes)")
    return [sp.Integer(d) if isinstance(d, int) else sp.sympify(d.node.expr) for d in val.shape]


def _same(a: sp.Expr, b: sp.Expr) -> bool:
    return sp.simplify(a - b) == 0


def _dtype(node: Any) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _di(name: str) -> Any:
    from fxquant.backends.di_ops import op  # noqa: PLC0415 - registers the custom ops on first use
    return op(name)


class _Lowering:
    def __init__(self, cg: CapturedGraph, cfg: IntegerOnlyConfig, quantized: dict[str, Any]):
        self.cg = cg
        self.cfg = cfg
        self.quantized = quantized
        self.g = cg.gm.graph
        self.env: dict[fx.Node, Any] = {}
        self.skip: set[fx.Node] = set()
        self.norms: dict[fx.Node, dict] = {}
        self.gelus: dict[fx.Node, fx.Node] = {}     # decomposed tanh-GELU: its output node -> its input
        self.stats: dict[str, int] = {}
        self.consts: dict[str, fx.Node] = {}
        self.keyseq = 0
        self.fixed: dict[fx.Node, IntValue] = {}
        self.masks: dict[fx.Node, fx.Node] = {}
        self.causal_masks: dict[fx.Node, bool] = {}
        self.kv: list[dict[str, Any]] = []          # per cached tensor: names, outputs, shapes (kv_cache)
        self.past_length: fx.Node | None = None

    # ---- emitting ---------------------------------------------------------------------------------------
    def call(self, target: Any, *args: Any, n_out: int = 0, boundary: str | None = None) -> Any:
        node = self.g.call_function(target, tuple(args))
        if boundary:
            fxmeta(node)[INTEGER_BOUNDARY] = boundary
        if not n_out:
            return node
        outs = []
        for i in range(n_out):
            gi = self.g.call_function(operator.getitem, (node, i))
            outs.append(gi)
        return tuple(outs)

    def new_key(self, tag: str) -> tuple:
        self.keyseq += 1
        return (tag, self.keyseq)

    def const(self, name: str, tensor: torch.Tensor) -> fx.Node:
        """An integer constant (weight codes, multipliers) as a new placeholder."""
        base = name.replace(".", "_")
        nm, i = base, 0
        while nm in self.cg.tensors or nm in self.consts:
            i += 1
            nm = f"{base}_{i}"
        node = self.cg.add_tensor(nm, tensor)
        self.consts[nm] = node
        return node

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    # ---- integer values -----------------------------------------------------------------------------------
    def value(self, q: fx.Node, m: fx.Node, k: fx.Node, bits: int, vary: tuple[bool, ...], *, unsigned: bool = False,
              key: Any = None, tag: str = "v") -> IntValue:
        return IntValue(q, m, k, bits, unsigned, vary, key if key is not None else self.new_key(tag))

    def requant(self, v: IntValue, bits: int, *, unsigned: bool = False) -> IntValue:
        """Per-row requantization (rows = all dims but the last) unless ``v`` already fits."""
        if v.vary[-1]:
            v = self.align(v, 1)
        if v.bits <= bits and v.unsigned == unsigned and all(v.vary[:-1]):
            return v
        q, m, k = self.call(_di("requantize_rows"), v.q, v.m, v.k, bits, unsigned, n_out=3)
        self.count("requantize_rows")
        return self.value(q, m, k, bits, tuple([True] * (v.ndim - 1) + [False]), unsigned=unsigned, tag="rq")

    def align(self, v: IntValue, ndims: int) -> IntValue:
        """One scale per row of the last ``ndims`` dims."""
        q, m, k = self.call(_di("align_rows"), v.q, v.m, v.k, ndims, n_out=3)
        self.count("align_rows")
        vary = tuple(list(v.vary[:-ndims]) + [False] * ndims)
        return self.value(q, m, k, 64, vary, tag="al")

    def enter_rows(self, x: fx.Node, bits: int) -> IntValue:
        q, m, k = self.call(_di("quantize_rows"), x, bits, False, n_out=3, boundary="enter")
        self.count("enter")
        nd = len(_dims(x))
        return self.value(q, m, k, bits, tuple([True] * (nd - 1) + [False]), tag="in")

    def enter_fixed(self, x: fx.Node) -> IntValue:
        bits = self.cfg.fixed_bits + 2
        q, m, k = self.call(_di("quantize_fixed"), x, self.cfg.fixed_bits, bits, n_out=3, boundary="enter")
        self.count("enter_fixed")
        nd = len(_dims(x))
        return self.value(q, m, k, bits, tuple([False] * nd), key=("fixed", self.cfg.fixed_bits))

    def as_value(self, a: Any, user: fx.Node) -> IntValue | None:
        """The integer value of argument ``a`` (a float tensor from outside the region enters as fixed point)."""
        if isinstance(a, fx.Node):
            v = self.env.get(a)
            if isinstance(v, _Deferred):
                v = self.emit_silu(v)
            if isinstance(v, IntValue):
                return v
            dt = _dtype(a)
            if dt is not None and dt.is_floating_point and a.op != "placeholder":
                if a not in self.fixed:
                    with self.g.inserting_before(a.next):
                        self.fixed[a] = self.enter_fixed(a)
                return self.fixed[a]
        return None

    def bool_mask(self, mask: fx.Node) -> fx.Node:
        """The boolean form of a float additive attention mask, made once per mask tensor (a runtime check refuses
        a mask that holds anything but 0 and large negative numbers: a position bias has no integer form)."""
        if mask not in self.masks:
            where = mask.next
            if mask.op == "placeholder":             # a mask given as an input: after the last placeholder
                where = next(n for n in self.g.nodes if n.op != "placeholder")
            with self.g.inserting_before(where):
                self.masks[mask] = self.call(_di("mask_from_additive"), mask, boundary="enter")
            self.count("mask_from_additive")
        return self.masks[mask]

    def input_placeholder(self, name: str) -> fx.Node:
        """A new user input, after every existing placeholder (its name is added to ``cg.user_inputs``)."""
        last = [n for n in self.g.nodes if n.op == "placeholder"][-1]
        with self.g.inserting_after(last):
            node = self.g.placeholder(name)
        self.cg.user_inputs.append(node.name)
        return node

    def mask_is_causal(self, mask: fx.Node) -> bool:
        """Whether a boolean attention mask is exactly the causal one: it must be computed from parameters,
        buffers and the inputs' shapes only, and evaluate to ``tril`` at several lengths (and just past a sliding
        window the config declares). Such a mask is replaced by the op's own causal masking."""
        if mask not in self.causal_masks:
            self.causal_masks[mask] = _probe_causal(self, mask)
        return self.causal_masks[mask]

    def kv_cached(self, v: IntValue, name: str, heads: int, dim: int) -> IntValue:
        """``cat(past, v)`` along the sequence for codes and scales; the past comes in as three new inputs, the
        concatenation goes out as three new outputs (the next step's past)."""
        names = [f"past_{name}_{part}" for part in ("q", "m", "k")]
        phs = [self.input_placeholder(n) for n in names]
        cats = [self.g.call_function(aten.cat.default, ([ph, x], -2)) for ph, x in zip(phs, (v.q, v.m, v.k))]
        self.kv.append({"name": name, "inputs": [p.name for p in phs], "outputs": cats, "heads": heads, "dim": dim,
                        "bits": v.bits, "unsigned": v.unsigned})
        self.count("kv_cache")
        return self.value(*cats, v.bits, v.vary, unsigned=v.unsigned, tag="kv")

    def emit_silu(self, d: _Deferred) -> IntValue:
        g = self.requant(d.gate, self.cfg.inner_bits)
        q, m, k = self.call(_di("di_silu"), g.q, g.m, g.k, self.cfg.exp_order, self.cfg.inner_bits, n_out=3)
        self.count("di_silu")
        v = self.value(q, m, k, self.cfg.inner_bits, g.vary, tag="silu")
        self.env[d.node] = v
        return v

    # ---- constants ----------------------------------------------------------------------------------------
    def param(self, node: Any) -> tuple[torch.Tensor, str] | None:
        if isinstance(node, fx.Node) and node.op == "placeholder" and node.name in self.cg.tensors:
            t = self.cg.tensors[node.name]
            if t.dtype.is_floating_point:
                return t, self.cg.fqn.get(node.name, node.name)
        return None

    def const_value(self, node: Any) -> tuple[torch.Tensor, str] | None:
        """A float constant of the model computed from parameters/buffers only: the parameter itself, or it through
        casts to a float dtype and arithmetic with Python numbers (Gemma's norm gain ``1 + w``, its embedding scale
        ``to(embed_scale)``). Evaluated here, in float, at lowering time — never in the integer graph."""
        p = self.param(node)
        if p is not None or not isinstance(node, fx.Node) or node.op != "call_function":
            return p
        name = op_name(node)
        if name in ("to", "_to_copy", "clone", "contiguous", "alias", "detach", "lift_fresh_copy"):
            dt = node.kwargs.get("dtype", next((a for a in node.args[1:] if isinstance(a, torch.dtype)), None))
            inner = self.const_value(node.args[0])
            if inner is None or (dt is not None and not dt.is_floating_point):
                return None
            return (inner[0].to(dt) if dt is not None else inner[0]), inner[1]
        if name in ("add", "sub", "mul") and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
            a, b = node.args
            for t, c, first in ((a, b, True), (b, a, False)):
                if isinstance(c, (int, float)) and not isinstance(c, bool):
                    inner = self.const_value(t)
                    if inner is None:
                        return None
                    x = inner[0]
                    if name == "add":
                        out = x + c
                    elif name == "mul":
                        out = x * c
                    else:
                        out = x - c if first else c - x
                    return out, inner[1]
        return None

    def weight_codes(self, w: torch.Tensor, fqn: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Integer weight codes ``[N, K]`` (int8) and per-channel multipliers (< 2^24) on one exponent."""
        from fxquant.quant import QuantizedWeight, QuantSpec, quantize_weight  # noqa: PLC0415
        qw = self.quantized.get(fqn)
        if isinstance(qw, QuantizedWeight):
            if not qw.spec.symmetric or qw.scale.shape[1] != 1:
                raise LoweringError(f"{fqn}: integer-only DI-MatMul takes symmetric per-channel weights, got "
                                    f"{qw.spec.describe()}", "use an illm-* recipe (per-channel symmetric RTN)")
            codes, scale = qw.codes, qw.scale[:, 0].double()
        else:
            qw = quantize_weight(w, QuantSpec(bits=self.cfg.weight_bits, symmetric=True, group_size=None), name=fqn)
            codes, scale = qw.codes, qw.scale[:, 0].double()
            self.count("weights_quantized_here")
        smax = float(scale.max())
        if not smax > 0:
            smax = 1.0
        wk = 23 - math.floor(math.log2(smax))          # max multiplier in [2^23, 2^24)
        wm = torch.round(torch.ldexp(scale, torch.tensor(wk, dtype=torch.float64))).to(torch.int64)
        return codes.to(torch.int8), wm, wk

    def int_constant(self, t: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
        """A float constant as integer codes at one exponent: ``t ≈ c · 2^-ck``, ``|c| < 2^(bits-1)``."""
        amax = float(t.detach().abs().max()) if t.numel() else 0.0
        if not math.isfinite(amax):
            raise LoweringError("a constant of the integer region has NaN/Inf values", "check the model weights")
        ck = (bits - 2) - (math.floor(math.log2(amax)) if amax > 0 else 0)
        c = torch.round(torch.ldexp(t.detach().double(), torch.tensor(ck, dtype=torch.float64))).to(torch.int64)
        return c, ck

    def out_bits(self, node: fx.Node) -> int:
        """``act_bits`` when every user of ``node`` is a linear (the width it will be requantized to), else
        ``inner_bits``."""
        users = list(node.users)
        if users and all(_linear_input_of(u) is node for u in users):
            return self.cfg.act_bits
        return self.cfg.inner_bits

    # ---- the walk -------------------------------------------------------------------------------------------
    def find_norms(self) -> None:
        """Decomposed RMSNorm ``x * rsqrt(mean(x², -1) + eps)`` [``* γ``] as one unit."""
        from fxquant.graphview import is_identity, tensor_users  # noqa: PLC0415
        for node in self.g.nodes:
            if op_name(node) != "rsqrt":
                continue
            add = node.args[0]
            if not (isinstance(add, fx.Node) and op_name(add) == "add" and len(add.args) == 2):
                continue
            mean, eps = add.args
            if not (isinstance(mean, fx.Node) and op_name(mean) == "mean" and isinstance(eps, (int, float))):
                continue
            sq = mean.args[0]
            if not (isinstance(sq, fx.Node) and op_name(sq) == "pow" and sq.args[1] == 2):
                continue
            x = sq.args[0]
            muls = [u for u in node.users if op_name(u) == "mul" and x in u.args]
            if len(muls) != 1 or len(node.users) != 1:
                continue
            inner = {sq, mean, add, node, muls[0]}
            out = muls[0]
            while len(tensor_users(out)) == 1 and is_identity(tensor_users(out)[0]) and op_name(tensor_users(out)[0]) == "to":
                out = tensor_users(out)[0]
                inner.add(out)
            gamma = None
            users = tensor_users(out)
            if len(users) == 1 and op_name(users[0]) == "mul":
                other = users[0].args[0] if users[0].args[1] is out else users[0].args[1]
                if self.const_value(other) is not None and len(_dims(other)) == 1:
                    gamma = other
                    out = users[0]
                    inner.add(out)
            self.norms[out] = {"x": x, "gamma": gamma, "eps": float(eps), "inner": inner}
            self.skip.update(inner - {out})

    def find_tanh_gelus(self) -> None:
        """GELU's tanh form written out (GPT-2's ``gelu_new``, ``NewGELUActivation``): ``0.5·x·(1 + tanh(√(2/π)·
        (x + 0.044715·x³)))`` in any operand order, as one unit lowered like ``aten.gelu``."""
        from fxquant.graphview import tensor_users  # noqa: PLC0415
        for node in self.g.nodes:
            if op_name(node) != "tanh":
                continue
            inner = _scaled_by(node.args[0], math.sqrt(2 / math.pi))
            if inner is None or op_name(inner[0]) != "add" or len(inner[0].args) != 2:
                continue
            add = inner[0]
            x = cube = None
            for a, b in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
                c = _scaled_by(b, 0.044715)
                if c is not None and op_name(c[0]) == "pow" and c[0].args[0] is a and c[0].args[1] == 3:
                    x, cube = a, c
            if x is None:
                continue
            users = tensor_users(node)
            one = users[0] if len(users) == 1 else None
            if one is None or op_name(one) != "add" or len(one.args) != 2 or one.kwargs.get("alpha", 1) != 1:
                continue
            other = one.args[1] if one.args[0] is node else one.args[0]
            if isinstance(other, fx.Node) or other != 1:
                continue
            outs = tensor_users(one)
            if len(outs) != 1 or op_name(outs[0]) != "mul":
                continue
            out = outs[0]
            half = out.args[0] if out.args[1] is one else out.args[1]
            h = _scaled_by(half, 0.5)
            if h is None or h[0] is not x or len(tensor_users(half)) != 1:
                continue
            inner_nodes = [cube[0], cube[1], add, inner[1]]
            if any(len(tensor_users(n)) != 1 for n in inner_nodes):
                continue                                          # an intermediate is read elsewhere too
            self.gelus[out] = x
            self.skip.update({*inner_nodes, node, one, half})

    def run(self) -> None:
        self.g.eliminate_dead_code()            # e.g. an encoder's pooler when only the hidden states are returned
        self.find_norms()
        self.find_tanh_gelus()
        nodes = list(self.g.nodes)
        for node in nodes:
            if node.op == "output":
                self.lower_output(node)
                continue
            if node.op != "call_function":
                continue
            if op_name(node) == "embedding":
                with self.g.inserting_before(node.next):
                    self.env[node] = self.enter_rows(node, self.cfg.inner_bits)
                continue
            reads = [a for a in node.all_input_nodes if a in self.env]
            if node in self.norms and self.norms[node]["x"] in self.env:
                reads = [self.norms[node]["x"]]
            if node in self.gelus and self.gelus[node] in self.env:
                reads = [self.gelus[node]]
            if not reads:
                continue
            if node in self.skip:
                continue
            if op_name(node) == "_assert_tensor_metadata":
                self.g.erase_node(node)
                continue
            if node in self.norms:
                rule = _Lowering.norm_rule
            elif node in self.gelus:
                rule = _Lowering.gelu_unit_rule
            else:
                rule = RULES.get(op_name(node))
            if rule is None:
                raise LoweringError(
                    f"integer-only lowering has no rule for aten.{op_name(node)} (node {node.name}, reading "
                    f"{', '.join(a.name for a in reads)})",
                    f"quantize this model with a recipe that keeps float activations (fsbr-w8a8, rtn-w8), or add a "
                    f"rule for aten.{op_name(node)} to fxquant.passes.lower_integer_only.RULES (ops with rules: "
                    f"{', '.join(sorted(RULES))})")
            with self.g.inserting_before(node):
                out = rule(self, node)
            if out is not None:
                self.env[node] = out

    def lower_output(self, node: fx.Node) -> None:
        def exit_(a: Any) -> Any:
            if isinstance(a, fx.Node) and a in self.env:
                v = self.env[a]
                if isinstance(v, _Deferred):
                    with self.g.inserting_before(node):
                        v = self.emit_silu(v)
                with self.g.inserting_before(node):
                    if v.bits > 32:
                        v = self.requant(v, 24)
                    d = self.call(_di("dequantize"), v.q, v.m, v.k, boundary="exit")
                    dt = _dtype(a)
                    if dt is not None and dt != torch.float32:
                        d = self.g.call_function(aten.to.dtype, (d, dt))
                self.count("exit")
                return d
            return a
        node.args = tuple(fx.node.map_aggregate(node.args, exit_))

    # ---- rules used by several ops ------------------------------------------------------------------------
    def norm_rule(self, node: fx.Node) -> IntValue:
        info = self.norms[node]
        x = self.as_value(info["x"], node)
        if x is None:
            raise LoweringError(f"RMSNorm {node.name}: its input is not an integer value")
        if x.vary[-1]:
            x = self.align(x, 1)
        x = self.requant(x, self.cfg.inner_bits) if x.bits > 16 else x
        n = len(_dims(info["x"]))
        gamma_t = (self.const_value(info["gamma"])[0] if info["gamma"] is not None
                   else torch.ones(int(_dims(info["x"])[-1])))
        c, ck = self.int_constant(gamma_t.float(), self.cfg.gamma_bits)
        gq = self.const(f"{node.name}_gamma_q", c)
        eps = _dyadic(info["eps"])
        bits = self.out_bits(node)
        q, m, k = self.call(_di("di_rmsnorm"), x.q, x.m, x.k, gq, ck, eps.m, eps.k, bits, n_out=3)
        self.count("di_rmsnorm")
        return self.value(q, m, k, bits, tuple([True] * (n - 1) + [False]), tag="rms")


    def gelu_unit_rule(self, node: fx.Node) -> IntValue:
        return _gelu_of(self, self.gelus[node], node)


def _scaled_by(node: Any, c: float) -> tuple[fx.Node, fx.Node] | None:
    """``(x, node)`` if ``node`` is ``mul(x, c)`` or ``mul(c, x)`` with the constant ``c`` (relative 1e-6)."""
    if not (isinstance(node, fx.Node) and op_name(node) == "mul" and len(node.args) == 2):
        return None
    for a, b in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        if isinstance(a, fx.Node) and isinstance(b, (int, float)) and math.isclose(b, c, rel_tol=1e-6):
            return a, node
    return None


def _dyadic(v: float):
    from fxquant.backends.dyadic import dyadic  # noqa: PLC0415
    return dyadic(v)


# ---- the rules ------------------------------------------------------------------------------------------------
Rule = Callable[[_Lowering, fx.Node], Any]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn
    return deco


def _v(L: _Lowering, node: fx.Node, i: int = 0) -> IntValue:
    v = L.as_value(node.args[i], node)
    if v is None:
        raise LoweringError(f"{node.name} ({op_name(node)}): argument {i} is not an integer value")
    return v


@rule("to", "_to_copy", "clone", "contiguous", "alias", "detach", "lift_fresh_copy")
def _identity(L: _Lowering, node: fx.Node) -> IntValue:
    dt = node.kwargs.get("dtype")
    if dt is None:
        dt = next((a for a in node.args[1:] if isinstance(a, torch.dtype)), None)
    if dt is not None and not dt.is_floating_point:
        raise LoweringError(f"{node.name}: a cast of an integer-region value to {dt} has no integer meaning",
                            "the model casts activations to a non-float type; lower it by hand")
    return _v(L, node)


@rule("type_as")
def _type_as(L: _Lowering, node: fx.Node) -> IntValue:
    dt = _dtype(node)
    if dt is not None and not dt.is_floating_point:
        raise LoweringError(f"{node.name}: type_as to {dt} has no integer meaning")
    return _v(L, node)                          # a cast between float types: the integer value stays as it is


@rule("dropout")
def _dropout(L: _Lowering, node: fx.Node) -> IntValue:
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False)
    if train:
        raise LoweringError(f"{node.name}: dropout in training mode", "call model.eval() before quantizing")
    return _v(L, node)


@rule("sym_size")
def _sym_size(L: _Lowering, node: fx.Node) -> fx.Node:
    v = _v(L, node)
    new = L.g.call_function(node.target, (v.q, *node.args[1:]))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    return None


def _layout(L: _Lowering, v: IntValue, target: Any, q_args: tuple, s_args: tuple, vary: tuple[bool, ...],
            *, scale_too: bool = True) -> IntValue:
    q = L.g.call_function(target, (v.q, *q_args))
    if scale_too:
        m = L.g.call_function(target, (v.m, *s_args))
        k = L.g.call_function(target, (v.k, *s_args))
    else:
        m, k = v.m, v.k
    return replace(v, q=q, m=m, k=k, vary=vary)


@rule("transpose")
def _transpose(L: _Lowering, node: fx.Node) -> IntValue:
    v = _v(L, node)
    a, b = (d % v.ndim for d in node.args[1:3])
    vary = list(v.vary)
    vary[a], vary[b] = vary[b], vary[a]
    return _layout(L, v, node.target, node.args[1:], node.args[1:], tuple(vary))


@rule("permute")
def _permute(L: _Lowering, node: fx.Node) -> IntValue:
    v = _v(L, node)
    dims = [d % v.ndim for d in node.args[1]]
    return _layout(L, v, node.target, node.args[1:], node.args[1:], tuple(v.vary[d] for d in dims))


@rule("unsqueeze")
def _unsqueeze(L: _Lowering, node: fx.Node) -> IntValue:
    v = _v(L, node)
    d = node.args[1] % (v.ndim + 1)
    vary = list(v.vary)
    vary.insert(d, False)
    return _layout(L, v, node.target, node.args[1:], node.args[1:], tuple(vary))


@rule("expand")
def _expand(L: _Lowering, node: fx.Node) -> IntValue:
    v = _v(L, node)
    sizes = node.args[1]
    if len(sizes) != v.ndim:
        raise LoweringError(f"{node.name}: expand that adds dimensions is not supported in the integer region")
    # only size-1 dims of q are expanded; the scale is constant along them (size 1): it broadcasts unchanged
    return _layout(L, v, node.target, node.args[1:], (), v.vary, scale_too=False)


@rule("slice")
def _slice(L: _Lowering, node: fx.Node) -> IntValue:
    v = _v(L, node)
    dim = node.args[1] % v.ndim if len(node.args) > 1 else 0
    if v.vary[dim]:
        return _layout(L, v, node.target, node.args[1:], node.args[1:], v.vary)
    return _layout(L, v, node.target, node.args[1:], (), v.vary, scale_too=False)


@rule("select")
def _select(L: _Lowering, node: fx.Node) -> IntValue:
    v = _v(L, node)
    dim = node.args[1] % v.ndim
    vary = tuple(x for i, x in enumerate(v.vary) if i != dim)
    if v.vary[dim]:
        return _layout(L, v, node.target, node.args[1:], node.args[1:], vary)
    if dim == v.ndim - 1:
        raise LoweringError(f"{node.name}: selecting one channel of a per-row integer value",
                            "select before the quantized region, or add a rule")
    s_args = (dim, 0)                                           # the scale has size 1 along dim
    return _layout(L, v, node.target, node.args[1:], s_args, vary)


@rule("index")
def _index(L: _Lowering, node: fx.Node) -> IntValue:
    """``x[..., idx, ...]`` with one 1-D integer index tensor (Falcon picks its key/value heads so): the rank and
    the dims stay; the scale is indexed alike where it varies along that dim, and kept where it does not."""
    v = _v(L, node)
    indices = list(node.args[1])
    used = [i for i, t in enumerate(indices) if t is not None]
    val = indices[used[0]].meta.get("val") if len(used) == 1 and isinstance(indices[used[0]], fx.Node) else None
    if not (isinstance(val, torch.Tensor) and val.dim() == 1 and not val.dtype.is_floating_point
            and val.dtype != torch.bool):
        raise LoweringError(f"{node.name}: indexing with {len(used)} index tensors (only one 1-D integer index "
                            "tensor keeps the dims in place)")
    dim = used[0]
    q = L.g.call_function(node.target, (v.q, indices))
    if v.vary[dim]:
        m = L.g.call_function(node.target, (v.m, indices))
        k = L.g.call_function(node.target, (v.k, indices))
        return replace(v, q=q, m=m, k=k, key=L.new_key("index"))
    return replace(v, q=q)


@rule("neg")
def _neg(L: _Lowering, node: fx.Node) -> IntValue:
    v = _v(L, node)
    if v.unsigned:
        raise LoweringError(f"{node.name}: negation of an unsigned integer value")
    q = L.g.call_function(aten.neg.default, (v.q,))   # symmetric code ranges: -q never overflows
    return replace(v, q=q)


@rule("cat")
def _cat(L: _Lowering, node: fx.Node) -> IntValue:
    # torch.cat skips 1-D empty tensors (a KV cache's initial empty keys/values): so does the integer cat
    args = [a for a in node.args[0] if not _empty_1d(a)]
    parts = [L.as_value(a, node) for a in args]
    if len(parts) == 1 and parts[0] is not None:
        return parts[0]
    if any(p is None for p in parts):
        raise LoweringError(f"{node.name}: cat of integer and float tensors")
    dim_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dim = dim_arg % parts[0].ndim
    first = parts[0]
    if any(p.ndim != first.ndim for p in parts):
        raise LoweringError(f"{node.name}: cat of integer values of different ranks")
    if len({p.unsigned for p in parts}) > 1:
        parts = [_signed(L, p) for p in parts]
        first = parts[0]
    widths = {p.bits for p in parts}      # pieces of different widths may have different dtypes: widen them all
    qs = [p.q if len(widths) == 1 else L.g.call_function(aten.to.dtype, (p.q, torch.int64)) for p in parts]
    q = L.g.call_function(aten.cat.default, (qs, dim_arg))
    if all(p.key == first.key and p.vary == first.vary for p in parts) and not first.vary[dim]:
        # pieces of one value (rotate_half): the scale is shared and constant along dim
        return replace(first, q=q, bits=max(widths))
    # pieces with their own scales (partial rotary: cat(rotated, pass-through)): the scales are broadcast to each
    # piece's extent along dim (and along every dim where any piece's scale varies) and concatenated, so the
    # result carries a scale that varies along dim; along the last dim it is aligned to one scale per row at once
    vary = tuple(any(p.vary[t] for p in parts) or t == dim for t in range(first.ndim))
    ms, ks = [], []
    for p in parts:
        size = [L.g.call_function(aten.sym_size.int, (p.q, t)) if vary[t] else 1 for t in range(first.ndim)]
        ms.append(L.g.call_function(aten.expand.default, (p.m, size)))
        ks.append(L.g.call_function(aten.expand.default, (p.k, size)))
    m = L.g.call_function(aten.cat.default, (ms, dim_arg))
    k = L.g.call_function(aten.cat.default, (ks, dim_arg))
    L.count("cat_scaled")
    v = L.value(q, m, k, max(widths), vary, unsigned=first.unsigned, tag="cat")
    return L.align(v, 1) if vary[-1] else v


def _empty_1d(a: Any) -> bool:
    val = a.meta.get("val") if isinstance(a, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 1 and isinstance(val.shape[0], int) and val.shape[0] == 0


def _signed(L: _Lowering, v: IntValue) -> IntValue:
    """``v`` with signed codes (one bit wider where they were unsigned)."""
    if not v.unsigned:
        return v
    q = L.g.call_function(aten.to.dtype, (v.q, torch.int64))
    return replace(v, q=q, bits=min(64, v.bits + 1), unsigned=False)


def _reshape_groups(a: list[sp.Expr], b: list[sp.Expr]) -> list[tuple[list[int], list[int]]] | None:
    """Axes of ``a`` and ``b`` grouped into runs of equal size: a common prefix and suffix (symbolic sizes
    compared exactly) and one middle group whose products must agree."""
    i = 0
    while i < min(len(a), len(b)) and _same(a[i], b[i]):
        i += 1
    j = 0
    while j < min(len(a), len(b)) - i and _same(a[len(a) - 1 - j], b[len(b) - 1 - j]):
        j += 1
    groups = [([t], [t]) for t in range(i)]
    mid_a = list(range(i, len(a) - j))
    mid_b = list(range(i, len(b) - j))
    if mid_a or mid_b:
        pa = sp.Mul(*[a[t] for t in mid_a]) if mid_a else sp.Integer(1)
        pb = sp.Mul(*[b[t] for t in mid_b]) if mid_b else sp.Integer(1)
        if not _same(pa, pb):
            return None
        groups.append((mid_a, mid_b))
    groups += [([len(a) - j + t], [len(b) - j + t]) for t in range(j)]
    return groups


@rule("view", "reshape", "_unsafe_view")
def _reshape(L: _Lowering, node: fx.Node) -> IntValue:
    v = _v(L, node)
    src = node.args[0]
    a, b = _dims(src), _dims(node)
    groups = _reshape_groups(a, b)
    if groups is None:
        raise LoweringError(f"{node.name}: cannot relate the reshape {a} -> {b}")
    trailing = next((ga for ga, gb in groups if ga and ga[-1] == len(a) - 1 and (len(ga) > 1 or len(gb) > 1)), None)
    if trailing is not None and any(v.vary[t] for t in trailing):
        v = L.align(v, len(a) - trailing[0])    # one scale per row of the merged / split trailing dims
    for ga, gb in groups:
        if (len(ga) == 1 and len(gb) == 1) or ga is trailing or not any(v.vary[t] for t in ga):
            continue
        # leading dims merged or split (tokens flattened to rows: [B, S, H] -> [B*S, H]): the scale is spread
        # over the group's constant dims first, so that it reshapes with the codes
        if not all(v.vary[t] for t in ga):
            size = [L.g.call_function(aten.sym_size.int, (v.q, t)) if (v.vary[t] or t in ga) else 1
                    for t in range(v.ndim)]
            v = replace(v, m=L.g.call_function(aten.expand.default, (v.m, size)),
                        k=L.g.call_function(aten.expand.default, (v.k, size)),
                        vary=tuple(x or t in ga for t, x in enumerate(v.vary)))
    vary_new = [False] * len(b)
    for ga, gb in groups:
        for t in gb:
            vary_new[t] = any(v.vary[u] for u in ga)
    q = L.g.call_function(node.target, (v.q, *node.args[1:]))
    shape = [L.g.call_function(aten.sym_size.int, (q, t)) if vary_new[t] else 1 for t in range(len(b))]
    m = L.g.call_function(aten.reshape.default, (v.m, shape))
    k = L.g.call_function(aten.reshape.default, (v.k, shape))
    return replace(v, q=q, m=m, k=k, vary=tuple(vary_new))


@rule("mul")
def _mul(L: _Lowering, node: fx.Node) -> IntValue:
    a, b = node.args[0], node.args[1]
    if isinstance(a, fx.Node) and isinstance(L.env.get(a), _Deferred) or \
            isinstance(b, fx.Node) and isinstance(L.env.get(b), _Deferred):
        d = L.env[a] if isinstance(a, fx.Node) and isinstance(L.env.get(a), _Deferred) else L.env[b]
        other = b if d is L.env.get(a) else a
        u = L.as_value(other, node)
        if u is not None:
            return _swiglu(L, node, d, u)
    for x, y in ((a, b), (b, a)):
        if not isinstance(x, fx.Node) or x not in L.env:
            continue
        vx = L.as_value(x, node)
        if isinstance(y, (int, float)):
            return _scale_by(L, vx, float(y))
        p = L.const_value(y)
        if p is not None:
            return _mul_param(L, node, vx, y, p[0])
        vy = L.as_value(y, node)
        if vy is not None:
            vx = L.requant(vx, 31) if vx.bits > 31 else vx
            vy = L.requant(vy, 31) if vy.bits > 31 else vy
            q, m, k = L.call(_di("di_mul"), vx.q, vx.m, vx.k, vy.q, vy.m, vy.k, 0, n_out=3)
            L.count("di_mul")
            vary = tuple(p or r for p, r in zip(_pad(vx.vary, len(_dims(node))), _pad(vy.vary, len(_dims(node)))))
            return L.value(q, m, k, 64, vary, key=("mul", vx.key, vy.key))
    raise LoweringError(f"{node.name}: mul of {a} and {b} has no integer form")


def _pad(vary: tuple[bool, ...], n: int) -> tuple[bool, ...]:
    return tuple([False] * (n - len(vary)) + list(vary))


def _scale_by(L: _Lowering, v: IntValue, c: float) -> IntValue:
    if c == 0:
        raise LoweringError("multiplication of an integer value by 0", "the model multiplies an activation by 0")
    if c < 0:
        v = replace(v, q=L.g.call_function(aten.neg.default, (v.q,)))
    d = _dyadic(abs(c))
    m, k = L.call(_di("rescale"), v.m, v.k, d.m, d.k, n_out=2)
    L.count("rescale")
    return replace(v, m=m, k=k, key=("scaled", v.key, d.m, d.k))


def _mul_param(L: _Lowering, node: fx.Node, v: IntValue, pnode: fx.Node, t: torch.Tensor) -> IntValue:
    shape = list(t.shape)
    if any(s != 1 for s in shape[:-1]):
        raise LoweringError(f"{node.name}: multiplication by {pnode.name} of shape {shape}: only per-channel (last "
                            "dim) constants have an integer form")
    c, ck = L.int_constant(t.float(), 16)
    cq = L.const(f"{pnode.name}_q", c)
    if v.bits > 31:
        v = L.requant(v, L.cfg.inner_bits)
    q = L.g.call_function(aten.mul.Tensor, (L.g.call_function(aten.to.dtype, (v.q, torch.int64)), cq))
    k = L.g.call_function(aten.add.Tensor, (v.k, ck))
    L.count("mul_const")
    return replace(v, q=q, k=k, bits=64, key=("mulc", v.key, pnode.name))


@rule("add", "add_")
def _add(L: _Lowering, node: fx.Node) -> IntValue:
    a, b = node.args[0], node.args[1]
    if op_name(node) == "add_" and isinstance(a, fx.Node) and len(a.users) > 1:
        # in place (Falcon: mlp_output += attention_output): as an add only if nothing else reads the mutated tensor
        raise LoweringError(f"{node.name}: in-place add into {a.name}, which other nodes also read",
                            "export the model functionally, or add a rule")
    if node.kwargs.get("alpha", 1) != 1:
        raise LoweringError(f"{node.name}: add with alpha != 1")
    for x, y in ((a, b), (b, a)):
        if isinstance(L.env.get(x), IntValue) and _is_additive_mask(L, y) and _only_softmax_reads(node):
            L.count("masked_scores")
            return _Masked(L.env[x], L.bool_mask(y))
    va, vb = L.as_value(a, node), L.as_value(b, node)
    if va is None or vb is None:
        raise LoweringError(f"{node.name}: add of an integer value and {b if va is not None else a} (a constant "
                            "offset has no rule outside the norms)")
    if va.key == vb.key and va.vary == vb.vary and not va.unsigned and not vb.unsigned:
        q = L.g.call_function(aten.add.Tensor, (L.g.call_function(aten.to.dtype, (va.q, torch.int64)),
                                                L.g.call_function(aten.to.dtype, (vb.q, torch.int64))))
        L.count("add_same_scale")
        return replace(va, q=q, bits=min(64, max(va.bits, vb.bits) + 1))
    bits = L.cfg.inner_bits
    va = L.requant(va, 24) if va.bits > 24 or va.vary[-1] else va
    vb = L.requant(vb, 24) if vb.bits > 24 or vb.vary[-1] else vb
    q, m, k = L.call(_di("di_add"), va.q, va.m, va.k, vb.q, vb.m, vb.k, bits, n_out=3)
    L.count("di_add")
    nd = len(_dims(node))
    return L.value(q, m, k, bits, tuple([True] * (nd - 1) + [False]), tag="add")


def _is_additive_mask(L: _Lowering, y: Any) -> bool:
    """A float tensor from outside the integer region that is not a parameter (eager attention's mask, built from
    the attention mask and the positions)."""
    if not isinstance(y, fx.Node) or y in L.env or L.param(y) is not None:
        return False
    dt = _dtype(y)
    return dt is not None and dt.is_floating_point


def _only_softmax_reads(node: fx.Node) -> bool:
    users = list(node.users)
    return len(users) == 1 and op_name(users[0]) in ("softmax", "_softmax")


@rule("softmax", "_softmax")
def _softmax(L: _Lowering, node: fx.Node) -> IntValue:
    """Eager attention's softmax over the scores (masked or not): DI-ClippedSoftmax, ``attn_bits`` unsigned."""
    src = L.env.get(node.args[0])
    mask = None
    if isinstance(src, _Masked):
        v, mask = src.scores, src.mask
    else:
        v = _v(L, node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    if dim % v.ndim != v.ndim - 1:
        raise LoweringError(f"{node.name}: softmax over dim {dim} of a {v.ndim}-d value (only the last dim has an "
                            "integer rule)")
    s = L.requant(v, L.cfg.inner_bits)
    c = _dyadic(L.cfg.softmax_clip)
    ab = L.cfg.attn_bits
    p, pm, pk = L.call(_di("di_clipped_softmax"), s.q, s.m, s.k, mask, False, c.m, c.k, L.cfg.exp_order, ab,
                       n_out=3)
    L.count("di_softmax")
    return L.value(p, pm, pk, ab, tuple([True] * (v.ndim - 1) + [False]), unsigned=True, tag="softmax")


@rule("bmm")
def _activation_matmul(L: _Lowering, node: fx.Node) -> IntValue:
    """A product of two integer values (eager attention's ``Q Kᵀ`` and ``P V``): DI-MatMul at ``attn_bits``. The
    left operand is requantized per row; the right one per row (``V``: its scale along the reduction is folded
    into the left operand's columns) or, when its scale varies along the columns (``Kᵀ``), per column."""
    a, b = L.as_value(node.args[0], node), L.as_value(node.args[1], node)
    if a is None or b is None:
        raise LoweringError(f"{node.name}: {op_name(node)} of {node.args[0]} and {node.args[1]}: one operand is "
                            "neither a parameter nor an integer value")
    if a.ndim < 2 or b.ndim < 2:
        raise LoweringError(f"{node.name}: {op_name(node)} with a 1-d operand has no integer rule")
    ab = L.cfg.attn_bits
    a = L.requant(a, ab, unsigned=a.unsigned)
    if b.vary[-1] and not b.vary[-2]:                  # per column (keys transposed): requantize the columns
        swapped = tuple(list(b.vary[:-2]) + [b.vary[-1], b.vary[-2]])
        bt = L.requant(_layout(L, b, aten.transpose.int, (-1, -2), (-1, -2), swapped), ab)
        b = _layout(L, bt, aten.transpose.int, (-1, -2), (-1, -2),
                    tuple(list(bt.vary[:-2]) + [bt.vary[-1], bt.vary[-2]]))
    else:
        b = L.requant(b, ab)
    bits = L.cfg.inner_bits
    q, m, k = L.call(_di("di_matmul"), a.q, a.m, a.k, b.q, b.m, b.k, bits, ab, a.unsigned, n_out=3)
    L.count("di_matmul")
    nd = len(_dims(node))
    return L.value(q, m, k, bits, tuple([True] * (nd - 1) + [False]), tag="mm")


@rule("tanh")
def _tanh(L: _Lowering, node: fx.Node) -> IntValue:
    """DI-Tanh (Gemma-2's soft-caps ``c·tanh(x/c)``; the ``/c`` and ``·c`` are scale-only)."""
    x = _v(L, node)
    x = L.requant(x, 16) if x.bits > 16 or x.vary[-1] or not all(x.vary[:-1]) else x
    bits = L.out_bits(node)
    q, m, k = L.call(_di("di_tanh"), x.q, x.m, x.k, L.cfg.exp_order, bits, n_out=3)
    L.count("di_tanh")
    return L.value(q, m, k, bits, tuple([True] * (x.ndim - 1) + [False]), tag="tanh")


@rule("div")
def _div(L: _Lowering, node: fx.Node) -> IntValue:
    """Division by a Python number: scale-only (the codes do not change)."""
    c = node.args[1]
    if node.kwargs.get("rounding_mode") is not None or not isinstance(c, (int, float)) or c == 0:
        raise LoweringError(f"{node.name}: div by {c!r} (only a nonzero Python number has an integer rule)")
    return _scale_by(L, _v(L, node), 1.0 / float(c))


@rule("linear", "addmm", "mm", "matmul")
def _linear(L: _Lowering, node: fx.Node) -> IntValue:
    from fxquant.graphview import as_linear  # noqa: PLC0415
    lin = as_linear(node, lambda n: L.param(n) is not None)
    if lin is None:
        if op_name(node) in ("matmul", "mm") and all(isinstance(L.env.get(a), IntValue) for a in node.args[:2]):
            return _activation_matmul(L, node)
        raise LoweringError(f"{node.name}: {op_name(node)} of {node.args[0]} and {node.args[1]} is neither a linear "
                            "by a parameter of the model nor a product of two integer values")
    x = L.as_value(lin.input, node)
    if x is None:
        raise LoweringError(f"{node.name}: {op_name(node)} whose input is not an integer value")
    w, fqn = L.param(lin.weight)
    if lin.layout == "in_out":             # GPT-2's Conv1D (addmm(b, x, W[in, out])): codes are [out, in]
        w = w.t()
    x = L.requant(x, L.cfg.act_bits)
    codes, wm, wk = L.weight_codes(w, fqn)
    wq = L.const(f"{lin.weight.name}_codes", codes)
    wmn = L.const(f"{lin.weight.name}_mult", wm)
    bias, bias_k = None, 0
    if lin.bias is not None:
        bp = L.param(lin.bias)
        if bp is None:
            raise LoweringError(f"{node.name}: linear bias is not a parameter of the model")
        c, bias_k = L.int_constant(bp[0].float().reshape(-1), 31)
        bias = L.const(f"{lin.bias.name}_q", c)
    bits = L.out_bits(node) if any(_linear_input_of(u) is node for u in node.users) else L.cfg.inner_bits
    q, m, k = L.call(_di("di_linear"), x.q, x.m, x.k, wq, wmn, wk, bias, bias_k, bits, n_out=3)
    L.count("di_linear")
    return L.value(q, m, k, bits, tuple([True] * (x.ndim - 1) + [False]), tag="lin")


def _linear_input_of(node: fx.Node) -> Any:
    """The activation operand of a linear-like node (``linear(x, W)``, ``addmm(b, x, W)``, ``mm(x, W)``)."""
    name = op_name(node)
    if name in ("linear", "mm", "matmul"):
        return node.args[0]
    if name == "addmm":
        return node.args[1]
    return None


@rule("relu")
def _relu(L: _Lowering, node: fx.Node) -> IntValue:
    v = _v(L, node)
    q = L.g.call_function(aten.clamp_min.default, (v.q, 0))    # same codes' scale: max(q, 0)·s = max(q·s, 0)
    L.count("relu")
    return replace(v, q=q)


@dataclass
class _Pieces:
    """The list that ``split`` / ``chunk`` return: one integer value per piece, taken by ``getitem``."""

    values: list[IntValue]


@rule("split", "split_with_sizes", "chunk", "unsafe_split")
def _split(L: _Lowering, node: fx.Node) -> _Pieces:
    v = _v(L, node)
    vals = node.meta.get("val")
    if not isinstance(vals, (list, tuple)):
        raise LoweringError(f"{node.name}: {op_name(node)} without shape metadata", "capture the model with fxquant.capture")
    dim_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = dim_arg % v.ndim
    qs = L.g.call_function(node.target, (v.q, *node.args[1:]), dict(node.kwargs))
    ms = ks = None
    if v.vary[dim]:
        ms = L.g.call_function(node.target, (v.m, *node.args[1:]), dict(node.kwargs))
        ks = L.g.call_function(node.target, (v.k, *node.args[1:]), dict(node.kwargs))
    out = []
    for i in range(len(vals)):
        q = L.g.call_function(operator.getitem, (qs, i))
        if ms is None:                    # the scale is constant along dim: every piece keeps it (and its key)
            out.append(replace(v, q=q))
        else:
            out.append(replace(v, q=q, m=L.g.call_function(operator.getitem, (ms, i)),
                               k=L.g.call_function(operator.getitem, (ks, i)), key=L.new_key("piece")))
    return _Pieces(out)


@rule("getitem")
def _getitem(L: _Lowering, node: fx.Node) -> IntValue:
    src = L.env.get(node.args[0])
    if not isinstance(src, _Pieces):
        raise LoweringError(f"{node.name}: getitem of {node.args[0]} has no integer form")
    return src.values[node.args[1]]


@rule("silu")
def _silu(L: _Lowering, node: fx.Node) -> Any:
    x = _v(L, node)
    users = list(node.users)
    if len(users) == 1 and op_name(users[0]) == "mul":
        return _Deferred(gate=x, node=node)
    return L.emit_silu(_Deferred(gate=x, node=node))


def _swiglu(L: _Lowering, node: fx.Node, d: _Deferred, u: IntValue) -> IntValue:
    g = L.requant(d.gate, 16) if d.gate.bits > 16 or d.gate.vary[-1] else d.gate
    u = L.requant(u, 16) if u.bits > 16 or u.vary[-1] else u
    bits = L.out_bits(node)
    q, m, k = L.call(_di("di_swiglu"), g.q, g.m, g.k, u.q, u.m, u.k, L.cfg.exp_order, bits, n_out=3)
    L.count("di_swiglu")
    nd = len(_dims(node))
    return L.value(q, m, k, bits, tuple([True] * (nd - 1) + [False]), tag="swiglu")


@rule("gelu")
def _gelu(L: _Lowering, node: fx.Node) -> IntValue:
    if node.kwargs.get("approximate", "none") not in ("none", "tanh"):
        raise LoweringError(f"{node.name}: gelu approximation {node.kwargs.get('approximate')!r}")
    return _gelu_of(L, node.args[0], node)


def _gelu_of(L: _Lowering, x_node: fx.Node, node: fx.Node) -> IntValue:
    """DI-GELU (``x·σ(1.702x)``) of ``x_node``, standing for ``node`` (``aten.gelu`` or a written-out tanh-GELU)."""
    x = L.as_value(x_node, node)
    if x is None:
        raise LoweringError(f"{node.name}: GELU of a value that is not an integer value")
    x = L.requant(x, 16) if x.bits > 16 or x.vary[-1] else x
    bits = L.out_bits(node)
    q, m, k = L.call(_di("di_gelu"), x.q, x.m, x.k, L.cfg.exp_order, bits, n_out=3)
    L.count("di_gelu")
    return L.value(q, m, k, bits, x.vary, tag="gelu")


@rule("layer_norm")
def _layer_norm(L: _Lowering, node: fx.Node) -> IntValue:
    x = _v(L, node)
    shape = node.args[1]
    if len(shape) != 1:
        raise LoweringError(f"{node.name}: LayerNorm over {len(shape)} dims (only the last dim is supported)")
    w = L.param(node.args[2]) if len(node.args) > 2 and node.args[2] is not None else None
    bnode = node.args[3] if len(node.args) > 3 else None
    b = L.param(bnode) if bnode is not None else None
    eps = float(node.args[4]) if len(node.args) > 4 else 1e-5
    x = L.requant(x, 16) if x.bits > 16 or x.vary[-1] else x
    gamma_t = w[0].float() if w is not None else torch.ones(int(shape[0]))
    c, ck = L.int_constant(gamma_t, L.cfg.gamma_bits)
    gq = L.const(f"{node.name}_gamma_q", c)
    beta = None
    if b is not None:
        from fxquant.backends.intops import NORM_BITS  # noqa: PLC0415
        beta = L.const(f"{node.name}_beta_q", torch.round(torch.ldexp(b[0].double(), torch.tensor(
            ck + NORM_BITS, dtype=torch.float64))).to(torch.int64))
    d = _dyadic(eps)
    bits = L.out_bits(node)
    q, m, k = L.call(_di("di_layernorm"), x.q, x.m, x.k, gq, beta, ck, d.m, d.k, bits, n_out=3)
    L.count("di_layernorm")
    return L.value(q, m, k, bits, tuple([True] * (x.ndim - 1) + [False]), tag="ln")


@rule("scaled_dot_product_attention")
def _sdpa(L: _Lowering, node: fx.Node) -> IntValue:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    if float(args.get("dropout_p", 0.0) or 0.0) != 0.0:
        raise LoweringError(f"{node.name}: attention dropout", "call model.eval() before quantizing")
    mask = args.get("attn_mask")
    if isinstance(mask, fx.Node) and (_dtype(mask) is None or _dtype(mask).is_floating_point):
        raise LoweringError(f"{node.name}: a float (additive) attention mask has no integer form",
                            "capture the model with a boolean mask (transformers' sdpa path) or no mask")
    if isinstance(mask, fx.Node) and mask in L.env:
        raise LoweringError(f"{node.name}: the attention mask is computed from activations")
    causal = bool(args.get("is_causal", False))
    if isinstance(mask, fx.Node) and not causal and L.mask_is_causal(mask):
        mask, causal = None, True               # transformers' explicit causal mask: the op's own causal masking
        L.count("causal_mask")
    ab = L.cfg.attn_bits
    q = L.requant(_v(L, node, 0), ab)
    kk = L.requant(_v(L, node, 1), ab)
    v = L.requant(_v(L, node, 2), ab)
    qd, kd = _dims(node.args[0]), _dims(node.args[1])
    if L.cfg.kv_cache:
        if not causal or mask is not None:
            raise LoweringError(f"{node.name}: an integer KV cache needs causal attention, and this attention's mask "
                                "is not (provably) the causal one (a sliding window, padding or a bidirectional "
                                "encoder)", "lower without kv_cache (each step re-runs the whole sequence)")
        if not (kd[-3].is_Integer and kd[-1].is_Integer):
            raise LoweringError(f"{node.name}: the key/value heads and head size are not fixed numbers ({kd})")
        layer = sum(1 for e in L.kv if e["name"].startswith("k"))
        kk = L.kv_cached(kk, f"k{layer}", int(kd[-3]), int(kd[-1]))
        v = L.kv_cached(v, f"v{layer}", int(kd[-3]), int(_dims(node.args[2])[-1]))
    if args.get("enable_gqa") and not _same(qd[-3], kd[-3]):
        rep = int(qd[-3] / kd[-3])
        kk = _repeat_heads(L, kk, rep)
        v = _repeat_heads(L, v, rep)
    kt = _layout(L, kk, aten.transpose.int, (-1, -2), (-1, -2),
                 tuple(list(kk.vary[:-2]) + [kk.vary[-1], kk.vary[-2]]))
    s, sm, sk = L.call(_di("di_matmul"), q.q, q.m, q.k, kt.q, kt.m, kt.k, L.cfg.inner_bits, ab, False,
                       "columns" if causal else "", n_out=3)
    scale = args.get("scale")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(float(qd[-1]))
    d = _dyadic(scale)
    sm, sk = L.call(_di("rescale"), sm, sk, d.m, d.k, n_out=2)
    c = _dyadic(L.cfg.softmax_clip)
    p, pm, pk = L.call(_di("di_clipped_softmax"), s, sm, sk, mask, causal, c.m, c.k, L.cfg.exp_order, ab, n_out=3)
    o, om, ok = L.call(_di("di_matmul"), p, pm, pk, v.q, v.m, v.k, L.cfg.inner_bits, ab, True,
                       "reduction" if causal else "", n_out=3)
    L.count("di_attention")
    nd = len(_dims(node))
    return L.value(o, om, ok, L.cfg.inner_bits, tuple([True] * (nd - 1) + [False]), tag="attn")


#: sequence lengths at which a mask is evaluated before it is taken for the causal one
_PROBE_LENGTHS = (1, 2, 7, 64)
#: the longest probe made just past a declared sliding window (a longer window is not probed: the mask is kept)
_PROBE_MAX = 4096
#: ops between the token-ids input and an embedding's lookup that keep the values
_ID_VIEWS = ("view", "reshape", "_unsafe_view", "unsqueeze", "flatten", "clone", "contiguous", "alias")


def _token_ids_of(embedding: fx.Node) -> fx.Node | None:
    """The graph input an embedding looks up, through views (None: its index is computed, e.g. positions)."""
    node = embedding.args[1]
    while isinstance(node, fx.Node) and node.op == "call_function" and op_name(node) in _ID_VIEWS:
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.op == "placeholder" else None


def _token_ids(g: fx.Graph) -> fx.Node | None:
    """The graph input holding the token ids: what the (first) embedding looks up."""
    first = next((n for n in g.nodes if op_name(n) == "embedding"), None)
    return None if first is None else _token_ids_of(first)


def _probe_causal(L: _Lowering, mask: fx.Node) -> bool:
    """See :meth:`_Lowering.mask_is_causal`."""
    ids = _token_ids(L.g)
    if ids is None or ids.name not in L.cg.user_inputs:
        return False
    ancestors: set[fx.Node] = set()
    stack = [mask]
    while stack:
        n = stack.pop()
        if n in ancestors:
            continue
        ancestors.add(n)
        if n in L.env or n.op not in ("placeholder", "call_function"):
            return False
        if n.op == "placeholder":
            if n.name in L.cg.user_inputs and n is not ids and n is not L.past_length:
                return False
            continue
        stack.extend(n.all_input_nodes)
    order = [n for n in L.g.nodes if n in ancestors]
    reads_ids: set[fx.Node] = {ids}             # what depends on the token ids' values (only sizes may be read)
    for n in order:
        if n.op == "call_function" and op_name(n) != "sym_size" and any(a in reads_ids for a in n.all_input_nodes):
            reads_ids.add(n)
    if mask in reads_ids:
        return False                            # e.g. padding detection from the ids: not positions only
    cfg = getattr(L.cg.model, "config", None)
    lengths = list(_PROBE_LENGTHS)
    window = getattr(cfg, "sliding_window", None)
    if isinstance(window, int) and window > 0 and getattr(cfg, "use_sliding_window", True) is not False:
        if window + 2 > _PROBE_MAX:
            return False
        lengths.append(window + 2)
    for seq in lengths:
        env: dict[fx.Node, Any] = {}
        try:
            for n in order:
                if n.op == "placeholder":
                    env[n] = (torch.zeros((2, seq), dtype=torch.long) if n is ids else
                              torch.zeros((), dtype=torch.long) if n is L.past_length else L.cg.tensors[n.name])
                    continue
                a = fx.node.map_arg(n.args, env.__getitem__)
                kw = fx.node.map_arg(n.kwargs, env.__getitem__)
                env[n] = n.target(*a, **kw)
        except Exception as exc:  # noqa: BLE001 - a mask we cannot evaluate is not proven causal, and is kept
            log.info("fxquant: the attention mask %s could not be evaluated at length %d (%s): kept", mask.name, seq,
                     exc)
            return False
        val = env[mask]
        if not isinstance(val, torch.Tensor) or val.dtype != torch.bool or tuple(val.shape[-2:]) != (seq, seq):
            return False
        if not torch.equal(val, torch.ones(seq, seq, dtype=torch.bool).tril().expand(val.shape)):
            return False
    return True


def _repeat_heads(L: _Lowering, v: IntValue, rep: int) -> IntValue:
    t = aten.repeat_interleave.self_int
    return _layout(L, v, t, (rep, v.ndim - 3), (rep, v.ndim - 3) if v.vary[-3] else (), v.vary,
                   scale_too=v.vary[-3])


def _erase_float_originals(g: fx.Graph, replaced: set[fx.Node]) -> None:
    """Erase what the outputs no longer need: the float originals of the lowered ops and what only they read
    (an explicit causal mask the op's causal masking replaced, position tables...). FX's own dead-code
    elimination stops at capture-time metadata assertions and at ops it takes for impure (attention, with its
    dropout), which would keep the whole float model running beside the integer one."""
    live: set[fx.Node] = set()
    stack = [g.output_node()]
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(n.all_input_nodes)
    for n in reversed(list(g.nodes)):
        if n.op == "call_function" and n not in live and not n.users and (
                n in replaced or op_name(n) == "_assert_tensor_metadata" or not n.is_impure()):
            g.erase_node(n)
    g.eliminate_dead_code()


#: float ops whose last bit depends on where they run (ATen, Inductor, CUDA): ``fxquant::float64_fn`` takes their name
_DEVICE_DEPENDENT_FLOAT = frozenset({"cos", "sin", "exp", "exp2", "log", "log2", "rsqrt", "tanh", "sigmoid"})


def _deterministic_float_inputs(L: _Lowering) -> None:
    """Transcendental float ops upstream of the integer region (RoPE's cos/sin tables) run as
    ``fxquant::float64_fn``: float64, rounded once. Their float32 results differ in the last bit between eager
    ATen, Inductor and CUDA, and a last bit moves a fixed-point code (8 of SmolLM2's 512-position cos codes under
    ``torch.compile``): the integer graph must give the same integers however it is run."""
    enters = [n for n in L.g.nodes if fxmeta(n).get(INTEGER_BOUNDARY) == "enter"]
    seen: set[fx.Node] = set()
    stack = [a for n in enters for a in n.all_input_nodes]
    while stack:
        n = stack.pop()
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
        fn, scalar = (op_name(n) if op_name(n) in _DEVICE_DEPENDENT_FLOAT else None), 0.0
        if op_name(n) == "pow" and isinstance(n.args[0], (int, float)) and isinstance(n.args[1], fx.Node):
            fn, scalar = "pow_scalar_base", float(n.args[0])
        elif op_name(n) == "pow" and isinstance(n.args[0], fx.Node) and isinstance(n.args[1], float):
            fn, scalar = "pow_scalar_exp", n.args[1]
        dt = _dtype(n)
        if fn is None or dt is None or not dt.is_floating_point or n.kwargs:
            continue
        with L.g.inserting_after(n):
            new = L.g.call_function(_di("float64_fn"), (n.args[0] if fn != "pow_scalar_base" else n.args[1], fn,
                                                         scalar))
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        L.g.erase_node(n)
        L.count("float64_fn")


# ---- the KV cache ------------------------------------------------------------------------------------------------
def _kv_cache_problem(L: _Lowering) -> str | None:
    """Why this graph cannot have an integer KV cache, or None: every attention must be SDPA, causal by its flag or
    by a mask proven causal, and the positions must come from an ``arange`` over the sequence length."""
    attn = [n for n in L.g.nodes if op_name(n) == "scaled_dot_product_attention"]
    if any(op_name(n) in ("softmax", "_softmax") for n in L.g.nodes):
        return ("eager attention (a softmax outside scaled_dot_product_attention): capture with "
                "attn_implementation='sdpa'")
    if not attn:
        return "the graph has no attention"
    for n in attn:
        mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
        causal = bool(n.args[5] if len(n.args) > 5 else n.kwargs.get("is_causal", False))
        if not causal and not (isinstance(mask, fx.Node) and _dtype(mask) == torch.bool and L.mask_is_causal(mask)):
            return (f"attention {n.name} is not causal (its mask is not provably the causal one: a sliding window, "
                    f"padding, or a bidirectional encoder)")
    aranges = _sequence_aranges(L.g)
    if not aranges:
        return "no arange over the sequence length gives the positions"
    from_arange: set[fx.Node] = set()
    for n in L.g.nodes:
        if n in aranges or any(a in from_arange for a in n.all_input_nodes):
            from_arange.add(n)
    ids = _token_ids(L.g)
    for n in L.g.nodes:
        position_table = op_name(n) in ("cos", "sin") or (op_name(n) == "embedding" and _token_ids_of(n) is not ids)
        if position_table and n not in from_arange:
            return (f"the positions read by {n.name} ({op_name(n)}) do not come from an arange over the sequence "
                    f"(e.g. they are counted from an attention mask), so a cache could not shift them")
    return None


def _sequence_aranges(g: fx.Graph) -> list[fx.Node]:
    """``arange(S)`` / ``arange(0, S)`` with ``S`` the token ids' sequence length: the positions (and masks)."""
    ids = _token_ids(g)
    seq = {n for n in g.nodes if op_name(n) == "sym_size" and n.args[0] is ids and n.args[1] in (1, -1)}
    return [n for n in g.nodes if op_name(n) == "arange" and (
        (len(n.args) == 1 and n.args[0] in seq) or (len(n.args) >= 2 and n.args[0] == 0 and n.args[1] in seq))]


def _offset_positions(L: _Lowering) -> None:
    """A new input ``past_length`` (a 0-d int64 tensor) shifts every ``arange`` over the sequence length — the
    positions of RoPE tables, learned position embeddings and masks — so that new tokens get the positions after
    the cached ones (:func:`_kv_cache_problem` has checked that there are such aranges)."""
    L.past_length = L.input_placeholder("past_length")
    for n in _sequence_aranges(L.g):
        with L.g.inserting_after(n):
            shifted = L.g.call_function(aten.add.Tensor, (n, L.past_length))
        n.replace_all_uses_with(shifted, delete_user_cb=lambda u: u is not shifted)
    L.count("positions_shifted")


def _cache_outputs(L: _Lowering) -> None:
    """The extended keys/values become outputs after the model's own, and ``cg.meta["kv_cache"]`` records how
    to make an empty cache (:func:`empty_kv_cache`)."""
    if not L.kv:
        raise LoweringError("kv_cache: the graph has no attention to cache", "lower without kv_cache")
    out = L.g.output_node()
    vals = out.args[0]
    cached = [c for e in L.kv for c in e["outputs"]]
    out.args = ((*vals, *cached) if isinstance(vals, (tuple, list)) else (vals, *cached),)
    from fxquant.backends.intops import int_dtype  # noqa: PLC0415
    L.cg.meta["kv_cache"] = {
        "past_length": L.past_length.name,
        "outputs": 1 if not isinstance(vals, (tuple, list)) else len(vals),
        "entries": [{"inputs": e["inputs"], "heads": e["heads"], "dim": e["dim"],
                     "dtype": str(int_dtype(e["bits"], e["unsigned"])).removeprefix("torch.")} for e in L.kv]}


def empty_kv_cache(cg: CapturedGraph, batch: int, device: Any = "cpu") -> dict[str, torch.Tensor]:
    """The inputs of a KV-cached integer graph for its first call: ``past_length`` 0 and empty keys/values."""
    spec = cg.meta.get("kv_cache")
    if not spec:
        return {}
    feed = {spec["past_length"]: torch.zeros((), dtype=torch.long, device=device)}
    for e in spec["entries"]:
        q, m, k = e["inputs"]
        feed[q] = torch.zeros((batch, e["heads"], 0, e["dim"]), dtype=getattr(torch, e["dtype"]), device=device)
        feed[m] = torch.zeros((batch, e["heads"], 0, 1), dtype=torch.long, device=device)
        feed[k] = torch.zeros((batch, e["heads"], 0, 1), dtype=torch.long, device=device)
    return feed


# ---- the pass ---------------------------------------------------------------------------------------------------
def lower_integer_only(cg: CapturedGraph, cfg: IntegerOnlyConfig | None = None,
                       quantized: dict[str, Any] | None = None) -> dict[str, int]:
    """Rewrite ``cg`` in place into an integer-only graph; returns counts of what was emitted."""
    cfg = cfg or IntegerOnlyConfig()
    if not any(op_name(n) == "embedding" for n in cg.gm.graph.nodes):
        raise LoweringError("integer-only lowering starts at the embedding output, and this graph has no "
                            "aten.embedding", "lower a language model (input_ids -> embedding -> layers)")
    low = _Lowering(cg, cfg, quantized or {})
    if cfg.kv_cache:
        problem = _kv_cache_problem(low)
        if problem and cfg.kv_cache == "auto":
            log.info("fxquant: integer-only graph without a KV cache: %s", problem)
            cfg = low.cfg = replace(cfg, kv_cache=False)
        elif not problem:
            cfg = low.cfg = replace(cfg, kv_cache=True)
        else:
            raise LoweringError(f"no integer KV cache for this model: {problem}",
                                "lower without kv_cache (each generated token re-runs the whole sequence)")
    if cfg.kv_cache:
        _offset_positions(low)
    low.run()
    g = cg.gm.graph
    if cfg.kv_cache:
        _cache_outputs(low)
    _erase_float_originals(g, set(low.env) | low.skip | set(low.norms))
    _deterministic_float_inputs(low)
    for n in list(g.nodes):                     # float weights that nothing reads any more
        if n.op == "placeholder" and not n.users and n.name not in cg.user_inputs:
            g.erase_node(n)
    g.lint()
    cg.gm.recompile()
    cg.meta["integer_only"] = {"config": cfg.__dict__.copy(), "stats": dict(low.stats)}
    return low.stats


class LowerIntegerOnly(Pass):
    """Lower the whole model to integer-only arithmetic (I-LLM)."""

    name = "lower_integer_only"
    description = "integer-only lowering: quantize at the embedding, DI-* ops for every layer, dequantize the logits"

    def __init__(self, config: IntegerOnlyConfig | None = None):
        self.config = config or IntegerOnlyConfig()

    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        stats = lower_integer_only(cg, self.config, dict(ctx.artifacts.get("quantized_weights", {})))
        ctx.artifacts["integer_only"] = dict(stats)
        return PassResult(modified=True, stats=stats)

    def ensures(self, cg: CapturedGraph, ctx: PassContext) -> None:
        from fxquant.verify import verify_integer_only  # noqa: PLC0415
        verify_integer_only(cg)
