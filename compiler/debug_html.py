"""The self-contained HTML page of ``fxquant debug``: inline CSS and SVG, one small inline script, no network.

Charts are written as SVG by hand (a few dozen lines each) rather than with matplotlib: the report then needs no
optional dependency, stays small, and every mark carries a ``<title>`` tooltip with its exact value. The
structure diagram is laid out with networkx (``topological_generations`` + ``multipartite_layout``) from the
records of ``analyze_structure`` and the networkx view of the graph.

Every section has an id (:data:`SECTIONS`); the inline script checks they are all present and marks the page
``<html data-fxquant-report="ready">``, which the headless-Chromium test reads back from the rendered DOM.
"""
from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .debug import DebugReport, LayerError

#: the report's sections, in page order (ids of ``<section>`` elements)
SECTIONS = ("summary", "pass-error", "passes", "layers", "worst-layers", "structure", "diffs")

#: diffs longer than this are cut in the page (the full diff is the ``NNN_<pass>.diff`` file beside it)
MAX_DIFF_LINES = 300

_KIND_COLORS = {"norm": "#9ecae1", "linear": "#dddddd", "core": "#eeeeee", "mul": "#fdd0a2"}
_EDGE_STYLES = {  # kind -> (stroke colour, dash pattern, legend text)
    "norm": ("#3182bd", "", "norm -> linear group (TEQ/FSBR scale site)"),
    "attention": ("#756bb1", "6 3", "pair through attention's value input"),
    "gated": ("#e6550d", "6 3", "pair through the gated (SwiGLU) product"),
    "linear": ("#31a354", "6 3", "pair through shape ops"),
    "activation": ("#17becf", "6 3", "pair through a positively homogeneous activation"),
    "dataflow": ("#999999", "", "data flow (attention, gated product)"),
    "residual": ("#cccccc", "2 3", "residual stream to the next block"),
}


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fmt_db(value: float) -> str:
    if math.isinf(value):
        return "exact" if value > 0 else "-inf"
    return f"{value:.2f}"


def _color(value: float, lo: float, hi: float) -> str:
    """Red (worst) -> yellow -> green (best); exact values are blue-grey."""
    if math.isinf(value) and value > 0:
        return "#b8c7d9"
    if math.isnan(value) or hi <= lo:
        return "#d9d9d9" if math.isnan(value) else "#fdae61"
    t = min(1.0, max(0.0, (value - lo) / (hi - lo)))
    stops = [(0.0, (215, 48, 39)), (0.5, (254, 224, 139)), (1.0, (26, 152, 80))]
    for (t0, c0), (t1, c1) in zip(stops, stops[1:]):
        if t <= t1:
            f = (t - t0) / (t1 - t0)
            r, g, b = (round(a + (b_ - a) * f) for a, b_ in zip(c0, c1))
            return f"#{r:02x}{g:02x}{b:02x}"
    return "#1a9850"


