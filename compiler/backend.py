"""The ``fxquant`` torch.compile backend: fxquant's lowering on the functional ATen graph, then Inductor.

Use it like any backend::

    import fxquant  # registers it; a plain `pip install` also exposes it through the torch_dynamo_backends entry point
    model.forward = torch.compile(model.forward, backend="fxquant", options={"recipe": "rtn-w4g128"})
    model.generate(...)

How it works. Dynamo hands over an FX graph whose inputs are the model's real parameters and the user's
tensors. The backend calls Inductor's ``compile_fx`` with its own ``inner_compile``: AOTAutograd first turns the
graph into a functional ATen graph (Inductor's decompositions turn every linear into ``mm``/``addmm`` on a
transposed weight), then :func:`_lower_then_inductor` runs the ``lower_quantized_linears`` rewrite on that graph
and hands the result to Inductor's ``compile_fx_inner``, which fuses and compiles everything that is not ours.
The ATen graph's inputs are fake tensors in the order of Dynamo's inputs, so each weight placeholder is matched
back to its real parameter by position (and checked by shape and dtype).

Where the codes come from, per weight:

1. a quantization remembered for that very tensor (:func:`fxquant.backends.registry.remember_quantized`, done
   when a model is quantized offline): the model's weights already hold the dequantized values;
2. else, with ``options={"recipe": "rtn-..."}``, data-free round-to-nearest quantization done here, once per
   weight (cached on the tensor), skipping the recipe's ``exclude`` patterns (``lm_head*`` by default).

Options (``torch.compile(..., options={...})``):

* ``recipe`` — a data-free recipe name or object (``rtn-w4g128``, ``rtn-w8``, ...); None = only remembered;
* ``kernels`` — ``"auto"`` (default): on CUDA lower to the packed ops (Triton); on the CPU keep each linear on
  its exactly dequantized float weight, because no exact CPU kernel beats a float matmul there (see
  :mod:`fxquant.backends.ops`); ``"always"``: lower on every device (the CPU then runs the reference ops);
  ``"never"``: only apply the recipe's quantization, as float weights;
* ``verbose`` — log the lowering report at INFO level (it always goes to DEBUG).

The backend disables the AOTAutograd and FX-graph caches while it compiles: their keys do not cover the
lowering, so a cached artifact from another recipe could otherwise be returned.
"""
from __future__ import annotations

import fnmatch
import logging
import re
import sys
from typing import Any, Callable, Sequence

import torch
from torch import fx
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["fxquant_backend", "BackendOptions", "last_reports", "register", "stats"]

log = logging.getLogger("fxquant")

_KERNEL_POLICIES = ("auto", "always", "never")

#: the lowering report of each graph this process compiled with the backend (newest last; tests read it)
last_reports: list[Any] = []
#: graphs compiled by the backend in this process (Dynamo frames and recompilations; tests count recompiles)
stats: dict[str, int] = {"graphs": 0}


class BackendOptions:
    """Validated ``options`` of the backend (unknown keys are an error naming the known ones)."""

    KNOWN = ("recipe", "kernels", "verbose")

    def __init__(self, options: dict[str, Any] | None):
        from .errors import RecipeError

        options = dict(options or {})
        unknown = sorted(set(options) - set(self.KNOWN))
        if unknown:
            raise RecipeError(f"unknown fxquant backend option(s): {', '.join(unknown)}",
                              f"known options: {', '.join(self.KNOWN)}")
        self.kernels: str = options.get("kernels", "auto")
        if self.kernels not in _KERNEL_POLICIES:
            raise RecipeError(f"options['kernels'] must be one of {', '.join(_KERNEL_POLICIES)}, got {self.kernels!r}")
        self.verbose = bool(options.get("verbose", False))
        self.recipe = None
        recipe = options.get("recipe")
        if recipe is not None:
            from .recipes import get_recipe

            self.recipe = get_recipe(recipe)
            if not self.recipe.data_free:
                raise RecipeError(f"recipe {self.recipe.name!r} needs calibration data and cannot run inside "
                                  "torch.compile", "quantize offline with fxquant.quantize(model, recipe, data), "
                                  "then compile the quantized model without a recipe")

    @property
    def spec(self) -> Any:
        return None if self.recipe is None else self.recipe.weight

    def excluded(self, fqn: str) -> bool:
        return self.recipe is not None and any(fnmatch.fnmatch(fqn, pat) for pat in self.recipe.exclude)


