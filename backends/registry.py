"""The one registry of packed weight formats: how a quantized weight is stored, computed with, and lowered.

A *format* is everything fxquant needs to run a quantized linear fast and check that it is right:

==================  ===============================================================================================
field               what it is
==================  ===============================================================================================
``name``            short id (``int8``, ``int4``); the custom op is ``fxquant::linear_<name>``
``supports(spec)``  ``None`` if the format can hold weights quantized with this :class:`QuantSpec`, else why not
``pack(qw)``        :class:`QuantizedWeight` -> (packed tensors by name, integer attributes); run once per weight
``dequantize``      packed tensors -> the float weight, bit for bit :meth:`QuantizedWeight.dequantize`
``reference``       the reference matmul in plain torch (exact dequantization, any device): the semantics
``triton``          optional ``"module:function"`` of the CUDA implementation (loaded lazily, so ``import
                    fxquant`` never imports Triton); same signature as ``reference``
``triton_dequant``  optional ``"module:function"``: the kernel's own dequantization, for the bit-exactness test
``aot_variants``    optional ``"module:function"`` listing kernel specialisations for the ahead-of-time test
``priority``        among formats that support a spec, the highest wins (narrower containers first)
==================  ===============================================================================================

The custom op of every format has the same shape of schema::

    fxquant::linear_<name>(Tensor x, <tensor args>, Tensor? bias, <int attrs>) -> Tensor

with ``x[..., in_features]`` in fp16/bf16/fp32 and the result ``[..., out_features]`` in ``x``'s dtype. The
op dispatches by device (:mod:`fxquant.backends.ops`): CUDA -> the Triton implementation when there is one,
every other device -> ``reference``.

**Adding a format** (ParetoQ 2-bit, FP6 4+2, ...) is one call, from the module that implements it::

    register_format(WeightFormat(
        name="fp6", description="FP6 E3M2, 4+2 bit planes, per-channel scale",
        tensor_args=("plane4", "plane2", "scale"), attr_args=("out_features", "in_features"),
        supports=lambda spec: None if spec.kind == "fp6" else "not an FP6 spec",
        pack=pack_fp6, dequantize=dequantize_fp6, reference=linear_fp6_reference,
        triton="fxquant.backends.triton_fp6:linear_fp6", priority=50))

and then the lowering pass, the torch.compile backend, the kernel tests (reference == dequantize ==
:meth:`QuantizedWeight.dequantize`; Triton == reference under the interpreter) and the AOT compile test pick it
up without further changes.

Besides formats, the registry keeps two weak tables keyed by weight tensor: quantization records
(:func:`remember_quantized`, so that a model quantized offline is found again by the compile backend, which sees
only tensors) and packed weights (:func:`packed_for`, so that recompilations never pack twice).
"""
from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from fxquant.quant import QuantizedWeight, QuantSpec

__all__ = ["WeightFormat", "PackedWeight", "register_format", "get_format", "formats", "select_format",
           "pack", "packed_for", "remember_quantized", "recorded_quantization", "load_callable", "check_kernel_device",
           "kernel_device_problem", "KERNEL_DTYPES", "TRITON_MIN_CAPABILITY", "BF16_MIN_CAPABILITY"]

log = logging.getLogger("fxquant")

Packer = Callable[[QuantizedWeight], "tuple[dict[str, torch.Tensor | None], dict[str, int]]"]