def _finite_range(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    return min(finite), max(finite)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


# ---- charts --------------------------------------------------------------------------------------------------
def svg_line_chart(labels: Sequence[str], values: Sequence[float], *, title: str, y_label: str,
                   log_y: bool = False, width: int = 560, height: int = 260) -> str:
    """One series over the pipeline's stages. Infinite values (exact) are drawn at the top as open circles."""
    left, right, top, bottom = 62, 16, 30, 70
    plot_w, plot_h = width - left - right, height - top - bottom
    shown = [math.log10(v) if log_y and v > 0 and math.isfinite(v) else (v if not log_y else math.nan)
             for v in values]
    if log_y:
        shown = [(-math.inf if v == 0 else s) if math.isfinite(v) else math.inf for v, s in zip(values, shown)]
    lo, hi = _finite_range(shown)
    pad = max(1e-9, (hi - lo) * 0.1) if hi > lo else (abs(hi) * 0.1 or 1.0)
    lo, hi = lo - pad, hi + pad
    n = len(labels)

    def x(i: int) -> float:
        return left + (plot_w * (i + 0.5) / n if n else 0)

    def y(v: float) -> float:
        if math.isinf(v):
            return top if v > 0 else top + plot_h
        return top + plot_h * (1 - (v - lo) / (hi - lo))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
           f'<text x="{left}" y="18" class="title">{_e(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>']
    for t in _nice_ticks(lo, hi):
        label = f"1e{t:g}" if log_y else f"{t:g}"
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(t):.1f}" y2="{y(t):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{y(t) + 4:.1f}" class="tick" text-anchor="end">{label}</text>')
    out.append(f'<text transform="translate(14,{top + plot_h / 2}) rotate(-90)" class="axis" '
               f'text-anchor="middle">{_e(y_label)}</text>')
    points = [(x(i), y(v)) for i, v in enumerate(shown) if not math.isnan(v)]
    if len(points) > 1:
        path = " ".join(f"{'M' if i == 0 else 'L'}{px:.1f},{py:.1f}" for i, (px, py) in enumerate(points))
        out.append(f'<path d="{path}" class="series"/>')
    for i, (label, raw, v) in enumerate(zip(labels, values, shown)):
        cls = "dot exact" if math.isinf(v) and v > 0 else "dot"
        text = _fmt_db(raw) if not log_y else (f"{raw:.4g}" if math.isfinite(raw) else str(raw))
        out.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="4.5" class="{cls}"><title>{_e(label)}: '
                   f'{_e(text)}</title></circle>')
        out.append(f'<text transform="translate({x(i):.1f},{top + plot_h + 12}) rotate(30)" class="tick">'
                   f'{_e(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def svg_layer_bars(layers: Sequence["LayerError"], *, width: int = 1100, height: int = 300, highlight: int = 5) -> str:
    """Local SQNR of every linear, in graph order; the ``highlight`` worst ones are outlined and labelled."""
    left, right, top, bottom = 56, 12, 30, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    ordered = sorted(layers, key=lambda e: e.order)
    values = [e.sqnr_db for e in ordered]
    lo, hi = _finite_range(values)
    lo_axis = min(0.0, lo)
    hi_axis = hi + (hi - lo_axis) * 0.08 + 1e-9
    n = max(1, len(ordered))
    bw = plot_w / n
    worst = {e.key for e in sorted(layers, key=lambda e: e.sqnr_db)[:highlight] if not e.exact}

    def y(v: float) -> float:
        v = hi_axis if math.isinf(v) and v > 0 else v
        return top + plot_h * (1 - (v - lo_axis) / (hi_axis - lo_axis))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="per-layer SQNR">',
           f'<text x="{left}" y="18" class="title">Local SQNR of each linear (dB, higher is better; '
           f'graph order; outlined: the {len(worst)} worst; blue-grey: exact / not quantized)</text>',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>']
    for t in _nice_ticks(lo_axis, hi_axis):
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(t):.1f}" y2="{y(t):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{y(t) + 4:.1f}" class="tick" text-anchor="end">{t:g}</text>')
    previous_layer: object = object()
    for i, e in enumerate(ordered):
        x0 = left + i * bw
        top_y = y(e.sqnr_db)
        cls = "bar worst" if e.key in worst else "bar"
        out.append(f'<rect x="{x0 + 0.1 * bw:.2f}" y="{top_y:.1f}" width="{max(0.8, 0.8 * bw):.2f}" '
                   f'height="{max(0.0, top + plot_h - top_y):.1f}" fill="{_color(e.sqnr_db, lo, hi)}" class="{cls}">'
                   f'<title>{_e(e.name)}: local {_fmt_db(e.sqnr_db)} dB, in the model '
                   f'{_fmt_db(e.propagated_sqnr_db)} dB, max abs err {e.max_abs_error:.4g} (rank {e.rank})</title></rect>')
        if e.layer != previous_layer and e.layer is not None and (e.layer % max(1, _layer_stride(ordered)) == 0):
            out.append(f'<text x="{x0:.1f}" y="{top + plot_h + 14}" class="tick">{e.layer}</text>')
        previous_layer = e.layer
        if e.key in worst:
            out.append(f'<text x="{x0 + bw / 2:.1f}" y="{top_y - 4:.1f}" class="note" text-anchor="middle">'
                       f'{e.rank}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" class="axis" text-anchor="middle">'
               f'decoder layer (bars: linears of that layer, in graph order)</text>')
    out.append("</svg>")
    return "".join(out)


def _layer_stride(ordered: Sequence["LayerError"]) -> int:
    count = len({e.layer for e in ordered if e.layer is not None})
    return max(1, math.ceil(count / 30))


def svg_layer_heatmap(layers: Sequence["LayerError"]) -> str:
    """Layer x projection grid of local SQNR (only for models whose linears sit in numbered layers)."""
    numbered = [e for e in layers if e.layer is not None]
    if not numbered:
        return '<p class="muted">No numbered layers (no <code>layers.N.</code> in the weight names): no heat map.</p>'
    kinds: list[str] = []
    for e in sorted(numbered, key=lambda e: e.order):
        if e.kind not in kinds:
            kinds.append(e.kind)
    rows = sorted({e.layer for e in numbered if e.layer is not None})
    cell_w, cell_h, left, top = 78, 16, 48, 36
    width, height = left + cell_w * len(kinds) + 10, top + cell_h * len(rows) + 10
    lo, hi = _finite_range([e.sqnr_db for e in numbered])
    grid = {(e.layer, e.kind): e for e in numbered}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="SQNR heat map">',
           f'<text x="{left}" y="14" class="title">Local SQNR (dB) by layer and projection</text>']
    for j, kind in enumerate(kinds):
        out.append(f'<text x="{left + j * cell_w + cell_w / 2}" y="{top - 6}" class="tick" '
                   f'text-anchor="middle">{_e(kind)}</text>')
    for i, layer in enumerate(rows):
        y0 = top + i * cell_h
        out.append(f'<text x="{left - 6}" y="{y0 + cell_h - 4}" class="tick" text-anchor="end">{layer}</text>')
        for j, kind in enumerate(kinds):
            e = grid.get((layer, kind))
            if e is None:
                continue
            x0 = left + j * cell_w
            out.append(f'<rect x="{x0}" y="{y0}" width="{cell_w - 1}" height="{cell_h - 1}" '
                       f'fill="{_color(e.sqnr_db, lo, hi)}"><title>{_e(e.name)}: {_fmt_db(e.sqnr_db)} dB'
                       f'</title></rect><text x="{x0 + cell_w / 2}" y="{y0 + cell_h - 4}" class="cell" '
                       f'text-anchor="middle">{_fmt_db(e.sqnr_db)}</text>')
    out.append("</svg>")
    return "".join(out)


