"""``fxquant debug``: run a recipe pass by pass on a few calibration samples and report what each pass did.

For every pass of the recipe's pipeline the report gives

* **what changed in the graph**: nodes added / removed / replaced (the pipeline's own :class:`PassRecord`)
  and a unified diff of the printed graph before and after (``NNN_<pass>.diff`` beside the numbered dumps
  ``000_capture.py``, ``001_<pass>.py``, ... that ``FXQUANT_DEBUG`` writes too);
* **time and memory**: wall time, the change of the process's resident memory (where torch allocates its
  tensors) and the peak of Python-level allocations (``tracemalloc``);
* **the numerical error the pass introduced**: SQNR and max abs error of the model's output (the logits of a
  causal LM) against the float model, after the pass; and the error of every linear layer's output.

Per-layer error comes in two flavours, both against the float model run on the same samples:

* ``sqnr_db`` (*local*): the layer's quantized weights applied to the **float** model's input of that layer.
  It isolates the error this layer's own quantization causes, so it is what layers are **ranked** by
  ("the layers that hurt most");
* ``propagated_sqnr_db``: the layer's output inside the quantized model, which also carries the error of
  every layer before it. It falls with depth for every layer, so it would rank depth, not harm; it is shown
  beside the local value for context.

Output (``out_dir``): the numbered graph dumps and diffs, ``report.json`` and a self-contained
``report.html`` (inline CSS and SVG, one small inline script for sortable tables; no network access). The
HTML draws the structure the analysis found (norm -> linear groups, linear -> linear pairs, attention) from
the networkx view, per-layer error bars, a layer x projection heat map and the per-pass error line.

Python::

    from fxquant.debug import debug_recipe
    report = debug_recipe("smollm2", "rtn-w4g128", samples=2, out_dir="debug/")
    report.worst_layers[0]           # the linear whose own quantization hurts most

CLI::

    fxquant debug --model smollm2 --recipe rtn-w4g128 --out debug/ --samples 2

The model is never modified: passes rewrite the captured graph and its tensors, nothing is written back.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import os
import resource
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import fx

from .capture import CapturedGraph, capture
from .errors import DataError
from .pipeline import Pass, PassContext, Pipeline, graph_text
from .recipes import Recipe, get_recipe

log = logging.getLogger("fxquant")

__all__ = ["debug_recipe", "DebugReport", "PassReport", "LayerError", "sqnr_db", "max_abs_error",
           "linear_sites", "layer_errors", "add_debug_parser", "cmd_debug"]

#: SQNR above this is reported as exact (float32 has ~24 bits: ~144 dB is the noise floor of rounding)
EXACT_DB = 200.0


# ---- metrics -------------------------------------------------------------------------------------------------
def compare(reference: torch.Tensor, actual: torch.Tensor) -> tuple[float, float]:
    """(SQNR in dB, max abs error) of ``actual`` against ``reference``, from one float64 difference."""
    ref = reference.detach().double()
    diff = ref - actual.detach().double()
    if diff.numel() == 0:
        return math.inf, 0.0
    noise = float(diff.pow(2).sum())
    signal = float(ref.pow(2).sum())
    worst = float(diff.abs().max())
    if math.isnan(noise):
        return math.nan, math.nan
    if noise == 0.0:
        return math.inf, worst
    if signal == 0.0:
        return -math.inf, worst
    return 10.0 * math.log10(signal / noise), worst


def sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref² / sum (ref - actual)²)`` in dB, in float64.

    ``inf`` when the two are identical (no noise), ``-inf`` when the reference is all zeros but ``actual`` is
    not, ``nan`` when either holds a NaN. Computed in float64 so that a float32 model's tiny rounding
    differences do not underflow.
    """
    return compare(reference, actual)[0]