_SOURCE_PART = re.compile(r"_(?:modules|parameters|buffers)\['([^']+)'\]")


def _fqn_of_placeholder(node: fx.Node) -> str:
    """``L['self']._modules['model']._parameters['weight']`` -> ``model.weight`` (else the placeholder name)."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = source.name if source is not None and isinstance(getattr(source, "name", None), str) else None
    if name is None and source is not None and callable(getattr(source, "name", None)):
        name = source.name()
    if name:
        parts = _SOURCE_PART.findall(name)
        if parts:
            return ".".join(parts)
    return node.name


_T_VIEWS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # keyed by tensor identity


def _transposed_view(t: torch.Tensor) -> torch.Tensor:
    """``t.t()``, the same view object every time (the pack cache and the graph's constants are keyed on the
    tensor object). Used both ways for Conv1D's ``[in, out]`` weights: the stored weight to its ``[out, in]``
    transpose (quantized and packed like any linear's), and a dequantized ``[out, in]`` weight back to the
    layout the ``addmm``/``mm`` reads."""
    if t not in _T_VIEWS:
        _T_VIEWS[t] = t.t()
    return _T_VIEWS[t]


def _is_weight(entry: tuple[torch.Tensor, str] | None) -> bool:
    """A parameter, or a tensor fxquant remembers quantizing (in either layout)."""
    from fxquant.backends import registry

    if entry is None:
        return False
    real = entry[0]
    return (isinstance(real, torch.nn.Parameter) or registry.recorded_quantization(real) is not None
            or registry.recorded_quantization(real, in_out=True) is not None)


def _lower_aten_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], real_inputs: Sequence[Any],
                      fqns: list[str], opts: BackendOptions) -> Any:
    """Run the lowering rules on an AOT (ATen) graph; returns the :class:`LoweringReport`."""
    from fxquant.backends import registry
    from fxquant.passes.lower_quantized_linears import (Lowering, LoweringReport, find_linear_sites,
                                                         lower_linear_sites, only_linear_users)
    from fxquant.quant import quantize_weight

    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    offset = len(placeholders) - len(real_inputs)  # effect tokens, if any, come first
    real_of: dict[fx.Node, tuple[torch.Tensor, str]] = {}
    if offset >= 0:
        for i, ph in enumerate(placeholders[offset:]):
            real, fake = real_inputs[i], ph.meta.get("val", example_inputs[offset + i] if offset + i < len(
                example_inputs) else None)
            if (isinstance(real, torch.Tensor) and isinstance(fake, torch.Tensor) and real.dim() == 2
                    and tuple(real.shape) == tuple(fake.shape) and real.dtype == fake.dtype):
                real_of[ph] = (real, fqns[i])
    sites, rejected = find_linear_sites(gm.graph)
    # an [in, out] product ``mm(x, W)`` is a linear only when W is a parameter (or a weight fxquant quantized):
    # ``mm`` of two activations is not one, and quantizing a user's input would be silently wrong
    sites = [s for s in sites if not s.in_out or s.weight.op == "get_attr" or _is_weight(real_of.get(s.weight))]
    by_weight: dict[fx.Node, list] = {}
    for s in sites:
        by_weight.setdefault(s.weight, []).append(s)
    for node, why in rejected:
        log.warning("fxquant backend: kept %s as a float op: %s", node.name, why)

    def resolve(site: Any) -> Any:
        w_node = site.weight
        if w_node.op == "get_attr":
            real, fqn = getattr(gm, str(w_node.target), None), str(w_node.target)
        elif w_node in real_of:
            real, fqn = real_of[w_node]
            if not _is_weight(real_of[w_node]):
                return Lowering("keep", reason="its weight is an input of the compiled function, not a parameter",
                                name=fqn)
        else:
            return Lowering("keep", reason="its weight is computed in the graph or could not be matched to a "
                                           "parameter", name=w_node.name)
        if not isinstance(real, torch.Tensor) or real.dim() != 2:
            return Lowering("keep", reason="the weight is not a 2-D tensor", name=fqn)
        qw = registry.recorded_quantization(real, in_out=site.in_out)
        spec = qw.spec if qw is not None else opts.spec
        if site.in_out:          # Conv1D's [in, out] weight: quantized, packed and dequantized as its transpose
            real = _transposed_view(real)
        if qw is None:
            if spec is None:
                return Lowering("keep", reason="not quantized (no remembered quantization, no recipe)", name=fqn)
            if opts.excluded(fqn):
                return Lowering("keep", reason=f"excluded by recipe {opts.recipe.name} ({', '.join(opts.recipe.exclude)})",
                                name=fqn)
        if not only_linear_users(w_node, by_weight[w_node]):
            return Lowering("keep", reason="the weight is also read by a non-linear op (a tied embedding?); "
                                           "it stays float", name=fqn)
        fmt, why = registry.select_format(spec)
        on_cuda = real.device.type == "cuda"
        lower_op = opts.kernels == "always" or (opts.kernels == "auto" and on_cuda)
        if fmt is None and lower_op:
            return Lowering("keep", reason=why, name=fqn)
        if fmt is not None and lower_op:
            # a GPU too old for the Triton kernel (or a dtype it does not take): "auto" falls back to the float
            # linear on the dequantized weight, "always" was an explicit request and fails at compile time
            problem = registry.kernel_device_problem(fmt, real.device, real.dtype)
            if problem is not None:
                if opts.kernels == "always":
                    registry.check_kernel_device(fmt, real.device, real.dtype)
                log.warning("fxquant backend: %s: %s; using the float linear on the dequantized weight", fqn, problem)
                lower_op = False

        def quantized() -> Any:
            if qw is not None:
                return qw
            if getattr(spec, "kind", "int") == "fp":  # data-free FP6/FP5/FP4 recipes
                from .fpformats import quantize_fp
                return quantize_fp(real, spec)
            return quantize_weight(real, spec, name=fqn)

        if lower_op:
            packed = registry.packed_for(real, spec, lambda: registry.pack(quantized(), fmt), kind=fmt.name)
            return Lowering("op", packed=packed, name=fqn)
        if qw is not None:
            return Lowering("keep", reason=f"policy kernels={opts.kernels} on {real.device.type}: the weight already "
                                           "holds its dequantized values", name=fqn)
        # data-free recipe without kernels: the float linear on exactly dequantized weights (cached like a pack)
        deq = registry.packed_for(real, spec, lambda: registry.PackedWeight(
            "float", {"weight": quantized().dequantize(real.dtype)}, {}, spec), device=real.device, kind="float")
        weight = deq.tensors["weight"]
        return Lowering("float", weight=_transposed_view(weight) if site.in_out else weight, name=fqn)

    counter = [0]

    def add_constant(name: str, t: torch.Tensor) -> fx.Node:
        counter[0] += 1
        attr = f"_fxquant_{counter[0]}_{name}"[:120]
        gm.register_buffer(attr, t, persistent=False)
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")
        with gm.graph.inserting_before(first):
            node = gm.graph.get_attr(attr)
        from torch._guards import detect_fake_mode
        fake_mode = detect_fake_mode([p.meta.get("val") for p in placeholders if p.meta.get("val") is not None])
        node.meta["val"] = fake_mode.from_tensor(t, static_shapes=True) if fake_mode is not None else t
        return node

    if not sites:
        return LoweringReport()

    def resolve_real(site: Any) -> Any:
        # Inductor compiles under a FakeTensorMode; quantizing and packing work on the real weights
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        with unset_fake_temporarily(), torch.no_grad():
            return resolve(site)

    return lower_linear_sites(gm, sites, resolve_real, add_constant)


def fxquant_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None,
                    **kwargs: Any) -> Callable[..., Any]:
    """The torch.compile backend (``backend="fxquant"``). See the module docstring."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    if kwargs:
        options = {**(options or {}), **kwargs}
    opts = BackendOptions(options)
    stats["graphs"] += 1
    real_inputs = list(example_inputs)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    fqns = [_fqn_of_placeholder(p) for p in placeholders]
    if len(fqns) != len(real_inputs):
        fqns = [f"input{i}" for i in range(len(real_inputs))]

    def inner(aten_gm: fx.GraphModule, aten_inputs: Sequence[Any], **inner_kwargs: Any) -> Any:
        if not inner_kwargs.get("is_backward", False):
            report = _lower_aten_graph(aten_gm, aten_inputs, real_inputs, fqns, opts)
            last_reports.append(report)
            del last_reports[:-32]
            level = logging.INFO if opts.verbose else logging.DEBUG
            log.log(level, "fxquant backend: %s", report.stats())
            for name, why in report.kept.items():
                log.log(level, "fxquant backend: kept %s as a float linear: %s", name, why)
            if report.lowered or report.as_float:
                # the packed weights are real constants (get_attr): let Inductor's fake propagation accept them
                from torch._guards import detect_fake_mode
                fake_mode = detect_fake_mode(aten_inputs)
                if fake_mode is not None:
                    previous = fake_mode.allow_non_fake_inputs
                    fake_mode.allow_non_fake_inputs = True
                    try:
                        return compile_fx_inner(aten_gm, aten_inputs, **inner_kwargs)
                    finally:
                        fake_mode.allow_non_fake_inputs = previous
        return compile_fx_inner(aten_gm, aten_inputs, **inner_kwargs)

    with torch._functorch.config.patch(enable_autograd_cache=False), \
            torch._inductor.config.patch(fx_graph_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=inner)


class _LazyBackend:
    """Stands in ``torch._dynamo``'s backend table like an entry point: ``load()`` returns the backend.

    Registering through the table rather than ``register_backend`` keeps the two ways in (``import fxquant`` and
    the ``torch_dynamo_backends`` entry point) from registering the name twice, which Dynamo refuses.
    """

    name = "fxquant"
    value = "fxquant.backend:fxquant_backend"

    def load(self) -> Callable[..., Any]:
        return fxquant_backend


def register() -> None:
    """Make ``torch.compile(backend="fxquant")`` resolve to :func:`fxquant_backend` (idempotent).

    ``import fxquant`` calls this when Dynamo is already imported, or when fxquant is not installed with its
    entry point. Otherwise it skips it: importing Dynamo costs seconds, and the ``torch_dynamo_backends`` entry
    point, which Dynamo reads the first time it looks up a backend name it does not know, already finds us.
    """
    from torch._dynamo.backends import registry

    if "fxquant" not in registry._COMPILER_FNS:
        registry._BACKENDS["fxquant"] = _LazyBackend()


def _entry_point_installed() -> bool:
    """True if fxquant is pip-installed with its ``torch_dynamo_backends`` entry point (one cheap metadata read)."""
    from importlib import metadata
    try:
        return any(ep.group == "torch_dynamo_backends" and ep.name == "fxquant"
                   for ep in metadata.distribution("fxquant").entry_points)
    except metadata.PackageNotFoundError:
        return False


# Register now when Dynamo is already loaded (free), or when no entry point would find us (fxquant used from a
# source tree on sys.path): only then does `import fxquant` pay for importing Dynamo.
if "torch._dynamo" in sys.modules or not _entry_point_installed():
    register()
