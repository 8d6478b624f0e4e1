"""The pass base and the ordered pipeline.

A pass is small and states its contract, like ``torch.fx.passes.infra.PassBase`` (marked experimental in
torch, hence this thin copy of the idea):

* ``name`` — a verb phrase, used in logs, dumps and recipes;
* ``requires(cg, ctx)`` — raise :class:`PassError` if the graph is not in the state this pass needs;
* ``call(cg, ctx) -> PassResult`` — the rewrite; says whether it changed the graph;
* ``ensures(cg, ctx)`` — the pass's own invariants after the rewrite (run by the verifier).

The :class:`Pipeline` runs passes in order and, after each one, verifies the graph (``graph.lint()`` plus the
pass's ``ensures``). Verification is always on in tests (``FXQUANT_VERIFY=1``, set by ``tests/conftest.py``)
and opt-in for users. ``FXQUANT_DEBUG=<dir>`` writes the graph after each pass as numbered files
(``000_capture.py``, ``001_<pass>.py``, ...) and a ``summary.json`` / ``summary.txt`` with the time per pass
and the nodes added, removed and replaced.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from torch import fx

from .capture import CapturedGraph
from .errors import PassError

log = logging.getLogger("fxquant")


@dataclass
class PassResult:
    modified: bool
    #: counters a pass wants to report (e.g. {"matched": 30, "rewritten": 30})
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes share: the recipe, calibration data and the artifacts earlier passes left."""

    recipe: Any = None
    calibration: Any = None
    #: results of analysis passes and quantization records, keyed by producing pass
    artifacts: dict[str, Any] = field(default_factory=dict)
    verify: bool = False
    options: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of every fxquant pass. Subclasses set ``name`` and implement ``call``."""

    name: str = "unnamed"
    #: one line for ``fxquant passes`` and the debug report
    description: str = ""

    def requires(self, cg: CapturedGraph, ctx: PassContext) -> None:  # noqa: B027 - optional hook
        """Raise PassError if ``cg`` is not in the state this pass needs."""

    def call(self, cg: CapturedGraph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def ensures(self, cg: CapturedGraph, ctx: PassContext) -> None:  # noqa: B027 - optional hook
        """Raise PassError if this pass's guarantees do not hold."""

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


class PassOptions:
    """Base of a pass's option dataclass: built from a recipe's ``options`` (keys it does not have are someone
    else's) and checked; subclasses name their positive-integer and true/false fields and check the rest in
    :meth:`check`."""

    positive_ints: tuple[str, ...] = ()
    bools: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, options: Any) -> Any:
        cfg = cls(**{k: v for k, v in options.items() if k in cls.__dataclass_fields__})  # type: ignore[attr-defined]
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for key in self.positive_ints:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PassError(f"{key} must be a positive integer, got {value!r}",
                                f"e.g. options: {{{key}: {getattr(type(self), key)}}}")
        for key in self.bools:
            if not isinstance(getattr(self, key), bool):
                raise PassError(f"{key} is true or false, got {getattr(self, key)!r}",
                                f"e.g. options: {{{key}: {str(not getattr(type(self), key)).lower()}}}")
        self.check()

    def check(self) -> None:
        """Checks of the other fields (ranges); raise :class:`PassError`."""


def replace_weight(cg: CapturedGraph, ctx: PassContext, names: Iterable[str], new: Any) -> None:
    """Make ``new`` the tensor behind the placeholders ``names`` (aliases of one weight).

    By default the graph's tensor is *replaced* (passes are functional: the debugger compares the tensors before
    and after each pass). With ``ctx.options["inplace_weights"]`` — what :func:`fxquant.quantize` sets — the
    model's own tensor is overwritten instead, so quantizing needs no second copy of the model: peak memory stays
    at the model plus the one weight being quantized.
    """
    names = list(names)
    original = cg.tensors[names[0]]
    if (ctx.options.get("inplace_weights") and getattr(original, "shape", None) == new.shape
            and original.dtype == new.dtype and all(cg.tensors[n] is original for n in names)):
        import torch
        with torch.no_grad():
            original.copy_(new)
        return
    for n in names:
        cg.tensors[n] = new


def verify_graph(cg: CapturedGraph, after: str = "") -> None:
    """Structural checks that hold after every pass."""
    try:
        cg.gm.graph.lint()
    except Exception as exc:  # noqa: BLE001
        raise PassError(f"graph does not lint after {after or 'capture'}: {exc}",
                        "the pass left a malformed graph; dump it with FXQUANT_DEBUG=dir and look at the last file") from exc
    for node in cg.gm.graph.nodes:
        if node.op == "placeholder" and node.name not in cg.user_inputs and node.name not in cg.tensors:
            raise PassError(f"after {after}: placeholder {node.name!r} has no tensor behind it",
                            "register new tensors with CapturedGraph.add_tensor()")