def max_abs_error(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """``max |reference - actual|`` (0.0 for empty tensors); ``nan`` if either holds a NaN."""
    return compare(reference, actual)[1]


def _json_db(value: float) -> float | None:
    """JSON has no infinity: an exact match is written as null (and ``exact: true`` beside it)."""
    return None if math.isinf(value) or math.isnan(value) else round(value, 4)


# ---- per-layer probes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearSite:
    """A linear-like node: where its activation input is and which weight (by FQN) it multiplies."""

    node: str
    key: str        # the weight's FQN (stable across passes that rename or replace the node)
    x_index: int    # position of the activation among the node's args


def linear_sites(cg: CapturedGraph) -> dict[str, LinearSite]:
    """Every linear of ``cg`` by node name: ``aten.linear``/``addmm``/``mm`` by a parameter, and the lowered
    ``fxquant::linear_<format>`` custom ops (found by their ``quant`` annotation)."""
    from .graphview import as_linear

    def is_param(n: fx.Node) -> bool:
        return n.op == "placeholder" and n.name in cg.tensors

    sites: dict[str, LinearSite] = {}
    for node in cg.gm.graph.nodes:
        if node.op != "call_function":
            continue
        lin = as_linear(node, is_param)
        if lin is not None:
            key = cg.fqn.get(lin.weight.name, lin.weight.name)
            index = next(i for i, a in enumerate(node.args) if a is lin.input)
            sites[node.name] = LinearSite(node.name, key, index)
            continue
        note = node.meta.get("fxquant", {}).get("quant")
        namespace = getattr(node.target, "namespace", "")
        if note and namespace == "fxquant" and node.args and isinstance(node.args[0], fx.Node):
            sites[node.name] = LinearSite(node.name, note["weight"], 0)
    return sites


def _ordered_args(cg: CapturedGraph, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    feed = dict(zip(cg.user_inputs, inputs))
    return [feed[n.name] if n.name in feed else cg.tensors[n.name]
            for n in cg.gm.graph.nodes if n.op == "placeholder"]


class _Probe(fx.Interpreter):
    """Runs the graph and, at every linear, records its input and output (float run) or compares them with
    the float run's (quantized run): the local error uses the float run's input of the same layer."""

    def __init__(self, gm: fx.GraphModule, sites: Mapping[str, LinearSite],
                 reference: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None):
        super().__init__(gm)
        self.sites = sites
        self.reference = reference
        self.recorded: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        #: weight FQN -> the op the float graph ran for it (a lowered layer runs another op on other tensors)
        self.float_targets: dict[str, Any] = dict(getattr(reference, "targets", {}) or {})
        self.errors: dict[str, dict[str, float]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        site = self.sites.get(n.name)
        if site is None or not isinstance(out, torch.Tensor):
            return out
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        # the layer's own operands (weight, bias, packed tensors), by identity: unchanged ones need no rerun
        operands = tuple(a for i, a in enumerate(args) if i != site.x_index and isinstance(a, torch.Tensor))
        if self.reference is None:
            self.recorded[site.key] = (args[site.x_index].detach(), out.detach(), operands)
            return out
        ref = self.reference.get(site.key)
        if ref is None:
            return out
        x_float, y_float, float_operands = ref
        propagated, _ = compare(y_float, out)
        same = len(operands) == len(float_operands) and all(a is b for a, b in zip(operands, float_operands))
        if same and n.target is self.float_targets.get(site.key):
            local, local_max = math.inf, 0.0  # same op on the same tensors: exactly the float layer
        else:
            local_args = list(args)
            local_args[site.x_index] = x_float
            local, local_max = compare(y_float, n.target(*local_args, **kwargs))
        self.errors[site.key] = {"sqnr_db": local, "propagated_sqnr_db": propagated, "max_abs_error": local_max}
        return out


@dataclass
class LayerError:
    """The error of one linear layer's output against the float model (see the module docstring)."""

    name: str                   # weight FQN without ``.weight``
    key: str                    # weight FQN
    node: str
    layer: int | None
    kind: str                   # last part of the name: q_proj, down_proj, lm_head, ...
    sqnr_db: float              # local: this layer's weights on the float input
    propagated_sqnr_db: float   # inside the quantized model
    max_abs_error: float        # local
    order: int = 0              # position among the graph's linears (graph order)
    rank: int = 0               # 1 = hurts most

    @property
    def exact(self) -> bool:
        return math.isinf(self.sqnr_db) and self.sqnr_db > 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "node": self.node, "layer": self.layer, "kind": self.kind,
                "sqnr_db": _json_db(self.sqnr_db), "propagated_sqnr_db": _json_db(self.propagated_sqnr_db),
                "max_abs_error": self.max_abs_error, "exact": self.exact, "order": self.order, "rank": self.rank}


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "layer", "h", "blocks", "block") and b.isdigit():
            return int(b)
    return None


def _display(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def record_float(cg: CapturedGraph, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Run the float graph once: its output and every linear's (input, output), keyed by weight FQN."""
    sites = linear_sites(cg)
    probe = _Probe(cg.gm, sites, None)
    with torch.no_grad():
        out = probe.run(*_ordered_args(cg, inputs))
    nodes = {n.name: n for n in cg.gm.graph.nodes}
    recorded = FloatRecord(probe.recorded)
    recorded.targets = {s.key: nodes[s.node].target for s in sites.values()}
    return _single(out), recorded


class FloatRecord(dict):
    """Weight FQN -> (input, output, operands) of each linear in the float run, plus the op it ran."""

    targets: dict[str, Any]


def layer_errors(cg: CapturedGraph, inputs: Sequence[torch.Tensor], reference: Mapping[str, Any]
                 ) -> tuple[torch.Tensor, list[LayerError]]:
    """Run ``cg`` and compare every linear with the float run's ``reference`` (from :func:`record_float`).

    Returns the graph's output and the layers ranked by local SQNR, worst first (exact layers last).
    """
    sites = linear_sites(cg)
    probe = _Probe(cg.gm, sites, reference)
    with torch.no_grad():
        out = probe.run(*_ordered_args(cg, inputs))
    by_key = {s.key: s for s in sites.values()}
    position = {key: i for i, key in enumerate(by_key)}
    layers = []
    for key, err in probe.errors.items():
        name = _display(key)
        layers.append(LayerError(name=name, key=key, node=by_key[key].node, layer=_layer_index(name),
                                 kind=name.rsplit(".", 1)[-1], sqnr_db=err["sqnr_db"],
                                 propagated_sqnr_db=err["propagated_sqnr_db"], max_abs_error=err["max_abs_error"],
                                 order=position[key]))
    ranked = sorted(layers, key=lambda e: (e.sqnr_db, -e.max_abs_error))
    for i, e in enumerate(ranked, start=1):
        e.rank = i
    return _single(out), ranked


def _single(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out


# ---- memory --------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    """Resident set size now (torch's CPU tensors live outside Python's allocator, so tracemalloc misses them)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import psutil  # type: ignore[import-untyped]
            return int(psutil.Process().memory_info().rss)
        except Exception:  # noqa: BLE001 - no way to read RSS here; report it as unknown
            return -1


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if os.uname().sysname == "Darwin" else 1024)


# ---- the run -------------------------------------------------------------------------------------------------
@dataclass
class PassReport:
    """What one pass did (see the module docstring)."""

    index: int
    name: str
    description: str
    seconds: float
    modified: bool
    added: int
    removed: int
    replaced: int
    nodes: int
    stats: dict[str, Any]
    rss_delta_bytes: int
    peak_rss_growth_bytes: int
    python_peak_bytes: int
    logits_sqnr_db: float
    logits_max_abs_error: float
    diff_file: str
    diff_added_lines: int
    diff_removed_lines: int
    dump_file: str
    layers_changed: int
    worst_layer: str | None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["logits_sqnr_db"] = _json_db(self.logits_sqnr_db)
        d["logits_exact"] = math.isinf(self.logits_sqnr_db) and self.logits_sqnr_db > 0
        d["seconds"] = round(self.seconds, 4)
        return d


@dataclass
class DebugReport:
    """What :func:`debug_recipe` returns (and writes to ``report.json``)."""

    model: str
    model_class: str
    recipe: Recipe
    samples: int
    seq_len: int
    data_source: str
    passes: list[PassReport]
    layers: list[LayerError]           # after the last pass, ranked worst first
    capture_nodes: int
    out_dir: Path
    structure: Any = None
    structure_view: Any = None
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)

    @property
    def worst_layers(self) -> list[str]:
        """Layer names, worst first, of the layers the recipe changed (exact layers are not listed)."""
        return [e.name for e in self.layers if not e.exact]

    @property
    def final_sqnr_db(self) -> float:
        return self.passes[-1].logits_sqnr_db if self.passes else math.inf

    def to_dict(self) -> dict[str, Any]:
        structure = None
        if self.structure is not None and hasattr(self.structure, "counts"):
            structure = {"counts": self.structure.counts(), "text": self.structure.render()}
        return {
            "model": self.model, "model_class": self.model_class, "recipe": self.recipe.to_dict(),
            "samples": self.samples, "seq_len": self.seq_len, "data_source": self.data_source,
            "capture_nodes": self.capture_nodes, "seconds": round(self.seconds, 3),
            "final": {"logits_sqnr_db": _json_db(self.final_sqnr_db),
                      "logits_max_abs_error": self.passes[-1].logits_max_abs_error if self.passes else 0.0},
            "ranking_metric": "sqnr_db (local: the layer's quantized weights on the float model's input)",
            "worst_layer": self.worst_layers[0] if self.worst_layers else None,
            "worst_layers": self.worst_layers[:10],
            "passes": [p.to_dict() for p in self.passes],
            "layers": [e.to_dict() for e in self.layers],
            "structure": structure,
            "files": dict(self.files),
        }


def _calibration_ids(tokenizer: Any, samples: int, seq_len: int, data: str | os.PathLike | None
                     ) -> tuple[torch.Tensor, str]:
    from .data import calibration_text
    from .evaluate import tokenize_text
    text, source = calibration_text(data)
    # the first few windows are enough to see what a pass does; tokenizing all of WikiText-2 validation is not
    ids = tokenize_text(tokenizer, text[: max(20_000, samples * seq_len * 8)])
    if ids.numel() < samples * seq_len:
        raise DataError(f"the calibration text has {ids.numel()} tokens, fewer than {samples} x {seq_len}",
                        "use fewer --samples or a shorter --seq-len, or a longer calibration file (--data)")
    return ids[: samples * seq_len].view(samples, seq_len), source


def debug_recipe(model_or_name: str | torch.nn.Module, recipe: str | Recipe | dict = "rtn-w4g128", *,
                 samples: int = 2, seq_len: int = 128, out_dir: str | os.PathLike = "fxquant-debug",
                 inputs: torch.Tensor | Sequence[torch.Tensor] | None = None, tokenizer: Any = None,
                 data: str | os.PathLike | None = None, html_report: bool = True,
                 structure_layers: int = 2) -> DebugReport:
    """Run ``recipe`` pass by pass on a few calibration samples and write the debug report to ``out_dir``.

    ``model_or_name`` is a name or path :func:`fxquant.load_model` understands, or an ``nn.Module``.
    The samples are ``samples`` windows of ``seq_len`` tokens from WikiText-2 validation (tokenized with the
    model's tokenizer, or ``tokenizer``); pass ``inputs`` instead for a model without one (a non-HF module
    takes its own example inputs). Returns a :class:`DebugReport`; ``report.json`` holds the same data.
    """
    start = time.perf_counter()
    recipe = get_recipe(recipe)  # validate before loading anything
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise DataError(f"samples must be a positive integer, got {samples!r}", "e.g. samples=2")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}", "e.g. seq_len=128")
    if isinstance(model_or_name, torch.nn.Module):
        model, name = model_or_name, type(model_or_name).__name__
    else:
        from .models import load_model
        loaded = load_model(str(model_or_name))
        model, name = loaded.model, str(model_or_name)
        tokenizer = tokenizer if tokenizer is not None else loaded.tokenizer
    source = "inputs"
    if inputs is None:
        if tokenizer is None:
            raise DataError(f"no samples for {name}: it has no tokenizer and no inputs were given",
                            "pass inputs=(tensor, ...) (the model's example inputs) or tokenizer=...")
        ids, source = _calibration_ids(tokenizer, samples, seq_len, data)
        feed: tuple[torch.Tensor, ...] = (ids,)
    else:
        feed = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    feed = tuple(t.to(device) for t in feed)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cg = capture(model) if hasattr(model, "config") and hasattr(model.config, "model_type") \
        else capture(model, feed)
    ctx = PassContext(recipe=recipe, calibration=feed[0] if len(feed) == 1 else feed, verify=True)
    pipeline = recipe.pipeline()

    float_out, reference = record_float(cg, feed)
    capture_nodes = len(cg.gm.graph.nodes)
    text_before = graph_text(cg)
    (out / "000_capture.py").write_text(text_before)
    files = {"capture": "000_capture.py"}
    reports: list[PassReport] = []
    layers: list[LayerError] = []
    previous: dict[str, float] = {}
    now = float_out
    state = _NumericState(cg)
    for index, p in enumerate(pipeline.passes, start=1):
        rec, rss, peak, py_peak = _run_one(p, cg, ctx, index)
        text_after = graph_text(cg)
        stem = f"{index:03d}_{p.name}"
        (out / f"{stem}.py").write_text(text_after)
        diff = list(difflib.unified_diff(text_before.splitlines(), text_after.splitlines(),
                                         fromfile=f"{index - 1:03d}", tofile=stem, lineterm="", n=2))
        (out / f"{stem}.diff").write_text("\n".join(diff) + ("\n" if diff else ""))
        text_before = text_after
        # an analysis pass changes neither the code nor a tensor: its numbers are the previous ones
        new_state = _NumericState(cg)
        if new_state != state or not layers:
            if new_state == state:
                layers = exact_layers(cg, reference)
            else:
                now, layers = layer_errors(cg, feed, reference)
        state = new_state
        current = {e.key: e.sqnr_db for e in layers}
        changed = sum(1 for k, v in current.items() if previous.get(k, math.inf) != v)
        previous = current
        worst = next((e.name for e in layers if not e.exact), None)
        reports.append(PassReport(
            index=index, name=p.name, description=getattr(p, "description", ""), seconds=rec.seconds,
            modified=rec.modified, added=rec.added, removed=rec.removed, replaced=rec.replaced, nodes=rec.nodes,
            stats=_jsonable(rec.stats), rss_delta_bytes=rss, peak_rss_growth_bytes=peak, python_peak_bytes=py_peak,
            logits_sqnr_db=sqnr_db(float_out, now), logits_max_abs_error=max_abs_error(float_out, now),
            diff_file=f"{stem}.diff", diff_added_lines=sum(1 for d in diff if d.startswith("+") and not d.startswith("+++")),
            diff_removed_lines=sum(1 for d in diff if d.startswith("-") and not d.startswith("---")),
            dump_file=f"{stem}.py", layers_changed=changed, worst_layer=worst))
        log.info("debug: %s: output SQNR %.2f dB, worst layer %s", p.name, reports[-1].logits_sqnr_db, worst)
    if not pipeline.passes:
        _, layers = layer_errors(cg, feed, reference)

    report = DebugReport(model=name, model_class=cg.model_class, recipe=recipe, samples=int(feed[0].shape[0]),
                         seq_len=int(feed[0].shape[1]) if feed[0].dim() > 1 else int(feed[0].shape[0]),
                         data_source=source, passes=reports, layers=layers, capture_nodes=capture_nodes,
                         out_dir=out, structure=ctx.artifacts.get("structure"),
                         structure_view=ctx.artifacts.get("structure_view"))
    report.seconds = time.perf_counter() - start
    files.update({"json": "report.json"})
    if html_report:
        files["html"] = "report.html"
    report.files = files
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
    if html_report:
        from .debug_html import render_html
        (out / "report.html").write_text(render_html(report, structure_layers=structure_layers), encoding="utf-8")
    return report


class _NumericState:
    """What decides the graph's numbers: its code and which tensor object sits behind each placeholder.

    It holds the tensors themselves (compared with ``is``), not their ids: a freed tensor's id can be reused.
    """

    def __init__(self, cg: CapturedGraph):
        self.code = cg.gm.code
        self.tensors = dict(cg.tensors)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, _NumericState) and self.code == other.code
                and self.tensors.keys() == other.tensors.keys()
                and all(v is other.tensors[k] for k, v in self.tensors.items()))

    __hash__ = None  # type: ignore[assignment]