# ---- structure -----------------------------------------------------------------------------------------------
def structure_graph(structure: Any, layer: int | None, view: Any = None) -> Any:
    """A small networkx DiGraph of one layer's structure: norms, linears, attention cores, gated products.

    Node attributes: ``kind`` (norm / linear / core / mul), ``label``, ``fqn``, ``order`` (graph order, from the
    networkx view when given); edge attribute ``kind`` (a key of the legend). ``layer=None`` draws the records
    that belong to no numbered layer (a single block, or the final norm -> lm_head).
    """
    import networkx as nx

    order: dict[str, int] = {}
    if view is not None:
        order = {name: i for i, name in enumerate(view.nodes)}
    g = nx.DiGraph()

    def add(node: str | None, kind: str, fqn: str | None = None) -> None:
        if node is None:
            return
        if node not in g:
            g.add_node(node, kind=kind, fqn=fqn, label=_short_label(fqn or node), order=order.get(node, 0),
                       shape=(view.nodes[node].get("shape") if view is not None and node in view else None))
        elif fqn and not g.nodes[node].get("fqn"):
            g.nodes[node].update(fqn=fqn, label=_short_label(fqn))

    def edge(a: str | None, b: str | None, kind: str) -> None:
        if a is not None and b is not None and a != b and not g.has_edge(a, b):
            g.add_edge(a, b, kind=kind)

    groups = [grp for grp in structure.norm_groups if grp.layer == layer]
    for grp in groups:
        add(grp.norm, "norm", grp.weight)
        for node, fqn in zip(grp.consumer_nodes, grp.consumers):
            add(node, "linear", fqn)
            edge(grp.norm, node, "norm")
    for a in structure.attentions:
        if a.layer != layer:
            continue
        add(a.core, "core", f"attention ({a.form}, {a.num_heads} heads, {a.num_kv_heads} kv)")
        for node, fqn in ((a.q_node, a.q), (a.k_node, a.k), (a.v_node, a.v)):
            add(node, "linear", fqn)
            edge(node, a.core, "dataflow")
        add(a.o_node, "linear", a.o)
        edge(a.core, a.o_node, "dataflow")
    for s in structure.swiglus:
        if s.layer != layer:
            continue
        add(s.gate_node, "linear", s.gate)
        add(s.up_node, "linear", s.up)
        add(s.mul, "mul", f"{s.act}(gate) * up")
        edge(s.gate_node, s.mul, "dataflow")
        edge(s.up_node, s.mul, "dataflow")
        if s.down_node:
            add(s.down_node, "linear", s.down)
            edge(s.mul, s.down_node, "dataflow")
    for p in structure.pairs:
        if p.layer != layer:
            continue
        add(p.producer_node, "linear", p.producer)
        add(p.consumer_node, "linear", p.consumer)
        if not g.has_edge(p.producer_node, p.consumer_node):
            g.add_edge(p.producer_node, p.consumer_node, kind=p.kind if p.kind in _EDGE_STYLES else "linear")
    # the residual stream links one sub-block to the next norm (it is not a record: only for the layout)
    norms = sorted((n for n, d in g.nodes(data=True) if d["kind"] == "norm"), key=lambda n: g.nodes[n]["order"])
    for prev, nxt in zip(norms, norms[1:]):
        upstream = [n for n in g.nodes if g.nodes[n]["order"] < g.nodes[nxt]["order"] and n != nxt
                    and g.nodes[n]["order"] >= g.nodes[prev]["order"]]
        last = max(upstream, key=lambda n: g.nodes[n]["order"], default=None)
        if last is not None and nx.is_directed_acyclic_graph(g):
            edge(last, nxt, "residual")
    return g