@dataclass(frozen=True)
class WeightFormat:
    """A packed weight format; see the module docstring for what each field means."""

    name: str
    description: str
    supports: Callable[[QuantSpec], str | None]
    pack: Packer
    dequantize: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    tensor_args: tuple[str, ...] = ("qweight", "scale", "zero?")
    attr_args: tuple[str, ...] = ("out_features", "in_features", "group_size")
    triton: str | Callable[..., torch.Tensor] | None = None
    triton_dequant: str | Callable[..., torch.Tensor] | None = None
    aot_variants: str | Callable[[], list] | None = None
    priority: int = 0

    @property
    def op_name(self) -> str:
        return f"linear_{self.name}"

    @property
    def qualname(self) -> str:
        return f"fxquant::{self.op_name}"

    @property
    def schema(self) -> str:
        tensors = ", ".join(f"Tensor? {a[:-1]}" if a.endswith("?") else f"Tensor {a}" for a in self.tensor_args)
        attrs = ", ".join(f"int {a}" for a in self.attr_args)
        return f"(Tensor x, {tensors}, Tensor? bias, {attrs}) -> Tensor"

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(a.rstrip("?") for a in self.tensor_args)

    @property
    def op(self) -> Any:
        """``torch.ops.fxquant.linear_<name>.default`` (defined when the format was registered)."""
        return getattr(torch.ops.fxquant, self.op_name).default

    def split_args(self, args: tuple) -> tuple[dict[str, torch.Tensor | None], torch.Tensor | None, dict[str, int]]:
        """The op's positional arguments after ``x`` -> (packed tensors, bias, attributes)."""
        nt = len(self.tensor_args)
        tensors = dict(zip(self.tensor_names, args[:nt]))
        bias = args[nt]
        attrs = dict(zip(self.attr_args, args[nt + 1:]))
        return tensors, bias, attrs


@dataclass
class PackedWeight:
    """A weight packed for one format: the op's tensor arguments and integer attributes, in schema order."""

    format: str
    tensors: dict[str, torch.Tensor | None]
    attrs: dict[str, int]
    spec: QuantSpec | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def fmt(self) -> WeightFormat:
        return get_format(self.format)

    def args(self, bias: Any = None) -> tuple:
        """Arguments of the custom op after ``x``: tensors, bias, attributes."""
        fmt = self.fmt
        return (*[self.tensors[n] for n in fmt.tensor_names], bias, *[self.attrs[a] for a in fmt.attr_args])

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Call the format's custom op (dispatches to Triton on CUDA, the reference elsewhere)."""
        return self.fmt.op(x, *self.args(bias))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.fmt.dequantize(*[self.tensors[n] for n in self.fmt.tensor_names], dtype=dtype, **self.attrs)

    def to(self, device: torch.device | str) -> PackedWeight:
        from fxquant.guards import check_device  # noqa: PLC0415
        check_device(device, f"packed {self.format} weight")
        moved = {k: (None if v is None else v.to(device)) for k, v in self.tensors.items()}
        return PackedWeight(self.format, moved, dict(self.attrs), self.spec, dict(self.meta))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values() if t is not None)


_FORMATS: dict[str, WeightFormat] = {}


def register_format(fmt: WeightFormat) -> WeightFormat:
    """Add ``fmt`` to the registry and define its custom op ``fxquant::linear_<name>``. Returns ``fmt``."""
    if fmt.name in _FORMATS:
        if _FORMATS[fmt.name] is fmt:
            return fmt
        raise ValueError(f"weight format {fmt.name!r} is already registered; pick another name")
    if not fmt.name.isidentifier():
        raise ValueError(f"format name {fmt.name!r} must be an identifier (it becomes fxquant::linear_<name>)")
    from . import ops  # noqa: PLC0415 - ops imports this module for the formats
    ops.define_linear_op(fmt)
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> WeightFormat:
    try:
        return _FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown weight format {name!r}; registered: {', '.join(_FORMATS) or 'none'}") from None


def formats() -> list[WeightFormat]:
    """All registered formats, highest priority first."""
    return sorted(_FORMATS.values(), key=lambda f: -f.priority)


def select_format(spec: QuantSpec) -> tuple[WeightFormat | None, str]:
    """The best format for ``spec``, or ``(None, reason)`` naming why each format refused it."""
    reasons = []
    for fmt in formats():
        why = fmt.supports(spec)
        if why is None:
            return fmt, ""
        reasons.append(f"{fmt.name}: {why}")
    return None, "; ".join(reasons) or "no weight format is registered"