def exact_layers(cg: CapturedGraph, reference: Mapping[str, Any]) -> list[LayerError]:
    """Every linear as exact (the float graph itself), without running it."""
    sites = [s for s in linear_sites(cg).values() if s.key in reference]
    return [LayerError(name=_display(s.key), key=s.key, node=s.node, layer=_layer_index(_display(s.key)),
                       kind=_display(s.key).rsplit(".", 1)[-1], sqnr_db=math.inf, propagated_sqnr_db=math.inf,
                       max_abs_error=0.0, order=i, rank=i + 1) for i, s in enumerate(sites)]


def _run_one(p: Pass, cg: CapturedGraph, ctx: PassContext, index: int) -> tuple[Any, int, int, int]:
    """Run one pass through the pipeline (so it is verified and counted exactly as in a real run) and measure
    its memory. Returns (PassRecord, RSS delta, growth of the peak RSS, Python peak)."""
    rss0, peak0 = _rss_bytes(), _maxrss_bytes()
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        # debug_dir="" (not None) keeps the pipeline from dumping again into $FXQUANT_DEBUG: we write the
        # numbered dumps ourselves, with the pipeline-wide index
        rec = Pipeline([p]).run(cg, ctx, debug_dir="", verify=True)[0]
        _, py_peak = tracemalloc.get_traced_memory()
    finally:
        if not tracing:
            tracemalloc.stop()
    rec = dataclasses.replace(rec, index=index)
    records = ctx.artifacts.get("pipeline_records")
    if records:
        records[-1] = rec
    rss1 = _rss_bytes()
    rss = rss1 - rss0 if rss0 >= 0 and rss1 >= 0 else 0
    return rec, rss, _maxrss_bytes() - peak0, int(py_peak)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# ---- CLI -----------------------------------------------------------------------------------------------------
