"""The ``fxquant::`` custom ops: one per registered weight format, defined with ``torch.library.custom_op``.

Each op ``fxquant::linear_<format>(x, <packed tensors>, bias, <int attrs>)`` has

* a **default kernel** = the format's reference implementation (plain torch, exact numerics), used on the CPU
  and on any device without a faster kernel;
* a **CUDA kernel** = the format's Triton implementation when Triton is importable, else the reference;
* a **fake** (meta) implementation for tracing: ``x[..., K] -> [..., out_features]`` in ``x``'s dtype, so
  Dynamo, AOTAutograd and Inductor treat the op as an opaque call with a known output.

Why ``custom_op`` + ``register_fake`` rather than ``torch.library.triton_op``: a ``triton_op`` is traced into
the graph by Inductor, which breaks under ``TRITON_INTERPRET=1`` inside ``torch.compile`` (the CPU test setup);
an opaque op whose CUDA kernel launches Triton works in every setting.

**On the CPU** the reference is the only exact choice we found: ``aten._weight_int8pack_mm`` is exact for
per-channel int8 (scale after accumulation; identical results on one-hot inputs) but measured ~50x slower than
an fp32 ``F.linear`` on the AVX2 CI machine (7.4 ms vs 0.16 ms for 1x576 @ 576x1536).
``aten._weight_int4pack_mm_for_cpu`` (a ``(q - 8) * scale + zero`` form with float zero points) has not been
checked against our numerics yet, so it is not used. The torch.compile backend therefore keeps CPU linears on their exactly
dequantized float weights unless asked otherwise (see :mod:`fxquant.backend`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from .registry import WeightFormat, check_kernel_device, get_format, load_callable

__all__ = ["define_linear_op", "triton_available", "triton_linear_int4", "triton_linear_int8",
           "triton_dequant_int4", "triton_dequant_int8", "aot_variants_int4", "aot_variants_int8", "op_for"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True if Triton can be imported (the CUDA kernels need it; the reference does not)."""
    try:
        import triton  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001 - any import failure means "no Triton"
        return False
    return True


def define_linear_op(fmt: WeightFormat) -> Any:
    """Define ``fxquant::linear_<fmt.name>`` with its default, CUDA and fake implementations."""
    def reference(x: torch.Tensor, *args: Any) -> torch.Tensor:
        tensors, bias, attrs = fmt.split_args(args)
        return fmt.reference(x, *tensors.values(), bias, **attrs)

    def cuda(x: torch.Tensor, *args: Any) -> torch.Tensor:
        check_kernel_device(fmt, x.device, x.dtype)  # a clear error instead of a Triton compile failure
        impl = load_callable(fmt.triton) if fmt.triton is not None and triton_available() else None
        if impl is None:
            return reference(x, *args)
        tensors, bias, attrs = fmt.split_args(args)
        return impl(x, *tensors.values(), bias, **attrs)

    def fake(x: torch.Tensor, *args: Any) -> torch.Tensor:
        _, _, attrs = fmt.split_args(args)
        out_features = attrs.get("out_features")
        if out_features is None:  # a format without the attribute: the first tensor's rows are the outputs
            out_features = args[0].shape[0]
        return x.new_empty((*x.shape[:-1], out_features))

    reference.__name__ = cuda.__name__ = fake.__name__ = fmt.op_name
    op = torch.library.custom_op(fmt.qualname, reference, mutates_args=(), schema=fmt.schema)
    op.register_kernel("cuda", cuda)
    op.register_fake(fake)
    return op


# ---- Triton entry points named by the built-in formats (imported lazily: Triton loads only when they run) ---------
def _triton_int(bits: int) -> Callable[..., torch.Tensor]:
    def linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               bias: torch.Tensor | None, *, out_features: int, in_features: int, group_size: int) -> torch.Tensor:
        from . import triton_int  # noqa: PLC0415
        return triton_int.wq_linear(x, qweight, scale, zero, bias, bits=bits, out_features=out_features,
                                    in_features=in_features, group_size=group_size)
    linear.__name__ = f"triton_linear_int{bits}"
    return linear


def _triton_dequant(bits: int) -> Callable[..., torch.Tensor]:
    def dequant(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, out_features: int,
                in_features: int, group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from . import triton_int  # noqa: PLC0415
        return triton_int.dequantize(qweight, scale, zero, bits=bits, out_features=out_features,
                                     in_features=in_features, group_size=group_size, dtype=dtype)
    dequant.__name__ = f"triton_dequant_int{bits}"
    return dequant


triton_linear_int4 = _triton_int(4)
triton_linear_int8 = _triton_int(8)
triton_dequant_int4 = _triton_dequant(4)
triton_dequant_int8 = _triton_dequant(8)


def aot_variants_int4() -> list:
    from . import triton_int  # noqa: PLC0415
    return triton_int.aot_variants(4)


def aot_variants_int8() -> list:
    from . import triton_int  # noqa: PLC0415
    return triton_int.aot_variants(8)


def op_for(name: str) -> Any:
    """The custom op overload of format ``name``."""
    return get_format(name).op
