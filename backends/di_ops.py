"""The integer-only ``fxquant::di_*`` custom ops (I-LLM), defined with ``torch.library.custom_op``.

Each op's default kernel is the bit-exact reference of :mod:`fxquant.backends.intops`; its CUDA kernel is the
Triton implementation of :mod:`fxquant.backends.triton_intops` when Triton imports (else the reference); its fake
implementation gives shapes and integer dtypes, so Dynamo/AOTAutograd/Inductor treat each op as one opaque call.

Schemas take only tensors, ints and bools — real-valued constants (the softmax clip, a norm's eps) arrive as
dyadic ``(m, k)`` integer pairs — so the verifier can prove that nothing floating-point is left between
``fxquant::quantize_rows`` / ``fxquant::quantize_fixed`` (the ``enter`` boundaries) and ``fxquant::dequantize``
(the ``exit``). Scales are ``(m, k)`` int64 tensors broadcastable against the codes (see ``intops``).
"""
from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

import torch

from . import intops as ref

__all__ = ["OPS", "ENTER_OPS", "EXIT_OPS", "op"]

log = logging.getLogger("fxquant")

Tensor = torch.Tensor
Triple = tuple[Tensor, Tensor, Tensor]


@functools.lru_cache(maxsize=None)
def _triton_module() -> Any:
    try:
        from . import triton_intops  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001 - no Triton: the reference runs on every device, and we say so
        log.warning("fxquant: the Triton integer kernels could not be imported (%s); the di_* ops on CUDA run the "
                    "reference implementation (slow, and its integer matmul is CPU-only)", exc)
        return None
    return triton_intops


def _unalias(out: Any, inputs: tuple) -> Any:
    """custom_op outputs may not alias inputs: clone any output that shares storage with an input."""
    ptrs = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()}
    if isinstance(out, tuple):
        return tuple(_unalias(o, inputs) for o in out)
    if isinstance(out, Tensor) and out.numel() and out.untyped_storage().data_ptr() in ptrs:
        return out.clone()
    return out


class _Impl:
    """The implementation module for tensors on ``device``: Triton's on CUDA (falling back to the reference for
    any function it does not define), the reference everywhere else."""

    def __init__(self, mod: Any):
        self.mod = mod

    def __getattr__(self, name: str) -> Callable:
        return getattr(self.mod, name, None) or getattr(ref, name)


def _impl(t: Tensor) -> Any:
    mod = _triton_module() if t.is_cuda else None
    return ref if mod is None else _Impl(mod)


def _define(name: str, body: Callable, fake: Callable) -> Any:
    """``fxquant::<name>``: ``body`` picks the Triton or reference implementation by the input's device."""
    def run(*args: Any) -> Any:
        out = body(*args)                       # contiguous outputs: what the fake implementations promise
        out = tuple(o.contiguous() for o in out) if isinstance(out, tuple) else out.contiguous()
        return _unalias(out, args)

    run.__name__ = name
    run.__annotations__ = dict(body.__annotations__)
    run.__signature__ = inspect.signature(body)  # type: ignore[attr-defined]
    o = torch.library.custom_op(f"fxquant::{name}", run, mutates_args=())
    o.register_fake(fake)
    return o


def _row_scale(x: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], 1), dtype=torch.int64)


# ---- boundaries ------------------------------------------------------------------------------------------------
def quantize_rows(x: Tensor, bits: int, unsigned: bool) -> Triple:
    return ref.quantize_rows(x, bits, unsigned=unsigned)


def _quantize_rows_fake(x: Tensor, bits: int, unsigned: bool) -> Triple:
    return x.new_empty(x.shape, dtype=ref.int_dtype(bits, unsigned)), _row_scale(x), _row_scale(x)


def quantize_fixed(x: Tensor, frac_bits: int, bits: int) -> Triple:
    """Fixed-point ``round(x · 2^frac_bits)`` (saturated to ``bits``) with the constant scale ``2^-frac_bits`` —
    for position tables (RoPE cos/sin) that enter the integer region."""
    lo, hi = ref.qrange(bits)
    q = torch.clamp(torch.floor(x.double() * float(2 ** frac_bits) + 0.5), lo, hi).to(ref.int_dtype(bits))
    one = torch.ones([1] * x.dim(), dtype=torch.int64, device=x.device)
    return q, one * (1 << (ref.MANT_BITS - 1)), one * (frac_bits + ref.MANT_BITS - 1)


def _quantize_fixed_fake(x: Tensor, frac_bits: int, bits: int) -> Triple:
    one = x.new_empty([1] * x.dim(), dtype=torch.int64)
    return x.new_empty(x.shape, dtype=ref.int_dtype(bits)), one, one.clone()


