"""I-LLM's integer-only operators (METHODS.md §5): the bit-exact reference, in plain torch integer arithmetic.

Every function here is *the semantics* of an ``fxquant::di_*`` op: the Triton kernels in
:mod:`fxquant.backends.triton_intops` must reproduce it bit for bit, and the integer-only lowering
(:mod:`fxquant.passes.lower_integer_only`) emits nothing else between its boundaries. No function below
creates or reads a floating-point tensor, except the two boundary ops :func:`quantize_rows` (float -> integer, the
``enter`` boundary) and :func:`dequantize` (integer -> float, the ``exit`` boundary).

**The integer tensor.** A real tensor ``x`` is held as three integer tensors ``(q, m, k)`` with
``x ≈ q · m · 2^-k``: ``q`` the values (int8/uint8/int16/int32/int64), ``m`` and ``k`` int64 tensors that
broadcast against ``q`` (size 1 along the dimensions over which the scale is constant; per token means
``[..., T, 1]``). ``m`` is a *normalised* 15-bit mantissa, ``2^14 <= m < 2^15``, or 0 for an all-zero row;
``k`` is any integer. This is the dyadic scale ``m · 2^-k`` of I-LLM's DI-MatMul.

**Rounding.** All divisions round half up: ``div_round(a, b) = floor((2a + b) / 2b)`` for ``b > 0``, and
``shift_round(x, s) = floor(x / 2^s + 1/2)``; ``floor`` is the only division torch and Triton agree on once
both operands are made non-negative, so the kernels reproduce it exactly.

**Overflow.** Every intermediate is int64 and every function states its bound; inputs are pre-shifted where a
product could exceed 2^62. The error of each approximation (exp, sigmoid, the 1/sqrt) is derived in
:mod:`fxquant.backends.dyadic` with sympy and checked by the property tests.
"""
from __future__ import annotations

import torch

from .dyadic import DyadicConstant, constants

__all__ = ["MANT_BITS", "bitlen", "shift_round", "div_round", "floor_div", "normalize", "isqrt", "qrange",
           "requantize_rows", "quantize_rows", "dequantize", "align_add", "di_add", "di_mul", "di_linear",
           "di_matmul", "di_exp", "di_clipped_softmax", "di_sigmoid", "di_silu", "di_swiglu", "di_gelu", "di_tanh",
           "tanh_q30", "TANH_BITS", "di_rmsnorm", "di_layernorm", "requantize_q31", "quantize_multiplier_q31",
           "int_dtype"]

#: bits of the normalised scale mantissa ``m`` (``2^14 <= m < 2^15``)
MANT_BITS = 15
_MLO = 1 << (MANT_BITS - 1)
_I64 = torch.int64