def load_callable(ref: str | Callable | None) -> Callable | None:
    """Resolve a ``"module:function"`` reference (lazy imports keep Triton out of ``import fxquant``)."""
    if ref is None or callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def pack(qw: QuantizedWeight, fmt: WeightFormat | str | None = None) -> PackedWeight:
    """Pack ``qw`` for ``fmt`` (by default the best format for its spec)."""
    if fmt is None:
        fmt, why = select_format(qw.spec)
        if fmt is None:
            raise ValueError(f"no weight format holds {qw.spec.describe()}: {why}")
    elif isinstance(fmt, str):
        fmt = get_format(fmt)
    why = fmt.supports(qw.spec)
    if why is not None:
        raise ValueError(f"format {fmt.name} cannot hold {qw.spec.describe()}: {why}")
    tensors, attrs = fmt.pack(qw)
    return PackedWeight(fmt.name, tensors, attrs, qw.spec)


# ---- can this device run this format's kernel? -------------------------------------------------------------------
#: activation dtypes every format's op takes on CUDA (the schema's contract; the Triton kernels accumulate in fp32)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: oldest NVIDIA GPU the Triton compiler targets (torch.compile's own check refuses older ones), and the oldest with
#: bfloat16 instructions (``cvt.bf16`` needs sm_80)
TRITON_MIN_CAPABILITY = (7, 0)
BF16_MIN_CAPABILITY = (8, 0)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def kernel_device_problem(fmt: WeightFormat | str, device: torch.device | str, dtype: torch.dtype, *,
                          capability: tuple[int, int] | None = None) -> str | None:
    """None if ``fmt``'s op can run on ``device`` with ``dtype`` activations, else a sentence naming the format,
    the device and what is missing (see :func:`check_kernel_device`)."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    device = torch.device(device)
    if device.type != "cuda" or fmt.triton is None:
        return None  # the reference runs on any device, in any float dtype
    if dtype not in KERNEL_DTYPES:
        return (f"format {fmt.name} on {device}: its Triton kernel takes float16, bfloat16 or float32 activations, "
                f"got {str(dtype).removeprefix('torch.')}")
    if capability is None:
        capability = _capability(device.index if device.index is not None else torch.cuda.current_device())
    cap = tuple(capability)
    need = TRITON_MIN_CAPABILITY if dtype != torch.bfloat16 else BF16_MIN_CAPABILITY
    if cap < need:
        what = "Triton kernel" if dtype != torch.bfloat16 else "Triton kernel with bfloat16 activations"
        return (f"format {fmt.name} on {device}: its {what} needs an NVIDIA GPU of compute capability "
                f"{need[0]}.{need[1]} or newer, and {device} is {cap[0]}.{cap[1]}")
    return None


def check_kernel_device(fmt: WeightFormat | str, device: torch.device | str, dtype: torch.dtype, *,
                        capability: tuple[int, int] | None = None) -> None:
    """Raise :class:`~fxquant.errors.ResourceError` naming the format and the device if ``fmt``'s op cannot run on
    ``device`` with ``dtype`` activations: on CUDA, a dtype outside :data:`KERNEL_DTYPES`, a GPU older than
    :data:`TRITON_MIN_CAPABILITY`, or bfloat16 on a GPU older than :data:`BF16_MIN_CAPABILITY`. ``capability``
    overrides the device's own (``torch.cuda.get_device_capability``): that is how it is tested without the GPU."""
    problem = kernel_device_problem(fmt, device, dtype, capability=capability)
    if problem is not None:
        from fxquant.errors import ResourceError  # noqa: PLC0415
        hint = ("cast the model to float16 (model.half()), " if dtype == torch.bfloat16 else
                "cast the model and its inputs to float32 or float16, ")
        raise ResourceError(problem, hint + "or compile with options={'kernels': 'never'} to run the linears on "
                                            "their dequantized float weights")