def add_debug_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``fxquant debug`` to the CLI's subparsers."""
    p = sub.add_parser(
        "debug", help="run a recipe pass by pass and write a report: graph diffs, time, memory, SQNR per pass/layer",
        description="Runs the recipe's passes one by one on a few WikiText-2 validation samples and writes the "
                    "numbered graph dumps, report.json and a self-contained report.html to --out.")
    p.add_argument("--model", default="smollm2",
                   help="built-in name (smollm2 [default], minilm), a .gguf file, a model folder or a hub id")
    p.add_argument("--recipe", default="rtn-w4g128", help="recipe name or .yaml/.json file (default rtn-w4g128)")
    p.add_argument("--out", default="fxquant-debug", help="output folder (default ./fxquant-debug)")
    p.add_argument("--samples", type=int, default=2, help="calibration sequences to run (default 2)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--data", default=None, help="calibration text file or data folder (default: WikiText-2 validation)")
    p.add_argument("--top", type=int, default=10, help="worst layers to print (default 10)")
    p.add_argument("--no-html", action="store_true", help="write report.json only")
    p.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    p.set_defaults(func=cmd_debug)
    return p


def cmd_debug(args: argparse.Namespace) -> int:
    report = debug_recipe(args.model, args.recipe, samples=args.samples, seq_len=args.seq_len, out_dir=args.out,
                          data=args.data, html_report=not args.no_html)
    print(f"fxquant debug: {args.model} ({report.model_class}) with {report.recipe.name}, "
          f"{report.samples} x {report.seq_len} tokens, {report.seconds:.1f}s")
    print(f"{'#':>3}  {'pass':<26} {'time s':>7} {'+':>5} {'-':>5} {'~':>5} {'rss MiB':>8} {'out SQNR dB':>12} "
          f"{'max err':>9}")
    for r in report.passes:
        print(f"{r.index:>3}  {r.name:<26} {r.seconds:>7.2f} {r.added:>5} {r.removed:>5} {r.replaced:>5} "
              f"{r.rss_delta_bytes / 2**20:>8.1f} {_fmt_db(r.logits_sqnr_db):>12} {r.logits_max_abs_error:>9.3g}")
    worst = [e for e in report.layers if not e.exact][: max(0, args.top)]
    if worst:
        print(f"\nlayers that hurt most (local SQNR of the linear's output):")
        for e in worst:
            print(f"  {e.rank:>3}. {e.name:<48} {e.sqnr_db:>8.2f} dB  (in the model: "
                  f"{_fmt_db(e.propagated_sqnr_db)} dB)")
    print(f"\nwrote {Path(args.out) / 'report.json'}" + ("" if args.no_html else f" and {Path(args.out) / 'report.html'}"))
    return 0


def _fmt_db(value: float) -> str:
    return "exact" if math.isinf(value) and value > 0 else f"{value:.2f}"