def _short_label(name: str) -> str:
    name = name[: -len(".weight")] if name.endswith(".weight") else name
    parts = name.split(".")
    for i, (a, b) in enumerate(zip(parts, parts[1:])):
        if a in ("layers", "layer", "h", "blocks", "block") and b.isdigit():
            parts = parts[i + 2:]
            break
    text = ".".join(parts[-2:]) if len(parts) > 1 and parts[-1] in ("weight", "bias") else parts[-1]
    return text if len(text) <= 22 else text[:21] + "…"


def svg_structure(structure: Any, layer: int | None, view: Any, errors: dict[str, "LayerError"],
                  lo: float, hi: float) -> str:
    """Draw :func:`structure_graph` left to right, linears coloured by their local SQNR."""
    import networkx as nx

    g = structure_graph(structure, layer, view)
    if g.number_of_nodes() == 0:
        return '<p class="muted">Nothing recorded for this layer.</p>'
    if not nx.is_directed_acyclic_graph(g):  # never expected; fall back to graph order
        gens = [[n] for n in sorted(g.nodes, key=lambda n: g.nodes[n]["order"])]
    else:
        gens = [sorted(gen, key=lambda n: g.nodes[n]["order"]) for gen in nx.topological_generations(g)]
    for i, gen in enumerate(gens):
        for n in gen:
            g.nodes[n]["gen"] = i
    pos = nx.multipartite_layout(g, subset_key="gen", align="vertical")
    box_w, box_h, col_w, row_h = 112, 28, 142, 42
    tallest = max(len(gen) for gen in gens)
    width = int(col_w * len(gens) + 40)
    height = int(row_h * tallest + 40)
    xs = sorted({float(p[0]) for p in pos.values()})
    col = {x: i for i, x in enumerate(xs)}
    coords: dict[str, tuple[float, float]] = {}
    for i, gen in enumerate(gens):
        ys = sorted(gen, key=lambda n: float(pos[n][1]), reverse=True)
        offset = (tallest - len(ys)) * row_h / 2
        for j, n in enumerate(ys):
            coords[n] = (20 + col[float(pos[n][0])] * col_w, 20 + offset + j * row_h)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="structure" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="structure of layer {layer}">',
           '<defs>' + "".join(
               f'<marker id="arrow-{k}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
               f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{c}"/></marker>'
               for k, (c, _, _) in _EDGE_STYLES.items()) + '</defs>']
    for a, b, d in g.edges(data=True):
        kind = d.get("kind", "linear")
        color, dash, _ = _EDGE_STYLES.get(kind, _EDGE_STYLES["linear"])
        (x1, y1), (x2, y2) = coords[a], coords[b]
        sx, sy, tx, ty = x1 + box_w, y1 + box_h / 2, x2, y2 + box_h / 2
        # pairs bend away so that they stay visible beside the data-flow edges they shortcut
        bend = -28 if dash else 0
        mx, my = (sx + tx) / 2, (sy + ty) / 2 + bend
        out.append(f'<path d="M{sx:.1f},{sy:.1f} Q{mx:.1f},{my:.1f} {tx:.1f},{ty:.1f}" fill="none" '
                   f'stroke="{color}" stroke-width="1.6" stroke-dasharray="{dash}" '
                   f'marker-end="url(#arrow-{kind if kind in _EDGE_STYLES else "linear"})"><title>{_e(kind)}: '
                   f'{_e(g.nodes[a]["label"])} -> {_e(g.nodes[b]["label"])}</title></path>')
    for n, d in g.nodes(data=True):
        x0, y0 = coords[n]
        fill = _KIND_COLORS.get(d["kind"], "#eeeeee")
        tip = f"{d.get('fqn') or n} (node {n})"
        if d.get("shape"):
            tip += f" shape {list(d['shape'])}"
        err = errors.get(d.get("fqn") or "")
        if d["kind"] == "linear" and err is not None:
            fill = _color(err.sqnr_db, lo, hi)
            tip += f": local SQNR {_fmt_db(err.sqnr_db)} dB (rank {err.rank})"
        out.append(f'<g class="node {d["kind"]}"><rect x="{x0}" y="{y0}" width="{box_w}" height="{box_h}" rx="5" '
                   f'fill="{fill}"/><text x="{x0 + box_w / 2}" y="{y0 + box_h / 2 + 4}" text-anchor="middle">'
                   f'{_e(d["label"])}</text><title>{_e(tip)}</title></g>')
    out.append("</svg>")
    return "".join(out)


