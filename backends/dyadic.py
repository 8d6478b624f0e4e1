"""Dyadic constants of the integer-only operators and the error bounds they carry, derived with sympy.

A dyadic constant is ``m · 2^-k`` with a 15-bit mantissa ``2^14 <= m < 2^15``; the integer operators of
:mod:`fxquant.backends.intops` multiply by ``m`` and shift by ``k``. This module is where each constant comes
from and where the error it introduces is *derived* (not measured): sympy evaluates the exact rational error of a
dyadic against the real constant, and finds the extrema of the polynomial approximations by solving for the
roots of their derivatives. The property tests compare the integer operators against the float functions
with these bounds (plus the quantization step of their inputs and outputs).

=====================  ==========================================================================================
constant / bound       what it is
=====================  ==========================================================================================
``log2e``              ``log2(e)`` for DI-Exp's ``2^(x·log2 e)``; relative error < 2^-15
``exp2_c1, exp2_c2``   ``2^-x ≈ 1 - c1·x + c2·x²`` on ``[0, 1)``, the quadratic through ``x = 0, 1/2, 1``
``exp2_order1_rel``    max relative error of I-LLM's shift-only ``2^-x ≈ 1 - x/2`` (6.15%, at ``x = 2 - 1/ln 2``)
``exp2_order2_rel``    max relative error of the quadratic (0.18%)
``gelu_alpha``         1.702 of ``gelu(x) ≈ x·σ(1.702 x)``; ``gelu_abs`` its max absolute error vs erf-GELU
``tanh_abs_bound``     absolute error of the integer ``tanh = 2σ(2|x|) - 1`` (from DI-Exp's relative bound)
=====================  ==========================================================================================
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import sympy as sp

__all__ = ["DyadicConstant", "Constants", "constants", "dyadic", "dyadic_error"]

MANT_BITS = 15


@dataclass(frozen=True)
class DyadicConstant:
    """``m · 2^-k``: a real constant as integer multiplier ``m`` and right shift ``k``."""

    m: int
    k: int
    #: the real value it stands for (documentation and tests only)
    value: float = 0.0

    @property
    def approx(self) -> float:
        return self.m / 2.0 ** self.k

    @property
    def rational(self) -> sp.Rational:
        return sp.Rational(self.m, 2 ** self.k) if self.k >= 0 else sp.Integer(self.m * 2 ** -self.k)


def dyadic(value: float | sp.Expr, bits: int = MANT_BITS) -> DyadicConstant:
    """The nearest dyadic ``m · 2^-k`` with a ``bits``-bit normalised mantissa (``value > 0``), computed exactly
    with sympy (so ``log2 e`` or ``1/sqrt(64)`` are rounded once, from their exact values)."""
    if isinstance(value, (int, float)):
        return _dyadic_number(float(value), bits)
    return _dyadic_expr(value, bits)


@functools.lru_cache(maxsize=256)
def _dyadic_number(value: float, bits: int) -> DyadicConstant:
    return _dyadic_expr(sp.Rational(value), bits, float(value))   # the float's exact binary value


def _dyadic_expr(v: sp.Expr, bits: int, value: float | None = None) -> DyadicConstant:
    fv = float(sp.N(v, 50))
    if not fv > 0 or not math.isfinite(fv):
        raise ValueError(f"a dyadic constant must be positive and finite, got {v}")
    e = math.floor(math.log2(fv))                      # 2^e <= v < 2^(e+1)
    k = bits - 1 - e
    m = int(sp.floor(v * sp.Integer(2) ** k + sp.Rational(1, 2)))
    if m >= 1 << bits:
        m //= 2
        k -= 1
    return DyadicConstant(m=m, k=k, value=fv if value is None else value)


def dyadic_error(c: DyadicConstant, exact: sp.Expr) -> float:
    """Relative error ``|m·2^-k - exact| / exact``, evaluated exactly."""
    return float(sp.N(sp.Abs(c.rational - exact) / exact, 30))


def _extremum(expr: sp.Expr, x: sp.Symbol, guesses: tuple[float, ...]) -> float:
    """``max |expr|`` on ``[0, 1]``: at the ends or where the derivative vanishes (sympy's nsolve from guesses)."""
    cands = [0.0, 1.0]
    d = sp.diff(expr, x)
    for g in guesses:
        try:
            r = float(sp.nsolve(d, x, g))
        except (ValueError, ZeroDivisionError):
            continue
        if 0.0 <= r <= 1.0:
            cands.append(r)
    return max(abs(float(expr.subs(x, c))) for c in cands)


@dataclass(frozen=True)
class Constants:
    log2e: DyadicConstant
    exp2_c1: DyadicConstant
    exp2_c2: DyadicConstant
    gelu_alpha: DyadicConstant
    log2e_rel: float
    exp2_order1_rel: float
    exp2_order2_rel: float
    gelu_abs: float

    @staticmethod
    def dyadic(value: float) -> DyadicConstant:
        return dyadic(value)

    def exp_rel_bound(self, order: int, frac_bits: int = 15) -> float:
        """Relative error bound of DI-Exp against ``exp`` for an exactly represented input: the polynomial's error,
        the ``log2 e`` rounding over the clip range (``|x| <= frac_bits + 2`` in ``log2`` units), and the
        truncations of the fixed-point steps (a few units of ``2^-frac_bits`` relative to the result's leading
        bit, doubled per right shift of the integer part)."""
        poly = self.exp2_order1_rel if order == 1 else self.exp2_order2_rel
        return poly + self.log2e_rel * (frac_bits + 2) + 4.0 * 2.0 ** -frac_bits

    def tanh_abs_bound(self, order: int) -> float:
        """Absolute error bound of the integer ``tanh = 2σ(2|v|) - 1`` (before its output requantization):
        ``σ = 1/(1+e)`` with ``e`` off by a relative ``δ`` moves by ``δ·e/(1+e)² ≤ δ/4``, the division rounds by
        half a unit of ``2^-15``; doubled, and one unit of ``2^-15`` to spare."""
        return self.exp_rel_bound(order) / 2 + 2.0 ** -14


@functools.lru_cache(maxsize=1)
def constants() -> Constants:
    """Derive every constant and bound once (sympy, ~0.1 s)."""
    x = sp.Symbol("x", real=True)
    log2e = 1 / sp.log(2)
    c_log2e = dyadic(log2e)
    # 2^-x ≈ 1 + b x + c x², through (0, 1), (1/2, 2^-1/2), (1, 1/2)
    b, c = sp.symbols("b c")
    sol = sp.solve([b + c + sp.Rational(1, 2), b / 2 + c / 4 + 1 - 1 / sp.sqrt(2)], [b, c], dict=True)[0]
    c1, c2 = -sol[b], sol[c]
    order1 = (1 - x / 2) * 2 ** x - 1
    order2 = (1 - c1 * x + c2 * x ** 2) * 2 ** x - 1
    z = sp.Symbol("z", real=True)
    gelu_err = z * (1 / (1 + sp.exp(-sp.Rational(1702, 1000) * z)) - (1 + sp.erf(z / sp.sqrt(2))) / 2)
    gd = sp.diff(gelu_err, z)
    gelu_cands = []
    for g in (-3.0, -2.0, -1.5, -1.0, -0.5, 0.5, 1.0, 1.5, 2.0, 3.0):
        try:
            gelu_cands.append(float(sp.nsolve(gd, z, g)))
        except (ValueError, ZeroDivisionError):
            pass
    gelu_abs = max(abs(float(gelu_err.subs(z, r))) for r in gelu_cands)
    return Constants(
        log2e=c_log2e, exp2_c1=dyadic(c1), exp2_c2=dyadic(c2), gelu_alpha=dyadic(sp.Rational(1702, 1000)),
        log2e_rel=dyadic_error(c_log2e, log2e),
        exp2_order1_rel=_extremum(order1, x, (0.3, 0.5, 0.7)),
        exp2_order2_rel=_extremum(order2, x, (0.2, 0.3, 0.7, 0.8)),
        gelu_abs=gelu_abs)