#: float functions that :func:`float64_fn` computes (unary, and ``pow`` with a Python-number operand)
FLOAT64_FNS = ("cos", "sin", "exp", "exp2", "log", "log2", "sqrt", "rsqrt", "tanh", "sigmoid", "pow_scalar_base",
               "pow_scalar_exp")


def float64_fn(x: Tensor, fn: str, scalar: float) -> Tensor:
    """``fn(x)`` computed in float64 and rounded once to ``x``'s dtype, for float tensors that feed the integer
    region (RoPE's cos/sin tables before ``quantize_fixed``). Float32 ``cos`` differs in its last bit between
    ATen, Inductor's vectorised code and CUDA, and a last bit can move a 14-bit fixed-point code; the float64
    value rounded once is the same in eager mode, under ``torch.compile`` and on any device that rounds float64
    correctly to within an ulp. ``pow_scalar_base`` is ``scalar ** x``, ``pow_scalar_exp`` is ``x ** scalar``."""
    if fn not in FLOAT64_FNS:
        raise ValueError(f"float64_fn: {fn!r} is not one of {FLOAT64_FNS}")
    xd = x.double()
    if fn == "pow_scalar_base":
        y = torch.pow(scalar, xd)
    elif fn == "pow_scalar_exp":
        y = torch.pow(xd, scalar)
    else:
        y = getattr(torch, fn)(xd)
    return y.to(x.dtype)


def _float64_fn_fake(x: Tensor, fn: str, scalar: float) -> Tensor:
    return torch.empty_like(x)


#: an additive-mask entry at or below this masks its key: ``exp`` of it is 0 in every float format softmax runs in
ADDITIVE_MASK_LIMIT = -1.0e4


def mask_from_additive(mask: Tensor) -> Tensor:
    """Eager attention's additive mask (0 = attend, a large negative number = masked) as DI-ClippedSoftmax's
    boolean mask (True = attend). Any other entry — a position bias such as ALiBi, or a partly masked key — has no
    boolean form and is refused here rather than rounded away."""
    keep = mask == 0
    odd = ~keep & ~(mask <= ADDITIVE_MASK_LIMIT)
    if bool(odd.any()):
        vals = mask[odd].flatten()[:4].tolist()
        raise ValueError(f"the additive attention mask holds values other than 0 and <= {ADDITIVE_MASK_LIMIT:g} "
                         f"(e.g. {vals}): a position bias has no integer-only form; quantize with a recipe that "
                         "keeps float activations (fsbr-w8a8) or load the model with attn_implementation='sdpa'")
    return keep


def _mask_fake(mask: Tensor) -> Tensor:
    return torch.empty_like(mask, dtype=torch.bool)


def dequantize(q: Tensor, m: Tensor, k: Tensor) -> Tensor:
    return ref.dequantize(q, m, k, torch.float32)


def _dequantize_fake(q: Tensor, m: Tensor, k: Tensor) -> Tensor:
    return q.new_empty(torch.broadcast_shapes(q.shape, m.shape, k.shape), dtype=torch.float32)


# ---- scale-only and layout ops ------------------------------------------------------------------------------------
def rescale(m: Tensor, k: Tensor, cm: int, ck: int) -> tuple[Tensor, Tensor]:
    """The scale ``m·2^-k`` times the dyadic constant ``cm·2^-ck`` (normalised): codes do not change."""
    return ref.normalize(m.to(torch.int64) * int(cm), k.to(torch.int64) + int(ck))