def _legend() -> str:
    items = []
    for kind, (color, dash, text) in _EDGE_STYLES.items():
        items.append(f'<span class="legend-item"><svg width="34" height="10"><line x1="0" y1="5" x2="34" y2="5" '
                     f'stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/></svg> {_e(text)}</span>')
    for kind, color in (("norm", _KIND_COLORS["norm"]), ("attention core", _KIND_COLORS["core"]),
                        ("gated product", _KIND_COLORS["mul"])):
        items.append(f'<span class="legend-item"><span class="swatch" style="background:{color}"></span> '
                     f'{_e(kind)}</span>')
    items.append('<span class="legend-item"><span class="swatch" style="background:linear-gradient(90deg,#d73027,'
                 '#fee08b,#1a9850)"></span> linear, by local SQNR (red: worst)</span>')
    return '<div class="legend">' + "".join(items) + "</div>"


# ---- the page ------------------------------------------------------------------------------------------------
_CSS = """
body{font:14px/1.45 -apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#243447;color:#fff;padding:14px 28px}
header h1{margin:0;font-size:21px} header p{margin:4px 0 0;color:#cfd8e3}
main{padding:8px 28px 40px;max-width:1240px}
section{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:10px 18px 14px;margin:16px 0}
h2{font-size:17px;margin:6px 0 10px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border-bottom:1px solid #eee;padding:4px 9px;text-align:right;white-space:nowrap}
th{background:#f2f4f7;cursor:pointer;user-select:none} td.l,th.l{text-align:left}
.cards{display:flex;gap:14px;flex-wrap:wrap}
.card{border:1px solid #e3e3e3;border-radius:6px;padding:8px 14px;min-width:150px;background:#fcfcfd}
.card b{display:block;font-size:19px} .card span{color:#666;font-size:12px}
svg text{font:11px -apple-system,Segoe UI,Helvetica,Arial,sans-serif;fill:#333}
svg .title{font-size:13px;font-weight:600} svg .tick{font-size:10px;fill:#555} svg .axis{font-size:11px;fill:#444}
svg .note{font-size:9px;font-weight:700;fill:#b2182b} svg .cell{font-size:9px;fill:#222}
svg .frame{fill:none;stroke:#ccc} svg .grid{stroke:#eee} svg .series{fill:none;stroke:#2166ac;stroke-width:2}
svg .dot{fill:#2166ac;stroke:#fff;stroke-width:1.5} svg .dot.exact{fill:#fff;stroke:#2166ac;stroke-width:2}
svg .bar.worst{stroke:#67001f;stroke-width:1.2}
svg.structure .node rect{stroke:#555;stroke-width:.8} svg.structure .node text{font-size:11px}
.row{display:flex;gap:20px;flex-wrap:wrap;align-items:flex-start}
.legend{font-size:12px;color:#444;margin:6px 0} .legend-item{margin-right:14px;white-space:nowrap}
.swatch{display:inline-block;width:22px;height:10px;border:1px solid #999;vertical-align:middle}
pre{background:#f6f8fa;border:1px solid #eee;padding:8px;overflow:auto;font-size:12px;max-height:420px}
pre .add{color:#1a7f37} pre .del{color:#cf222e} pre .hunk{color:#8250df}
.muted{color:#777} details{margin:4px 0} summary{cursor:pointer}
.scroll{overflow-x:auto}
"""