# ---- integer helpers -------------------------------------------------------------------------------------------
def _long(x: torch.Tensor | int, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(_I64)
    return torch.tensor(int(x), dtype=_I64, device=None if like is None else like.device)


_POW2: dict[torch.device, torch.Tensor] = {}


def bitlen(x: torch.Tensor) -> torch.Tensor:
    """Number of bits of each non-negative int64 (``bitlen(0) = 0``, ``bitlen(2^j) = j + 1``): a binary search
    with shifts and compares (no float ``log2``); small tensors (per-row scales) count the powers of two they
    reach in one compare instead (the same numbers, fewer launches)."""
    v = _long(x)
    if v.numel() <= 4096:
        if v.device not in _POW2:
            _POW2[v.device] = torch.bitwise_left_shift(torch.ones(63, dtype=_I64, device=v.device),
                                                       torch.arange(63, dtype=_I64, device=v.device))
        return (v[..., None] >= _POW2[v.device]).sum(dim=-1)
    n = torch.zeros_like(v)
    for s in (32, 16, 8, 4, 2, 1):
        big = v >= (1 << s)
        n = n + big.to(_I64) * s
        v = torch.where(big, v >> s, v)
    return n + (v > 0).to(_I64)


def shift_round(x: torch.Tensor, s: torch.Tensor | int) -> torch.Tensor:
    """``round(x · 2^-s)`` (half up) for any int64 ``x`` and shift ``s`` (a tensor or int; ``s <= 0`` shifts left
    exactly). Shifts are clamped to 62 bits; a right shift by more gives the rounded 0 (or -1 ... 0)."""
    x = _long(x)
    if not isinstance(s, torch.Tensor):
        s = max(-62, min(62, int(s)))
        if s > 0:
            return (x + (1 << (s - 1))) >> s
        return x << -s if s < 0 else x
    s = _long(s)
    if s.numel() < x.numel():                       # per-row shifts: take a one-sided path when there is one
        if bool((s > 0).all()):
            right = torch.clamp(s, max=62)
            return torch.bitwise_right_shift(x + torch.bitwise_left_shift(torch.ones_like(right), right - 1), right)
        if bool((s <= 0).all()):
            return torch.bitwise_left_shift(x, torch.clamp(-s, max=62))
    right = torch.clamp(s, 0, 62)
    left = torch.clamp(-s, 0, 62)
    half = torch.where(right > 0, torch.bitwise_left_shift(torch.ones_like(right), torch.clamp(right - 1, min=0)),
                       torch.zeros_like(right))
    r = torch.bitwise_right_shift(x + half, right)
    return torch.where(s > 0, r, torch.bitwise_left_shift(x, left))


def floor_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``floor(a / b)`` for int64 ``a`` and positive ``b`` (torch's ``rounding_mode='floor'``)."""
    return torch.div(_long(a), _long(b), rounding_mode="floor")


def div_round(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    """``round(a / b)`` half up, for int64 ``a`` (|a| < 2^61) and ``b > 0``."""
    a = _long(a)
    b = _long(b, a)
    return floor_div(2 * a + b, 2 * b)


def normalize(num: torch.Tensor, k: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dyadic ``num · 2^-k`` (``num >= 0``) as a normalised ``(m, k')``: ``2^14 <= m < 2^15`` (rounded half
    up, relative error <= 2^-15), or ``(0, 0)`` when ``num = 0``."""
    num = _long(num)
    k = _long(k, num)
    sh = bitlen(num) - MANT_BITS
    m = shift_round(num, sh)
    over = m >= (1 << MANT_BITS)           # rounding carried into a 16th bit: m = 2^15 exactly, halve it
    m = torch.where(over, m >> 1, m)
    sh = sh + over.to(_I64)
    zero = num == 0
    return torch.where(zero, 0, m), torch.where(zero, 0, k - sh)


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """``floor(sqrt(n))`` for int64 ``n >= 0``, exactly: Newton's iteration from ``2^ceil(bitlen/2) >= sqrt(n)``,
    which decreases monotonically to the floor (7 steps cover 63-bit inputs; :mod:`tests.test_intops` checks
    ``r² <= n < (r+1)²`` on every 0..2^16 and on random values up to 2^62). Not I-ViT's fixed 10-step Newton
    from 2^16, which is wrong below ~2^12."""
    n = _long(n)
    x = torch.bitwise_left_shift(torch.ones_like(n), (bitlen(n) + 1) >> 1)
    for _ in range(7):
        safe = torch.where(x > 0, x, torch.ones_like(x))
        y = (x + floor_div(n, safe)) >> 1
        x = torch.where(x > 0, torch.minimum(x, y), x)
    return torch.where(n == 0, torch.zeros_like(n), x)


def qrange(bits: int, unsigned: bool = False) -> tuple[int, int]:
    """The code range of a ``bits``-bit value: symmetric ``[-(2^(b-1)-1), 2^(b-1)-1]`` (no -2^(b-1), so negation
    never overflows) or unsigned ``[0, 2^b - 1]``."""
    if unsigned:
        return 0, (1 << bits) - 1
    return -((1 << (bits - 1)) - 1), (1 << (bits - 1)) - 1


def int_dtype(bits: int, unsigned: bool = False) -> torch.dtype:
    """The narrowest torch integer dtype holding ``bits``-bit codes."""
    if unsigned:
        return torch.uint8 if bits <= 8 else torch.int16 if bits <= 15 else torch.int32 if bits <= 31 else torch.int64
    if bits <= 8:
        return torch.int8
    if bits <= 16:
        return torch.int16
    if bits <= 32:
        return torch.int32
    return torch.int64


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 32:
        raise ValueError(f"integer-only codes must have 2..32 bits, got {bits}")


# ---- requantization --------------------------------------------------------------------------------------------
def requantize_rows(x: torch.Tensor, m: torch.Tensor | int, k: torch.Tensor | int, bits: int, *,
                    unsigned: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic per-row requantization of ``x · m · 2^-k`` to ``bits``-bit codes (rows = every dim but the last).

    ``a = max |x|`` per row; ``q = round(x · qmax / a)`` (half up, clamped); the new scale is
    ``a · m · 2^-k / qmax``, normalised. ``m`` may be any non-negative int64 below 2^62 (it is normalised
    first). ``x`` may be any int64: rows whose maximum would overflow ``x · qmax`` are first shifted right (the
    output has only ``bits`` bits, so nothing that survives is lost). With ``unsigned`` the codes are
    ``[0, 2^bits - 1]`` and ``x`` must be non-negative. Returns ``(q, m', k')``.
    """
    _check_bits(bits)
    x = _long(x)
    lo, qmax = qrange(bits, unsigned)
    m, k = normalize(_long(m, x), k)
    a = x.abs().amax(dim=-1, keepdim=True)
    pre = torch.clamp(bitlen(a) - (62 - bits), min=0)          # keep a · qmax < 2^62
    if bool((pre > 0).any()):
        x = shift_round(x, pre)
        a = shift_round(a, pre)
    safe = torch.where(a > 0, a, torch.ones_like(a))
    q = torch.clamp(div_round(x * qmax, safe), lo, qmax)
    q = torch.where(a > 0, q, torch.zeros_like(q))
    am, ak = normalize(a, -pre)                                # a · 2^pre = am · 2^-ak, am < 2^15
    num = am * m                                               # < 2^30
    mo, ko = normalize(div_round(num << 17, qmax), k + ak + 17)
    zero = (a == 0) | (m == 0)
    return q.to(int_dtype(bits, unsigned)), torch.where(zero, 0, mo), torch.where(zero, 0, ko)


def quantize_rows(x: torch.Tensor, bits: int, *, unsigned: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``enter`` boundary: a float tensor -> ``(q, m, k)`` with a dynamic per-row (per-token) scale.

    The dyadic scale is fixed first (``amax / qmax`` rounded to a 15-bit mantissa) and ``q = round(x / scale)``
    against that exact scale, so :func:`dequantize` returns the nearest representable value.
    """
    _check_bits(bits)
    if not x.dtype.is_floating_point:
        raise TypeError(f"quantize_rows takes a float tensor, got {x.dtype}")
    lo, qmax = qrange(bits, unsigned)
    xd = x.double()
    a = xd.abs().amax(dim=-1, keepdim=True)
    if not torch.isfinite(a).all():
        raise ValueError("quantize_rows: the input has NaN or Inf values")
    mant, exp = torch.frexp(a / qmax)                          # scale = mant · 2^exp, 0.5 <= mant < 1
    # rounded up, so that the largest value never saturates
    m = torch.ceil(torch.ldexp(mant, torch.full_like(exp, MANT_BITS))).to(_I64)
    k = (MANT_BITS - exp).to(_I64)
    over = m >= (1 << MANT_BITS)
    m = torch.where(over, m >> 1, m)
    k = torch.where(over, k - 1, k)
    zero = a == 0
    m = torch.where(zero, 0, m)
    k = torch.where(zero, 0, k)
    scale = torch.ldexp(m.double(), -k)
    q = torch.clamp(torch.floor(xd / torch.where(zero, 1.0, scale) + 0.5), lo, qmax)
    return q.to(int_dtype(bits, unsigned)), m, k


def dequantize(q: torch.Tensor, m: torch.Tensor, k: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``exit`` boundary: ``q · m · 2^-k`` as a float tensor (computed in float64, then cast)."""
    return torch.ldexp(q.double() * m.double(), -k.double()).to(dtype)


# ---- element-wise ------------------------------------------------------------------------------------------------
def align_add(a: torch.Tensor, ka: torch.Tensor, b: torch.Tensor, kb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a · 2^-ka + b · 2^-kb`` as ``(s, kc)``, ``kc = min(ka, kb)``: the operand with the finer exponent is
    shifted right (rounded), so nothing is shifted left and nothing overflows."""
    a, b = _long(a), _long(b)
    ka, kb = _long(ka, a), _long(kb, b)
    kc = torch.minimum(ka, kb)
    return shift_round(a, ka - kc) + shift_round(b, kb - kc), kc


def di_add(a: torch.Tensor, am: torch.Tensor, ak: torch.Tensor, b: torch.Tensor, bm: torch.Tensor, bk: torch.Tensor,
           bits: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer residual add: ``a·am·2^-ak + b·bm·2^-bk`` aligned to the coarser exponent, requantized per row to
    ``bits`` (16 for I-LLM's residual stream). |a|, |b| < 2^31 and m < 2^15 keep every product below 2^46."""
    ak, bk = _live_exponents(am, ak, bm, bk)
    s, kc = align_add(_long(a) * _long(am), ak, _long(b) * _long(bm), bk)
    return requantize_rows(s, 1, kc, bits)


def _live_exponents(am: torch.Tensor, ak: torch.Tensor, bm: torch.Tensor, bk: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The exponents an add aligns to, where a zero row (multiplier 0, exponent 0 by convention) takes the other
    operand's: otherwise its exponent 0 would be the coarser one and round the other operand to integers."""
    am, ak, bm, bk = _long(am), _long(ak), _long(bm), _long(bk)
    ak = torch.where(am == 0, bk, ak)
    return ak, torch.where(bm == 0, ak, bk)


def di_mul(a: torch.Tensor, am: torch.Tensor, ak: torch.Tensor, b: torch.Tensor, bm: torch.Tensor, bk: torch.Tensor,
           bits: int | None = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Element-wise product. ``bits=None`` keeps the exact int64 product with the scale ``am·bm`` normalised
    (scale rounding <= 2^-15), otherwise it is requantized per row to ``bits``."""
    p = _long(a) * _long(b)
    if bits is None:
        m, k = normalize(_long(am) * _long(bm), _long(ak) + _long(bk))
        return p, m, k
    return requantize_rows(p, _long(am) * _long(bm), _long(ak) + _long(bk), bits)


# ---- DI-MatMul ---------------------------------------------------------------------------------------------------
def _range(t: torch.Tensor) -> tuple[int, int]:
    """Bounds of an integer tensor's values: from its dtype where that is narrow, else from a scan."""
    if t.dtype == torch.int8:
        return -128, 127
    if t.dtype == torch.uint8:
        return 0, 255
    if not t.numel():
        return 0, 0
    lo, hi = torch.aminmax(t)
    return int(lo), int(hi)


def _int8_mm(a: torch.Tensor, b: torch.Tensor, a_unsigned: bool) -> torch.Tensor:
    """``a @ b`` for 8-bit codes with torch's int8 GEMM (``torch._int_mm``, int32 accumulation; exact for K < 2^16).
    Unsigned ``a`` (softmax outputs, 0..255) is shifted to int8: ``a·b = (a - 128)·b + 128·Σ_k b[k, :]``. A
    weight shared by every batch folds the batch into the rows; otherwise one GEMM per batch."""
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    a8 = (a.to(torch.int16) - 128).to(torch.int8) if a_unsigned else a.to(torch.int8)
    b8 = b.to(torch.int8)
    if b.dim() == 2 or all(d == 1 for d in b.shape[:-2]):
        out = torch._int_mm(torch.broadcast_to(a8, batch + (m, k)).reshape(-1, k), b8.reshape(k, n))
        out = out.reshape(batch + (m, n))
    else:
        a3 = torch.broadcast_to(a8, batch + (m, k)).reshape(-1, m, k)
        b3 = torch.broadcast_to(b8, batch + (k, n)).reshape(-1, k, n)
        out = torch.stack([torch._int_mm(x, y) for x, y in zip(a3, b3)]).reshape(batch + (m, n)) if len(a3) else \
            torch.zeros(batch + (m, n), dtype=torch.int32, device=a.device)
    if a_unsigned:
        out = out + 128 * b8.to(torch.int32).sum(dim=-2, keepdim=True)
    return out.to(_I64)


def _matmul_int(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer matmul. 8-bit codes on the CPU: torch's int8 GEMM (:func:`_int8_mm`, an order of magnitude
    faster than the int32 one); else int32 operands (exact while ``K · |a|·|b| < 2^31``, which the callers
    guarantee for 8-bit and 16x8-bit operands up to K = 65535 / 2^15); int64 otherwise."""
    (alo, ahi), (blo, bhi) = _range(a), _range(b)
    k = a.shape[-1]
    if a.device.type == "cpu" and b.device.type == "cpu" and -128 <= blo and bhi <= 127 and k < 2 ** 16 and (
            (-128 <= alo and ahi <= 127) or (0 <= alo and ahi <= 255)) and a.shape[-2] and k and b.shape[-1]:
        return _int8_mm(a, b, a_unsigned=ahi > 127)
    amax, bmax = max(-alo, ahi), max(-blo, bhi)
    if amax * bmax * k < 2 ** 31:
        return torch.matmul(a.to(torch.int32), b.to(torch.int32)).to(_I64)
    return torch.matmul(a.to(_I64), b.to(_I64))


def _align_exponents(m: torch.Tensor, k: torch.Tensor, dim: int, headroom: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales ``m·2^-k`` that vary along ``dim`` as multipliers on one common exponent ``kc`` (reduced over
    ``dim``): ``m' = round(m · 2^(kc - k))`` with ``kc = min(max k, min k + headroom)``, so ``m' < 2^(15+headroom)``;
    entries more than ``headroom`` bits finer than the coarsest lose their low bits (they are below 2^-16 of the
    largest scale)."""
    m, k = _long(m), _long(k)
    kmax = k.amax(dim=dim, keepdim=True)
    kmin = torch.where(m > 0, k, kmax).amin(dim=dim, keepdim=True)
    kc = torch.minimum(kmax, kmin + headroom)
    return shift_round(m, k - kc), kc


def di_linear(x: torch.Tensor, xm: torch.Tensor, xk: torch.Tensor, w: torch.Tensor, wm: torch.Tensor, wk: int,
              bias: torch.Tensor | None = None, bias_k: int = 0, bits: int = 8
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DI-MatMul for ``x @ wᵀ (+ b)``: integer activations ``x[..., K]`` with per-row scales, integer weights
    ``w[N, K]`` (int8 codes, any width up to 8 bits) with per-output-channel multipliers ``wm[N]`` (< 2^24) on
    one exponent ``wk``, an optional integer bias ``bias[N]`` at ``2^-bias_k``.

    ``P = x @ wᵀ`` (int32), ``S = P · wm`` (< 2^49 for K <= 2^11 · 8), then per-row requantization to ``bits``
    with the row scale ``xm · 2^-(xk + wk)``. With a bias, the bias is brought to the accumulator's units per row
    (``b · 2^(xk + wk - bias_k) / xm``, rounded) and added before the requantization.
    """
    p = _matmul_int(x, w.t())
    s = p * _long(wm)
    xm, xk = _long(xm), _long(xk)
    if bias is not None:
        # a zero row (scale 0, codes 0: a padding token's embedding, a dead ReLU row) gives the bias: its
        # accumulator is put at the bias's exponent with multiplier 1
        dead = xm == 0
        xm, xk = torch.where(dead, 1, xm), torch.where(dead, int(bias_k) - int(wk), xk)
    kacc = xk + int(wk)
    if bias is not None:
        bsh = shift_round(_long(bias), torch.clamp(bias_k - kacc, min=-40, max=62))   # bias · 2^(kacc - bias_k)
        safe = torch.where(xm > 0, xm, torch.ones_like(xm))
        s = s + torch.where(xm > 0, div_round(bsh, safe), torch.zeros_like(bsh))
    return requantize_rows(s, xm, kacc, bits)


def _align_exponents_causal(m: torch.Tensor, k: torch.Tensor, rows: int, headroom: int = 16
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_align_exponents` of per-key scales ``[..., K, 1]`` done separately for each of ``rows`` output rows
    over only the keys that row attends to causally (row ``i`` sees ``j <= i + K - rows``: the bottom-right
    alignment of a query block that follows ``K - rows`` cached keys). Returns multipliers ``[..., rows, K]`` (0
    where the row does not look) and the rows' exponents ``[..., rows, 1]``. No row depends on a scale it cannot
    see, which is what makes a KV cache give the full sequence's result bit for bit."""
    m, k = _long(m)[..., 0], _long(k)[..., 0]                         # [..., K]
    kdim = k.shape[-1]
    if kdim == 0:
        shape = (*k.shape[:-1], rows)
        return k.new_zeros((*shape, 0)), k.new_zeros((*shape, 1))
    kmax = torch.cummax(k, dim=-1).values
    big = torch.full_like(k, 1 << 40)
    kmin = torch.minimum(torch.cummin(torch.where(m > 0, k, big), dim=-1).values, kmax)
    kc = torch.minimum(kmax, kmin + headroom)                          # [..., K]: the row whose last key is j
    last = torch.arange(rows, device=k.device) + (kdim - rows)         # each row's last visible key
    kc_rows = kc[..., torch.clamp(last, min=0)]                        # [..., rows]
    mk = shift_round(m[..., None, :], k[..., None, :] - kc_rows[..., :, None])
    visible = torch.arange(kdim, device=k.device)[None, :] <= last[:, None]
    return torch.where(visible, mk, torch.zeros_like(mk)), kc_rows[..., None]


#: ``di_matmul(causal=...)``: the keys are ``b``'s rows (``P V``) or ``b``'s columns (``Q Kᵀ``)
CAUSAL_MODES = ("", "reduction", "columns")


def causal_key_scales(b: torch.Tensor, bm: torch.Tensor, bk: torch.Tensor, causal: str
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-key scales of ``b`` as ``[..., keys, 1]`` for ``causal`` (a per-tensor scale broadcast: one key is no
    special case), checked against ``b``'s layout."""
    if causal not in CAUSAL_MODES[1:]:
        raise ValueError(f"di_matmul: causal must be one of {CAUSAL_MODES}, got {causal!r}")
    if causal == "reduction":
        if bm.shape[-1] != 1:
            raise ValueError("di_matmul: causal='reduction' (P V) needs b's scale per row (per key)")
        shape = (*bm.shape[:-2], b.shape[-2], 1)
        return bm.expand(shape), bk.expand(shape)
    if bm.shape[-2] != 1:
        raise ValueError("di_matmul: causal='columns' (Q Kᵀ) needs b's scale per column (per key)")
    shape = (*bm.shape[:-2], 1, b.shape[-1])
    return bm.expand(shape).transpose(-1, -2), bk.expand(shape).transpose(-1, -2)


def di_matmul(a: torch.Tensor, am: torch.Tensor, ak: torch.Tensor, b: torch.Tensor, bm: torch.Tensor, bk: torch.Tensor,
              bits: int = 16, *, a_bits: int = 8, a_unsigned: bool = False, causal: str = ""
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DI-MatMul between two activations (the attention products): ``a[..., M, K] @ b[..., K, N]``.

    ``a``'s scale must be per row (``[..., M, 1]``). ``b``'s scale may be per column (``[..., 1, N]``, e.g. keys
    quantized per token in ``Q Kᵀ``): the columns' multipliers are aligned to one exponent and applied to the int32
    product; or per row (``[..., K, 1]``, e.g. values quantized per token in ``P V``): a scale along the reduction
    dimension cannot stay outside the sum, so it is folded into ``a``'s columns (on one exponent common to all keys)
    and ``a`` is requantized per row to ``a_bits`` before the product. Per-tensor scales (``[..., 1, 1]``) are both.
    The output is requantized per row to ``bits``.

    ``causal`` is for causal attention, where row ``i`` attends to keys ``j <= i + (keys - M)``: ``"reduction"``
    (``P V``: the keys are ``b``'s rows) or ``"columns"`` (``Q Kᵀ``: the keys are ``b``'s columns). The keys'
    exponent is then chosen per row over the keys that row sees (:func:`_align_exponents_causal`) and the keys it
    does not see count as 0 — in ``Q Kᵀ`` also in the row's maximum, which sets its output scale. No row then
    depends on a later key, so the rows of a query block after cached keys are those of the whole sequence.
    """
    a, b = _long(a), _long(b)
    am, ak, bm, bk = _long(am), _long(ak), _long(bm), _long(bk)
    if am.shape[-1] != 1:
        raise ValueError(f"di_matmul: a's scale must be per row ([..., M, 1]), got shape {tuple(am.shape)}")
    if bm.shape[-2] != 1 and bm.shape[-1] != 1:
        raise ValueError(f"di_matmul: b's scale must be per column or per row, got shape {tuple(bm.shape)}")
    if causal:
        km, kk = causal_key_scales(b, bm, bk, causal)
        mk, kc = _align_exponents_causal(km, kk, a.shape[-2])          # [..., M, keys], [..., M, 1]
        if causal == "columns":
            return requantize_rows(_matmul_int(a, b) * mk, am, ak + kc, bits)
        a, am, ak = requantize_rows(a * mk, am, ak + kc, a_bits, unsigned=a_unsigned)
        return requantize_rows(_matmul_int(_long(a), b), am, ak, bits)
    if bm.shape[-2] != 1:                                       # per reduction index: fold into a's columns
        mk, kc = _align_exponents(bm, bk, dim=-2)               # [..., K, 1], [..., 1, 1]
        a2 = a * mk.transpose(-1, -2)                           # [..., M, K] · [..., 1, K]
        a, am, ak = requantize_rows(a2, am, ak + kc, a_bits, unsigned=a_unsigned)
        a, am, ak = _long(a), _long(am), _long(ak)
        bm = torch.ones_like(kc)
        bk = torch.zeros_like(kc)
    mk, kc = _align_exponents(bm, bk, dim=-1)                   # per column multipliers [..., 1, N] on kc
    p = _matmul_int(a, b) * mk
    return requantize_rows(p, am, ak + kc, bits)


# ---- DI-Exp, DI-ClippedSoftmax -----------------------------------------------------------------------------------
def _exp2_neg_frac(f: torch.Tensor, frac_bits: int, order: int) -> torch.Tensor:
    """``2^(-f / 2^F)`` for ``0 <= f < 2^F``, in ``F`` fractional bits: ``order=1`` is I-LLM's shift-only
    ``1 - f/2`` (relative error <= 6.2%), ``order=2`` a quadratic through 1, 2^-1/2 and 1/2 (<= 0.2%)."""
    one = 1 << frac_bits
    if order == 1:
        return one - (f >> 1)
    c1, c2 = constants().exp2_c1, constants().exp2_c2                 # 2^-x ≈ 1 - c1 x + c2 x², dyadic
    t1 = shift_round(f * c1.m, c1.k)                                  # c1 · f
    f2 = shift_round(f * f, frac_bits)                                # f² / 2^F
    t2 = shift_round(f2 * c2.m, c2.k)
    return one - t1 + t2


def di_exp(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor, *, frac_bits: int = 15, order: int = 2,
           clip: DyadicConstant | None = None) -> torch.Tensor:
    """DI-Exp: ``exp(x · m · 2^-k)`` for ``x <= 0`` as an int64 with ``frac_bits`` fractional bits.

    ``exp(v) = 2^(v · log2 e)``; ``t = v · log2 e`` is formed in fixed point (``log2 e`` a 15-bit dyadic, error
    <= 2^-15), clipped at ``-clip · log2 e`` (default: ``-(frac_bits + 1) · ln 2``, below which the result is 0);
    its integer part becomes a right shift and its fraction ``2^-f`` the polynomial of :func:`_exp2_neg_frac`.
    Inputs with ``|x · m| >= 2^47`` (far beyond any clip) are pre-shifted element by element, so nothing overflows.
    """
    if order not in (1, 2):
        raise ValueError(f"di_exp order must be 1 (shift-only, I-LLM) or 2 (quadratic), got {order}")
    x, m, k = _long(x), _long(m), _long(k)
    c = constants()
    lg = c.log2e
    # t = x · m · lg.m · 2^-(k + lg.k) in units of 2^-F: |x · m| < 2^47, · lg.m (2^15) would overflow -> shift first
    xm = x * m
    if xm.numel() and int(bitlen(xm.abs().amax())) <= 46:
        t = shift_round(xm * lg.m, k + lg.k - frac_bits)
    else:
        pre = torch.clamp(bitlen(xm.abs()) - 46, min=0)        # per element: only already-clipped inputs lose bits
        t = shift_round(shift_round(xm, pre) * lg.m, k + lg.k - frac_bits - pre)
    t = torch.clamp(t, max=0)
    limit = (frac_bits + 2) << frac_bits if clip is None else shift_round(_long(clip.m * lg.m), clip.k + lg.k - frac_bits)
    u = torch.clamp(-t, max=int(limit))
    whole = u >> frac_bits
    f = u & ((1 << frac_bits) - 1)
    e = _exp2_neg_frac(f, frac_bits, order)
    e = torch.bitwise_right_shift(e, torch.clamp(whole, max=62))
    return torch.where(u >= int(limit), torch.zeros_like(e), e)


def di_clipped_softmax(s: torch.Tensor, m: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, *,
                       clip: float = 15.0, frac_bits: int = 15, order: int = 2, bits: int = 8,
                       normalize_to: str = "max") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DI-ClippedSoftmax over the last dim of integer scores ``s`` (per-row scale ``m·2^-k``).

    ``Δ = s - max s`` (over unmasked entries), clipped to ``[-clip, 0]`` in real units, ``E = DI-Exp(Δ)``
    (masked entries 0), and the ``bits``-bit unsigned output: with ``normalize_to="max"`` (default)
    ``P = round(E · (2^bits-1) / 2^F)`` — relative to the row maximum, whose ``E`` is exactly ``2^F`` — with the
    per-row scale ``2^F / ((2^bits - 1) · ΣE)``, so small probabilities keep their precision; with ``"sum"``
    I-LLM's ``P = ⌊E · (2^bits - 1) / ΣE⌋`` with the constant scale ``1 / (2^bits - 1)``. ``mask`` is a bool
    tensor (True = attend) broadcastable to ``s``; a fully masked row gives zeros.
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"di_clipped_softmax output must have 2..16 bits, got {bits}")
    s = _long(s)
    if mask is not None:
        mask = mask.to(torch.bool)
        lowest = torch.iinfo(torch.int64).min // 4
        smax = torch.where(mask, s, lowest).amax(dim=-1, keepdim=True)
    else:
        smax = s.amax(dim=-1, keepdim=True)
    delta = torch.clamp(s - smax, max=0)
    delta = torch.clamp(delta, min=-(1 << 30))                   # masked entries: far below any clip
    clipc = constants().dyadic(clip)
    e = di_exp(delta, m, k, frac_bits=frac_bits, order=order, clip=clipc)
    if mask is not None:
        e = torch.where(mask, e, torch.zeros_like(e))
    total = e.sum(dim=-1, keepdim=True)
    qmax = (1 << bits) - 1
    if normalize_to == "sum":
        safe = torch.where(total > 0, total, torch.ones_like(total))
        p = torch.clamp(floor_div(e * qmax, safe), 0, qmax)
        pm, pk = normalize(div_round(torch.full_like(total, 1 << 40), qmax), torch.full_like(total, 40))
        zero = total == 0
        return p.to(int_dtype(bits, True)), torch.where(zero, 0, pm), torch.where(zero, 0, pk)
    if normalize_to != "max":
        raise ValueError(f"normalize_to must be 'max' or 'sum', got {normalize_to!r}")
    p = torch.clamp(shift_round(e * qmax, frac_bits), 0, qmax)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    num = div_round(torch.full_like(total, 1 << 62) // qmax, safe)     # 2^62 / (qmax · ΣE); ΣE >= 2^F
    pm, pk = normalize(num, torch.full_like(total, 62 - frac_bits))
    zero = total == 0
    return p.to(int_dtype(bits, True)), torch.where(zero, 0, pm), torch.where(zero, 0, pk)


# ---- DI-SwiGLU, GELU --------------------------------------------------------------------------------------------
#: fractional bits of the integer sigmoid
SIGMOID_BITS = 15


def di_sigmoid(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor, *, frac_bits: int = 15, order: int = 2
               ) -> torch.Tensor:
    """``σ(x · m·2^-k)`` in ``SIGMOID_BITS`` fractional bits, both exponentials by DI-Exp on non-positive inputs:
    ``σ(v) = e^(v-M) / (e^(v-M) + e^(-M))`` with ``M = max(v, 0)`` per element (a row maximum would underflow
    both exponentials of a negative entry to 0/0)."""
    x = _long(x)
    e = di_exp(-x.abs(), m, k, frac_bits=frac_bits, order=order, clip=constants().dyadic(float(frac_bits + 2)))
    one = 1 << frac_bits
    num = torch.where(x >= 0, torch.full_like(e, one), e)
    return div_round(num << SIGMOID_BITS, one + e)


def di_silu(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor, *, bits: int | None = 16, order: int = 2
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer SiLU ``x · σ(x)``: exact product of the codes and the integer sigmoid, then (``bits``) requantized."""
    sig = di_sigmoid(x, m, k, order=order)
    p = _long(x) * sig
    if bits is None:
        return p, _long(m), _long(k) + SIGMOID_BITS
    return requantize_rows(p, m, _long(k) + SIGMOID_BITS, bits)


def di_swiglu(g: torch.Tensor, gm: torch.Tensor, gk: torch.Tensor, u: torch.Tensor, um: torch.Tensor, uk: torch.Tensor,
              bits: int = 8, *, order: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DI-SwiGLU ``silu(gate) · up``: ``g · σ_int(g) · u`` exactly in int64 (16-bit codes: < 2^47), requantized per
    row to ``bits`` (the down projection's input width)."""
    if g.dtype in (torch.int32, torch.int64) or u.dtype in (torch.int32, torch.int64):
        raise ValueError("di_swiglu takes codes of at most 16 bits (requantize gate and up first)")
    sig = di_sigmoid(g, gm, gk, order=order)
    p = _long(g) * sig * _long(u)                                # < 2^15 · 2^15 · 2^15
    return requantize_rows(p, _long(gm) * _long(um), _long(gk) + _long(uk) + SIGMOID_BITS, bits)


#: fractional bits of the integer tanh before its output requantization
TANH_BITS = 30


def tanh_q30(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor, *, order: int = 2) -> torch.Tensor:
    """``tanh(v)``, ``v = x · m·2^-k``, in ``TANH_BITS`` fractional bits, exactly odd (computed on ``|v|``, the sign
    put back) with ``tanh(0) = 0``:

    * ``|v| >= 1/4``: ``2σ(2|v|) - 1`` from the integer sigmoid (``2|v|`` is the same codes on ``m·2^-(k-1)``),
      absolute error ``<= tanh_abs_bound`` (``dyadic``);
    * ``|v| < 1/4``: ``u - u³/3 + 2u⁵/15`` on ``u = v`` in Q30 — the sigmoid's absolute error would be a large
      relative one there (a soft-cap divides by 30 or 50 first); the series' remainder is below the next term,
      ``17/315·|v|⁷ < 4·10^-6·|v|``, plus a few units of ``2^-30``.
    """
    x = _long(x)
    ax = x.abs()
    m, k = _long(m), _long(k)
    s = di_sigmoid(ax, m, k - 1, order=order)
    big = (2 * s - (1 << SIGMOID_BITS)) << (TANH_BITS - SIGMOID_BITS)
    xm = ax * m
    kk = torch.broadcast_to(k, xm.shape)
    small = torch.where(kk >= 2, torch.bitwise_right_shift(xm, torch.clamp(kk - 2, 0, 62)) == 0, xm == 0)
    u = shift_round(torch.where(small, xm, 0), kk - TANH_BITS)
    u2 = shift_round(u * u, TANH_BITS)
    u3 = shift_round(u2 * u, TANH_BITS)
    u5 = shift_round(u3 * u2, TANH_BITS)
    poly = u - floor_div(2 * u3 + 3, torch.full_like(u3, 6)) + floor_div(4 * u5 + 15, torch.full_like(u5, 30))
    t = torch.where(small, poly, big)
    return torch.where(x < 0, -t, t)


def di_tanh(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor, *, bits: int = 16, order: int = 2
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer tanh (Gemma-2's attention and logit soft-caps ``c · tanh(x / c)``): :func:`tanh_q30` requantized
    per row to ``bits``."""
    t = tanh_q30(x, m, k, order=order)
    one = torch.ones_like(_long(m))
    return requantize_rows(t, one, one * TANH_BITS, bits)


def di_gelu(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor, *, bits: int = 8, order: int = 2
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer GELU for encoders, ``x · σ(1.702 x)`` (I-ViT's ShiftGELU form; |error| vs the erf GELU <= 0.021,
    derived in :mod:`fxquant.backends.dyadic`), with 1.702 a 15-bit dyadic folded into the sigmoid's scale."""
    c = constants().gelu_alpha
    m2, k2 = normalize(_long(m) * c.m, _long(k) + c.k)
    sig = di_sigmoid(x, m2, k2, order=order)
    p = _long(x) * sig
    return requantize_rows(p, m, _long(k) + SIGMOID_BITS, bits)


# ---- DI-Norm -----------------------------------------------------------------------------------------------------
#: fractional bits of the integer RMS (``r = rms · 2^RMS_BITS``) and of the normalised value before requantization
RMS_BITS = 8
NORM_BITS = 8


#: where ``eps / scale²`` saturates: far above any ``Σx² · 2^16 / C`` (< 2^59), and ``r² < 2^62`` stays exact
EPS_UNITS_MAX = 1 << 61


def _eps_units(m: torch.Tensor, k: torch.Tensor, eps: DyadicConstant) -> torch.Tensor:
    """``eps / scale²`` in units of ``2^-2·RMS_BITS`` of the squared codes, saturated at :data:`EPS_UNITS_MAX`.
    Saturation only happens to rows whose magnitude is far below ``sqrt(eps)`` (16-bit codes: below ~5.6e-6 at
    eps 1e-6): eps dominates their RMS, they normalise to less than ``2^-7.5·γ`` (float: ~``x/sqrt(eps)``), and the
    saturated eps keeps them there, where a low saturation would blow them up to unit RMS.
    ``eps.m · 2^min(sh, 40) / m²`` is rounded first, then shifted left by the rest of ``sh``."""
    m, k = _long(m), _long(k)
    sh = 2 * k + 2 * RMS_BITS - eps.k                          # eps.m · 2^sh / m²
    num = shift_round(_long(eps.m, m) * torch.ones_like(m), -torch.clamp(sh, max=40))
    safe = torch.where(m > 0, m * m, torch.ones_like(m))
    q1 = torch.where(m > 0, div_round(num, safe), torch.zeros_like(m))
    extra = torch.clamp(sh - 40, min=0, max=62)
    big = (q1 > 0) & ((sh - 40 > 61) | (q1 >= (EPS_UNITS_MAX >> extra)))
    return torch.where(big, EPS_UNITS_MAX, q1 << extra)


def _normalized(xc: torch.Tensor, ss: torch.Tensor, n: int, m: torch.Tensor, k: torch.Tensor,
                gamma: torch.Tensor, gamma_k: int, eps: DyadicConstant) -> tuple[torch.Tensor, int]:
    r2 = div_round(ss << (2 * RMS_BITS), n) + _eps_units(m, k, eps)
    r = isqrt(r2)                                              # rms · 2^RMS_BITS (in code units)
    safe = torch.where(r > 0, r, torch.ones_like(r))
    y = div_round((xc * _long(gamma)) << (RMS_BITS + NORM_BITS), safe)
    return torch.where(r > 0, y, torch.zeros_like(y)), gamma_k + NORM_BITS


def di_rmsnorm(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor, gamma: torch.Tensor, gamma_k: int, *,
               eps: float = 1e-6, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DI-Norm (RMSNorm): ``x · γ / sqrt(mean(x²) + eps)`` with integer ``γ[C]`` (codes at ``2^-gamma_k``).

    The input scale cancels except in ``eps``: ``r = isqrt(Σx² · 2^16 / C + eps/scale² · 2^16)`` is the RMS in
    code units with 8 fractional bits, ``y = round(x · γ · 2^16 / r)`` the normalised value at
    ``2^-(gamma_k + 8)``, requantized per row to ``bits``. Codes up to 16 bits and rows up to 2^13 keep
    ``Σx²·2^16 < 2^59``. A zero row gives zeros.
    """
    x = _long(x)
    n = x.shape[-1]
    ss = (x * x).sum(dim=-1, keepdim=True)
    y, yk = _normalized(x, ss, n, m, k, gamma, gamma_k, constants().dyadic(eps))
    return requantize_rows(y, 1 << (MANT_BITS - 1), yk + MANT_BITS - 1, bits)


def di_layernorm(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None,
                 gamma_k: int, *, eps: float = 1e-5, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DI-Norm (LayerNorm): ``(x - mean) · γ / sqrt(var + eps) + β``; the mean is the rounded integer mean (an
    all-equal row centres to exactly 0 and gives ``β``), ``β`` is an integer at ``2^-(gamma_k + 8)``, the output
    scale of the normalised value, added before the per-row requantization."""
    x = _long(x)
    n = x.shape[-1]
    xc = x - div_round(x.sum(dim=-1, keepdim=True), n)
    ss = (xc * xc).sum(dim=-1, keepdim=True)
    y, yk = _normalized(xc, ss, n, m, k, gamma, gamma_k, constants().dyadic(eps))
    if beta is not None:
        y = y + _long(beta)
    return requantize_rows(y, 1 << (MANT_BITS - 1), yk + MANT_BITS - 1, bits)


# ---- gemmlowp-style Q31 requantization ---------------------------------------------------------------------------
def quantize_multiplier_q31(real: float) -> tuple[int, int]:
    """A real multiplier in (0, 1) as ``(M, shift)`` with ``M`` in ``[2^30, 2^31)`` and ``real ≈ M · 2^-(31+shift)``
    (compile-time constant, so float is allowed here)."""
    import math  # noqa: PLC0415
    if not 0.0 < real < 1.0:
        raise ValueError(f"a Q31 multiplier must lie in (0, 1), got {real}")
    mant, exp = math.frexp(real)
    q = round(mant * (1 << 31))
    if q == 1 << 31:
        q //= 2
        exp += 1
    return q, -exp


def requantize_q31(acc: torch.Tensor, multiplier: int, shift: int) -> torch.Tensor:
    """gemmlowp's ``RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc, M), shift)`` on int32 ``acc``, bit for
    bit (the QNNPACK/TFLite reference): the doubled high product rounds half away from zero, the shift rounds half
    away from zero too."""
    a = _long(acc)
    mul = int(multiplier)
    overflow = (a == -(1 << 31)) & (mul == -(1 << 31))
    ab = a * mul
    nudge = torch.where(ab >= 0, torch.full_like(ab, 1 << 30), torch.full_like(ab, 1 - (1 << 30)))
    num = ab + nudge
    # C++ integer division truncates toward zero
    high = torch.where(num >= 0, num >> 31, -((-num) >> 31))
    high = torch.where(overflow, torch.full_like(high, (1 << 31) - 1), high)
    if shift <= 0:
        return high.to(torch.int32)
    mask = (1 << shift) - 1
    rem = high & mask
    threshold = (mask >> 1) + (high < 0).to(_I64)
    return ((high >> shift) + (rem > threshold).to(_I64)).to(torch.int32)