def _rescale_fake(m: Tensor, k: Tensor, cm: int, ck: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(m, dtype=torch.int64), torch.empty_like(k, dtype=torch.int64)


def align_rows(q: Tensor, m: Tensor, k: Tensor, ndims: int) -> Triple:
    """Bring a tensor whose scale varies over its last ``ndims`` dims (e.g. per head after attention) to one scale
    per row of those dims: ``q·m`` shifted to the coarsest exponent (finer entries rounded), scale ``2^-kc``."""
    q64, m64, k64 = q.to(torch.int64), m.to(torch.int64), k.to(torch.int64)
    dims = tuple(range(-ndims, 0))
    k_b = k64.expand(torch.broadcast_shapes(k64.shape, m64.shape))
    live = torch.where(m64 > 0, k_b, k_b.amax(dim=dims, keepdim=True))
    kc = live.amin(dim=dims, keepdim=True)
    s = ref.shift_round(q64 * m64, k64 - kc)
    return s, torch.ones_like(kc) * (1 << (ref.MANT_BITS - 1)), kc + ref.MANT_BITS - 1


def _align_rows_fake(q: Tensor, m: Tensor, k: Tensor, ndims: int) -> Triple:
    shape = list(torch.broadcast_shapes(m.shape, k.shape))
    for d in range(1, ndims + 1):
        shape[-d] = 1
    s = q.new_empty(torch.broadcast_shapes(q.shape, m.shape), dtype=torch.int64)
    return s, q.new_empty(shape, dtype=torch.int64), q.new_empty(shape, dtype=torch.int64)


def requantize_rows(x: Tensor, m: Tensor, k: Tensor, bits: int, unsigned: bool) -> Triple:
    return _impl(x).requantize_rows(x, m, k, bits, unsigned=unsigned)


def _requant_fake(x: Tensor, m: Tensor, k: Tensor, bits: int, unsigned: bool) -> Triple:
    return x.new_empty(x.shape, dtype=ref.int_dtype(bits, unsigned)), _row_scale(x), _row_scale(x)


# ---- arithmetic -----------------------------------------------------------------------------------------------
def di_add(a: Tensor, am: Tensor, ak: Tensor, b: Tensor, bm: Tensor, bk: Tensor, bits: int) -> Triple:
    return _impl(a).di_add(a, am, ak, b, bm, bk, bits)


def _add_fake(a: Tensor, am: Tensor, ak: Tensor, b: Tensor, bm: Tensor, bk: Tensor, bits: int) -> Triple:
    shape = torch.broadcast_shapes(a.shape, b.shape)
    x = a.new_empty(shape)
    return a.new_empty(shape, dtype=ref.int_dtype(bits)), _row_scale(x), _row_scale(x)


def di_mul(a: Tensor, am: Tensor, ak: Tensor, b: Tensor, bm: Tensor, bk: Tensor, bits: int) -> Triple:
    """``bits <= 0``: the exact int64 product (scale ``am·bm`` normalised)."""
    return _impl(a).di_mul(a, am, ak, b, bm, bk, None if bits <= 0 else bits)


def _mul_fake(a: Tensor, am: Tensor, ak: Tensor, b: Tensor, bm: Tensor, bk: Tensor, bits: int) -> Triple:
    shape = torch.broadcast_shapes(a.shape, b.shape)
    if bits <= 0:
        sshape = torch.broadcast_shapes(am.shape, bm.shape, ak.shape, bk.shape)
        return (a.new_empty(shape, dtype=torch.int64), a.new_empty(sshape, dtype=torch.int64),
                a.new_empty(sshape, dtype=torch.int64))
    x = a.new_empty(shape)
    return a.new_empty(shape, dtype=ref.int_dtype(bits)), _row_scale(x), _row_scale(x)


def di_linear(x: Tensor, xm: Tensor, xk: Tensor, w: Tensor, wm: Tensor, wk: int, bias: Tensor | None, bias_k: int,
              bits: int) -> Triple:
    return _impl(x).di_linear(x, xm, xk, w, wm, wk, bias, bias_k, bits)


def _linear_fake(x: Tensor, xm: Tensor, xk: Tensor, w: Tensor, wm: Tensor, wk: int, bias: Tensor | None, bias_k: int,
                 bits: int) -> Triple:
    y = x.new_empty((*x.shape[:-1], w.shape[0]), dtype=ref.int_dtype(bits))
    return y, _row_scale(y), _row_scale(y)


def di_matmul(a: Tensor, am: Tensor, ak: Tensor, b: Tensor, bm: Tensor, bk: Tensor, bits: int, a_bits: int,
              a_unsigned: bool, causal: str = "") -> Triple:
    return _impl(a).di_matmul(a, am, ak, b, bm, bk, bits, a_bits=a_bits, a_unsigned=a_unsigned, causal=causal)


def _matmul_fake(a: Tensor, am: Tensor, ak: Tensor, b: Tensor, bm: Tensor, bk: Tensor, bits: int, a_bits: int,
                 a_unsigned: bool, causal: str = "") -> Triple:
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    y = a.new_empty((*batch, a.shape[-2], b.shape[-1]), dtype=ref.int_dtype(bits))
    return y, _row_scale(y), _row_scale(y)


def di_clipped_softmax(s: Tensor, m: Tensor, k: Tensor, mask: Tensor | None, causal: bool, clip_m: int, clip_k: int,
                       order: int, bits: int) -> Triple:
    if causal:
        t, n = s.shape[-2], s.shape[-1]
        cm = torch.ones(t, n, dtype=torch.bool, device=s.device).tril(diagonal=n - t)
        mask = cm if mask is None else (mask.to(torch.bool) & cm)
    clip = clip_m / 2.0 ** clip_k  # the op API takes the real clip; the reference re-derives the same dyadic
    return _impl(s).di_clipped_softmax(s, m, k, mask, clip=clip, order=order, bits=bits)


def _softmax_fake(s: Tensor, m: Tensor, k: Tensor, mask: Tensor | None, causal: bool, clip_m: int, clip_k: int,
                  order: int, bits: int) -> Triple:
    return s.new_empty(s.shape, dtype=ref.int_dtype(bits, True)), _row_scale(s), _row_scale(s)


def di_silu(x: Tensor, m: Tensor, k: Tensor, order: int, bits: int) -> Triple:
    return _impl(x).di_silu(x, m, k, bits=bits, order=order)


def _unary_fake(x: Tensor, m: Tensor, k: Tensor, order: int, bits: int) -> Triple:
    return x.new_empty(x.shape, dtype=ref.int_dtype(bits)), _row_scale(x), _row_scale(x)


def di_gelu(x: Tensor, m: Tensor, k: Tensor, order: int, bits: int) -> Triple:
    return _impl(x).di_gelu(x, m, k, bits=bits, order=order)


def di_tanh(x: Tensor, m: Tensor, k: Tensor, order: int, bits: int) -> Triple:
    return _impl(x).di_tanh(x, m, k, bits=bits, order=order)


def di_swiglu(g: Tensor, gm: Tensor, gk: Tensor, u: Tensor, um: Tensor, uk: Tensor, order: int, bits: int) -> Triple:
    return _impl(g).di_swiglu(g, gm, gk, u, um, uk, bits, order=order)


def _swiglu_fake(g: Tensor, gm: Tensor, gk: Tensor, u: Tensor, um: Tensor, uk: Tensor, order: int, bits: int) -> Triple:
    shape = torch.broadcast_shapes(g.shape, u.shape)
    x = g.new_empty(shape)
    return g.new_empty(shape, dtype=ref.int_dtype(bits)), _row_scale(x), _row_scale(x)


def di_rmsnorm(x: Tensor, m: Tensor, k: Tensor, gamma: Tensor, gamma_k: int, eps_m: int, eps_k: int,
               bits: int) -> Triple:
    return _impl(x).di_rmsnorm(x, m, k, gamma, gamma_k, eps=eps_m / 2.0 ** eps_k, bits=bits)


def _rms_fake(x: Tensor, m: Tensor, k: Tensor, gamma: Tensor, gamma_k: int, eps_m: int, eps_k: int,
              bits: int) -> Triple:
    return x.new_empty(x.shape, dtype=ref.int_dtype(bits)), _row_scale(x), _row_scale(x)


def di_layernorm(x: Tensor, m: Tensor, k: Tensor, gamma: Tensor, beta: Tensor | None, gamma_k: int, eps_m: int,
                 eps_k: int, bits: int) -> Triple:
    return _impl(x).di_layernorm(x, m, k, gamma, beta, gamma_k, eps=eps_m / 2.0 ** eps_k, bits=bits)


def _ln_fake(x: Tensor, m: Tensor, k: Tensor, gamma: Tensor, beta: Tensor | None, gamma_k: int, eps_m: int,
             eps_k: int, bits: int) -> Triple:
    return x.new_empty(x.shape, dtype=ref.int_dtype(bits)), _row_scale(x), _row_scale(x)


_SPECS: list[tuple[str, Callable, Callable]] = [
    ("quantize_rows", quantize_rows, _quantize_rows_fake),
    ("quantize_fixed", quantize_fixed, _quantize_fixed_fake),
    ("mask_from_additive", mask_from_additive, _mask_fake),
    ("float64_fn", float64_fn, _float64_fn_fake),
    ("dequantize", dequantize, _dequantize_fake),
    ("rescale", rescale, _rescale_fake),
    ("align_rows", align_rows, _align_rows_fake),
    ("requantize_rows", requantize_rows, _requant_fake),
    ("di_add", di_add, _add_fake),
    ("di_mul", di_mul, _mul_fake),
    ("di_linear", di_linear, _linear_fake),
    ("di_matmul", di_matmul, _matmul_fake),
    ("di_clipped_softmax", di_clipped_softmax, _softmax_fake),
    ("di_silu", di_silu, _unary_fake),
    ("di_gelu", di_gelu, _unary_fake),
    ("di_tanh", di_tanh, _unary_fake),
    ("di_swiglu", di_swiglu, _swiglu_fake),
    ("di_rmsnorm", di_rmsnorm, _rms_fake),
    ("di_layernorm", di_layernorm, _ln_fake),
]

#: name -> the custom op (``torch.ops.fxquant.<name>``)
OPS: dict[str, Any] = {name: _define(name, f, fake) for name, f, fake in _SPECS}
#: ops that turn float tensors into integer ones / integer into float: the integer region's boundaries
ENTER_OPS = frozenset({"quantize_rows", "quantize_fixed", "mask_from_additive"})
EXIT_OPS = frozenset({"dequantize"})


def op(name: str) -> Any:
    """The OpOverload ``torch.ops.fxquant.<name>.default``."""
    return getattr(torch.ops.fxquant, name).default