_SCRIPT = """
(function () {
  function key(cell) {
    var v = cell.getAttribute('data-sort');
    if (v === null) { return cell.textContent.trim().toLowerCase(); }
    var f = parseFloat(v);
    return isNaN(f) ? v : f;
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    var heads = table.querySelectorAll('thead th');
    heads.forEach(function (th, col) {
      th.title = 'click to sort';
      th.addEventListener('click', function () {
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        var asc = th.getAttribute('data-order') !== 'asc';
        rows.sort(function (a, b) {
          var x = key(a.cells[col]), y = key(b.cells[col]);
          return (x > y ? 1 : x < y ? -1 : 0) * (asc ? 1 : -1);
        });
        heads.forEach(function (h) { h.removeAttribute('data-order'); });
        th.setAttribute('data-order', asc ? 'asc' : 'desc');
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  var needed = %SECTIONS%;
  var missing = needed.filter(function (id) { return !document.getElementById(id); });
  document.documentElement.setAttribute('data-fxquant-report', missing.length ? 'missing:' + missing.join(',') : 'ready');
})();
"""


def _sort_value(value: float) -> str:
    if math.isinf(value):
        return "1e308" if value > 0 else "-1e308"
    return f"{value:.6g}"


def _human_bytes(n: int) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n}"


def _diff_html(text: str) -> str:
    lines = text.splitlines()
    cut = len(lines) > MAX_DIFF_LINES
    out = []
    for line in lines[:MAX_DIFF_LINES]:
        cls = ("add" if line.startswith("+") and not line.startswith("+++") else
               "del" if line.startswith("-") and not line.startswith("---") else
               "hunk" if line.startswith("@@") else "")
        out.append(f'<span class="{cls}">{_e(line)}</span>' if cls else _e(line))
    if cut:
        out.append(f"... {len(lines) - MAX_DIFF_LINES} more lines in the .diff file")
    return "\n".join(out)