def _node_sig(node: fx.Node) -> str:
    return f"{node.op}:{node.target}:{node.args}"


def _snapshot(gm: fx.GraphModule) -> dict[str, str]:
    return {n.name: _node_sig(n) for n in gm.graph.nodes}


def graph_text(cg: CapturedGraph) -> str:
    """Readable Python source of the graph, with fxquant's annotations as comments."""
    code = cg.gm.print_readable(print_output=False, include_stride=False, include_device=False)
    notes = []
    for node in cg.gm.graph.nodes:
        meta = node.meta.get("fxquant")
        if meta:
            shown = {k: v for k, v in meta.items() if k != "param"}
            if shown:
                notes.append(f"#   {node.name}: {_short(shown)}")
    if notes:
        code += "\n# fxquant annotations\n" + "\n".join(notes) + "\n"
    return code


def _short(obj: Any, limit: int = 200) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class PassRecord:
    index: int
    name: str
    seconds: float
    modified: bool
    added: int
    removed: int
    replaced: int
    nodes: int
    stats: dict[str, Any]


class Pipeline:
    """An ordered list of named passes. ``run`` applies them, verifying and dumping as configured."""

    def __init__(self, passes: Iterable[Pass]):
        self.passes = list(passes)
        names = [p.name for p in self.passes]
        for name in names:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise PassError(f"pass name {name!r} is not a snake_case identifier", "name passes like fold_equivalent_scales")

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def run(self, cg: CapturedGraph, ctx: PassContext | None = None, *, debug_dir: str | os.PathLike | None = None,
            verify: bool | None = None) -> list[PassRecord]:
        ctx = ctx or PassContext()
        if verify is None:
            verify = ctx.verify or os.environ.get("FXQUANT_VERIFY", "") not in ("", "0")
        ctx.verify = verify
        if debug_dir is None and os.environ.get("FXQUANT_DEBUG"):
            debug_dir = os.environ["FXQUANT_DEBUG"]
        dump = Path(debug_dir) if debug_dir else None
        if dump is not None:
            dump.mkdir(parents=True, exist_ok=True)
            (dump / "000_capture.py").write_text(graph_text(cg))
        if verify:
            verify_graph(cg)
        records: list[PassRecord] = []
        for index, p in enumerate(self.passes, start=1):
            before = _snapshot(cg.gm)
            p.requires(cg, ctx)
            start = time.perf_counter()
            result = p.call(cg, ctx)
            if not isinstance(result, PassResult):
                raise PassError(f"pass {p.name} returned {type(result).__name__}, not PassResult",
                                "return PassResult(modified, stats) from call()")
            if result.modified:
                if ctx.options.get("dce", False):
                    cg.gm.graph.eliminate_dead_code()
                cg.gm.recompile()
            seconds = time.perf_counter() - start
            if verify:
                verify_graph(cg, p.name)
                p.ensures(cg, ctx)
            after = _snapshot(cg.gm)
            added = len(after.keys() - before.keys())
            removed = len(before.keys() - after.keys())
            replaced = sum(1 for k in after.keys() & before.keys() if after[k] != before[k])
            rec = PassRecord(index, p.name, seconds, result.modified, added, removed, replaced,
                             len(after), dict(result.stats))
            records.append(rec)
            log.info("pass %-28s %7.3fs  +%d -%d ~%d nodes  %s", p.name, seconds, added, removed, replaced,
                     _short(result.stats, 120) if result.stats else "")
            if dump is not None:
                (dump / f"{index:03d}_{p.name}.py").write_text(graph_text(cg))
        if dump is not None:
            _write_summary(dump, records, cg)
        ctx.artifacts.setdefault("pipeline_records", []).extend(records)
        return records


def _write_summary(dump: Path, records: list[PassRecord], cg: CapturedGraph) -> None:
    data = {
        "model_class": cg.model_class,
        "passes": [rec.__dict__ for rec in records],
        "total_seconds": sum(r.seconds for r in records),
    }
    (dump / "summary.json").write_text(json.dumps(data, indent=2, default=str))
    lines = [f"fxquant pipeline on {cg.model_class}", "",
             f"{'#':>3}  {'pass':<28} {'time s':>8} {'added':>6} {'removed':>8} {'replaced':>9} {'nodes':>6}  stats"]
    for r in records:
        lines.append(f"{r.index:>3}  {r.name:<28} {r.seconds:>8.3f} {r.added:>6} {r.removed:>8} {r.replaced:>9} "
                     f"{r.nodes:>6}  {_short(r.stats, 100)}")
    (dump / "summary.txt").write_text("\n".join(lines) + "\n")