# ---- weak tables keyed by weight tensor ---------------------------------------------------------------------------
_RECORDS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
_PACKED: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def remember_quantized(weight: torch.Tensor, qw: QuantizedWeight, *, in_out: bool = False) -> None:
    """Record that ``weight`` (a model parameter holding dequantized values) came from ``qw``.

    The torch.compile backend sees tensors, not module names; this is how it finds the codes of a model that
    was quantized before compilation. ``in_out``: the parameter is stored ``[in, out]`` (GPT-2's Conv1D) and ``qw``
    quantized its transpose. The record is dropped if the tensor is modified in place later.
    """
    _RECORDS[weight] = (weight._version, qw, in_out)


def recorded_quantization(weight: torch.Tensor, *, in_out: bool = False) -> QuantizedWeight | None:
    """The :class:`QuantizedWeight` remembered for ``weight``, if it has not changed since and was recorded for the
    same layout (``in_out``: read as ``[in, out]`` by ``addmm``/``mm``)."""
    entry = _RECORDS.get(weight)
    if entry is None:
        return None
    version, qw, layout = entry
    return qw if version == weight._version and layout == in_out else None


def packed_for(weight: torch.Tensor, spec: QuantSpec, make: Callable[[], PackedWeight],
               device: torch.device | None = None, kind: str = "") -> PackedWeight:
    """The packed form of ``weight`` under ``spec`` (in format ``kind``) on ``device``, made by ``make()`` once.

    Cached on the weight tensor (weakly, and invalidated by an in-place change), so a recompilation, another
    dynamic-shape specialisation, or a second ``torch.compile`` of the same model packs nothing again.
    """
    device = torch.device(device) if device is not None else weight.device
    key = (kind, spec.describe(), str(device))
    entry = _PACKED.get(weight)
    if entry is None or entry[0] != weight._version:
        entry = (weight._version, {})
        _PACKED[weight] = entry
    cache: dict = entry[1]
    if key not in cache:
        packed = make()
        cache[key] = packed.to(device) if any(
            t is not None and t.device != device for t in packed.tensors.values()) else packed
    return cache[key]


# ---- the built-in integer formats ----------------------------------------------------------------------------------
def _int_supports(max_bits: int) -> Callable[[QuantSpec], str | None]:
    def supports(spec: QuantSpec) -> str | None:
        if getattr(spec, "kind", "int") != "int":
            return f"holds integer codes, not {spec.kind}"
        if spec.bits > max_bits:
            return f"holds at most {max_bits}-bit codes, the spec has {spec.bits}"
        return None
    return supports


def _register_builtins() -> None:
    from . import reference as ref  # noqa: PLC0415

    register_format(WeightFormat(
        name="int4", description="4-bit (or narrower) integer codes, two per byte; fp32 scales per channel or "
                                 "group; int32 zero points when asymmetric",
        supports=_int_supports(4), pack=ref.pack_int4, dequantize=ref.dequantize_int4, reference=ref.linear_int4,
        triton="fxquant.backends.ops:triton_linear_int4", triton_dequant="fxquant.backends.ops:triton_dequant_int4",
        aot_variants="fxquant.backends.ops:aot_variants_int4", priority=20))
    register_format(WeightFormat(
        name="int8", description="5- to 8-bit integer codes, one per byte; fp32 scales per channel or group; "
                                 "int32 zero points when asymmetric",
        supports=_int_supports(8), pack=ref.pack_int8, dequantize=ref.dequantize_int8, reference=ref.linear_int8,
        triton="fxquant.backends.ops:triton_linear_int8", triton_dequant="fxquant.backends.ops:triton_dequant_int8",
        aot_variants="fxquant.backends.ops:aot_variants_int8", priority=10))
    from . import lowbit  # noqa: F401, PLC0415 - registers the ParetoQ formats pq_w1 .. pq_w4
    from . import fp6  # noqa: F401, PLC0415 - registers the FP6 4+2 format


_register_builtins()