def render_html(report: "DebugReport", *, structure_layers: int = 2) -> str:
    """The whole page for ``report`` (a :class:`fxquant.debug.DebugReport`)."""
    passes = report.passes
    final_db = report.final_sqnr_db
    final_err = passes[-1].logits_max_abs_error if passes else 0.0
    worst = [e for e in report.layers if not e.exact]
    lo, hi = _finite_range([e.sqnr_db for e in report.layers])
    parts: list[str] = []

    # summary
    cards = [("output SQNR vs float", f"{_fmt_db(final_db)} dB" if math.isfinite(final_db) else "exact"),
             ("output max abs error", f"{final_err:.4g}"),
             ("worst layer", worst[0].name if worst else "none (all exact)"),
             ("its local SQNR", f"{_fmt_db(worst[0].sqnr_db)} dB" if worst else "-"),
             ("linears changed", f"{len(worst)} of {len(report.layers)}"),
             ("passes", str(len(passes))), ("run time", f"{report.seconds:.1f} s")]
    parts.append('<section id="summary"><h2>Summary</h2><div class="cards">' + "".join(
        f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for k, v in cards) +
        f'</div><p class="muted">{_e(report.samples)} sample(s) of {_e(report.seq_len)} tokens from '
        f'{_e(report.data_source)}; graph of {_e(report.capture_nodes)} nodes after capture. Output = the model\'s '
        f'logits (a causal LM) or last hidden state, compared with the float model on the same samples.</p>'
        '</section>')

    # per-pass error line
    labels = ["capture"] + [f"{p.index}. {p.name}" for p in passes]
    sqnrs = [math.inf] + [p.logits_sqnr_db for p in passes]
    errs = [0.0] + [p.logits_max_abs_error for p in passes]
    parts.append('<section id="pass-error"><h2>Error after each pass</h2><div class="row">'
                 + svg_line_chart(labels, sqnrs, title="Output SQNR vs float (dB)", y_label="SQNR dB")
                 + svg_line_chart(labels, errs, title="Output max abs error vs float", y_label="max |error|")
                 + '</div><p class="muted">Open circles: exact (no difference from the float model).</p></section>')

    # per-pass table
    rows = []
    for p in passes:
        stats = ", ".join(f"{k}={v}" for k, v in p.stats.items()) if p.stats else ""
        rows.append(
            f'<tr><td data-sort="{p.index}">{p.index}</td><td class="l" title="{_e(p.description)}">{_e(p.name)}</td>'
            f'<td data-sort="{p.seconds:.6f}">{p.seconds:.3f}</td>'
            f'<td data-sort="{p.rss_delta_bytes}">{_human_bytes(p.rss_delta_bytes)}</td>'
            f'<td data-sort="{p.python_peak_bytes}">{_human_bytes(p.python_peak_bytes)}</td>'
            f'<td>{p.added}</td><td>{p.removed}</td><td>{p.replaced}</td><td>{p.nodes}</td>'
            f'<td data-sort="{p.diff_added_lines + p.diff_removed_lines}">+{p.diff_added_lines} '
            f'-{p.diff_removed_lines}</td>'
            f'<td data-sort="{_sort_value(p.logits_sqnr_db)}">{_fmt_db(p.logits_sqnr_db)}</td>'
            f'<td data-sort="{p.logits_max_abs_error:.6g}">{p.logits_max_abs_error:.4g}</td>'
            f'<td>{p.layers_changed}</td><td class="l">{_e(p.worst_layer or "-")}</td>'
            f'<td class="l">{_e(stats)}</td>'
            f'<td class="l"><a href="{_e(p.dump_file)}">graph</a> · <a href="{_e(p.diff_file)}">diff</a></td></tr>')
    parts.append(
        '<section id="passes"><h2>Passes</h2><div class="scroll"><table class="sortable"><thead><tr>'
        '<th>#</th><th class="l">pass</th><th>time s</th><th>RSS Δ</th><th>Python peak</th><th>+nodes</th>'
        '<th>-nodes</th><th>~nodes</th><th>nodes</th><th>printed diff</th><th>out SQNR dB</th><th>out max err</th>'
        '<th>layers changed</th><th class="l">worst layer after</th><th class="l">stats</th><th class="l">files</th>'
        '</tr></thead><tbody>' + "".join(rows) + '</tbody></table></div>'
        '<p class="muted">RSS Δ: change of the process\'s resident memory (torch tensors); Python peak: peak of '
        'Python-level allocations during the pass (tracemalloc). ~nodes: nodes whose target or arguments changed.</p>'
        '</section>')

    # per-layer charts
    parts.append('<section id="layers"><h2>Per-layer error</h2><div class="scroll">' + svg_layer_bars(report.layers)
                 + '</div><div class="scroll">' + svg_layer_heatmap(report.layers) + '</div>'
                 '<p class="muted">Local SQNR: the layer\'s quantized weights applied to the float model\'s input of '
                 'that layer, so it measures the error this layer itself causes (the ranking metric).</p></section>')

    # worst layers table
    rows = []
    for e in report.layers:
        rows.append(f'<tr><td data-sort="{e.rank}">{e.rank}</td><td class="l">{_e(e.name)}</td>'
                    f'<td data-sort="{-1 if e.layer is None else e.layer}">{"-" if e.layer is None else e.layer}</td>'
                    f'<td class="l">{_e(e.kind)}</td><td data-sort="{_sort_value(e.sqnr_db)}">{_fmt_db(e.sqnr_db)}</td>'
                    f'<td data-sort="{_sort_value(e.propagated_sqnr_db)}">{_fmt_db(e.propagated_sqnr_db)}</td>'
                    f'<td data-sort="{e.max_abs_error:.6g}">{e.max_abs_error:.4g}</td></tr>')
    parts.append(
        '<section id="worst-layers"><h2>Layers ranked by the harm they do</h2>'
        f'<p>Worst: <b id="worst-layer">{_e(worst[0].name) if worst else "none"}</b></p>'
        '<details open><summary>all linears (click a header to sort)</summary><div class="scroll">'
        '<table class="sortable" id="layer-table"><thead><tr><th>rank</th><th class="l">linear</th><th>layer</th>'
        '<th class="l">kind</th><th>local SQNR dB</th><th>SQNR in model dB</th><th>local max err</th></tr></thead>'
        '<tbody>' + "".join(rows) + '</tbody></table></div></details></section>')

    # structure
    parts.append('<section id="structure"><h2>Structure found by analyze_structure</h2>'
                 + _structure_section(report, structure_layers, lo, hi) + '</section>')

    # diffs
    diffs = []
    for p in passes:
        path = report.out_dir / p.diff_file
        text = path.read_text() if path.is_file() else ""
        summary = f"{p.index}. {p.name}: +{p.diff_added_lines} -{p.diff_removed_lines} lines"
        body = _diff_html(text) if text.strip() else "(the printed graph did not change)"
        diffs.append(f'<details><summary>{_e(summary)}</summary><pre>{body}</pre></details>')
    parts.append('<section id="diffs"><h2>Printed graph diff per pass</h2>'
                 + ("".join(diffs) or '<p class="muted">The recipe has no passes.</p>') + '</section>')

    recipe = report.recipe
    title = f"fxquant debug: {report.model} · {recipe.name}"
    script = _SCRIPT.replace("%SECTIONS%", "[" + ", ".join(f"'{s}'" for s in SECTIONS) + "]")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><header><h1>{_e(title)}</h1><p>{_e(report.model_class)} · "
            f"{_e(recipe.description or recipe.method)}</p></header><main>" + "".join(parts)
            + f"</main><script>{script}</script></body></html>\n")


def _structure_section(report: "DebugReport", count: int, lo: float, hi: float) -> str:
    structure = report.structure
    if structure is None or not hasattr(structure, "norm_groups"):
        return '<p class="muted">The recipe ran no analyze_structure pass: no structure to draw.</p>'
    errors = {e.key: e for e in report.layers}
    layers = sorted({r.layer for r in (*structure.norm_groups, *structure.pairs, *structure.attentions)
                     if r.layer is not None})
    chosen: list[int | None] = []
    if layers:
        chosen.append(layers[0])
    worst = next((e for e in report.layers if not e.exact), None)
    if worst is not None and worst.layer not in chosen and (worst.layer in layers or worst.layer is None):
        chosen.append(worst.layer)
    if not layers and None not in chosen:
        chosen.append(None)
    out = [f'<p>{_e(", ".join(f"{k}={v}" for k, v in structure.counts().items() if v))}.</p>', _legend()]
    for layer in chosen[: max(1, count)]:
        what = "records outside numbered layers" if layer is None else f"layer {layer}"
        why = " (holds the worst linear)" if worst is not None and worst.layer == layer else ""
        if layer is not None and layers and layer == layers[0]:
            why += " (first layer)"
        out.append(f'<h3>{_e(what)}{_e(why)}</h3><div class="scroll">'
                   + svg_structure(structure, layer, report.structure_view, errors, lo, hi) + '</div>')
    out.append('<details><summary>full listing</summary><pre>' + _e(structure.render()) + '</pre></details>')
    return "".join(out)
