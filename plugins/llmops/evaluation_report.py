"""The evaluation report: a ``llmops.comparison.Comparison`` rendered for the people who read it.

A plain-text table for task logs, a Markdown table for the approval form and MLflow descriptions, and a
self-contained HTML report with plots (``write_report``) for MLflow's artifact viewer.

It imports no Airflow, and matplotlib only inside the plotting functions.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmops.comparison import (
    METRICS,
    MODEL_ORDER,
    SUMMARY_ONLY,
    Comparison,
    Interval,
    direction,
    metric_spec,
    metric_value,
    model_of,
    ordered,
    rows_by_item,
    significant,
)

_MODEL_COLORS = {"base": "#8c8c8c", "candidate": "#1f77b4", "champion": "#ff7f0e"}
_EXTRA_COLORS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")


# --- tables -------------------------------------------------------------------------------------------------------


def _format(value: float | None, fmt: str, signed: bool = False) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if float(format(value, fmt)) == 0:
        value = 0.0  # no "-0.000"
    return format(value, ("+" if signed else "") + fmt)


def _format_interval(interval: Interval, fmt: str) -> str:
    return (
        f"{_format(interval.mean, fmt, True)} [{_format(interval.low, fmt, True)}, {_format(interval.high, fmt, True)}]"
    )


def _default_metrics(comparison: Comparison) -> list[str]:
    summary = comparison.models.get(comparison.candidate, {})
    chosen = [metric for metric in METRICS if metric in summary]
    return chosen + [metric for metric in ("perplexity", "latency_p95_s") if metric in summary]


def _better_word(metric: str) -> str:
    return {True: "higher", False: "lower", None: ""}[direction(metric)]


@dataclass(frozen=True)
class _Cell:
    text: str
    interval: Interval | None = None
    metric: str = ""


def _table(comparison: Comparison, metrics: list[str] | None) -> tuple[list[str], list[list[_Cell]]]:
    """The one table the text, Markdown and HTML renderings share: header and rows of cells."""
    metrics = _default_metrics(comparison) if metrics is None else list(metrics)
    for metric in metrics:
        metric_spec(metric)  # unknown metric: fail with the list of known ones
    labels = ordered(comparison.models, MODEL_ORDER)
    refs = ordered(comparison.deltas, MODEL_ORDER)
    header = ["Metric", "Better", *labels, *(f"cand-{ref}" for ref in refs)]
    body = [[_Cell("Items"), _Cell("")] + [_Cell(str(comparison.models[label].get("items", "-"))) for label in labels]]
    body[0] += [_Cell("") for _ in refs]
    for metric in metrics:
        spec = metric_spec(metric)
        row = [_Cell(spec.label), _Cell(_better_word(metric))]
        row += [_Cell(_format(comparison.models[label].get(metric), spec.fmt)) for label in labels]
        for ref in refs:
            interval = comparison.deltas[ref].get(metric)
            text = "" if interval is None else _format_interval(interval, spec.fmt)
            if significant(interval):
                text += " *"
            row.append(_Cell(text, interval, metric))
        body.append(row)
    return header, body


def _legend(comparison: Comparison) -> str:
    return (
        f"cand-REF: mean paired difference, candidate minus REF, over the items both have a score for "
        f"[{comparison.confidence:.0%} bootstrap CI]; * marks a CI that excludes 0 (over 2 or more items)."
    )


def comparison_table(comparison: Comparison, metrics: list[str] | None = None) -> str:
    """Fixed-width plain-text table for a terminal or a task log."""
    header, body = _table(comparison, metrics)
    lines = [header, *([cell.text for cell in row] for row in body)]
    widths = [max(len(line[col]) for line in lines) for col in range(len(header))]

    def render(line: list[str]) -> str:
        cells = [line[0].ljust(widths[0]), line[1].ljust(widths[1])]
        # Means align right like numbers; differences align left so the trailing " *" does not shift them.
        for col in range(2, len(line)):
            means = col < 2 + len(comparison.models)
            cells.append(line[col].rjust(widths[col]) if means else line[col].ljust(widths[col]))
        return "  ".join(cells).rstrip()

    out = [render(header), "  ".join("-" * width for width in widths)]
    out += [render(line) for line in lines[1:]]
    out.append(_legend(comparison))
    return "\n".join(out)


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|")


def markdown_summary(comparison: Comparison, metrics: list[str] | None = None) -> str:
    """The comparison table in Markdown, for an Airflow approval form body and MLflow descriptions."""
    header, body = _table(comparison, metrics)
    align = ["---", "---"] + ["---:"] * (len(header) - 2)
    lines = [
        "| " + " | ".join(_md_escape(text) for text in header) + " |",
        "| " + " | ".join(align) + " |",
    ]
    for row in body:
        cells = []
        for cell in row:
            # Bold a difference whose CI excludes 0 so it stands out in rendered Markdown, keep the "*" for raw text.
            if significant(cell.interval):
                cells.append(f"**{_md_escape(cell.text.removesuffix(' *'))}** \\*")
            else:
                cells.append(_md_escape(cell.text))
        lines.append("| " + " | ".join(cells) + " |")
    # Starts with a word: a line starting with "* " would render as a bullet.
    lines += ["", "Legend: " + _legend(comparison).replace("*", "\\*")]
    return "\n".join(lines)


# --- report -------------------------------------------------------------------------------------------------------


def _color(label: str, labels: list[str]) -> str:
    if label in _MODEL_COLORS:
        return _MODEL_COLORS[label]
    extra = [lab for lab in labels if lab not in _MODEL_COLORS]
    return _EXTRA_COLORS[extra.index(label) % len(_EXTRA_COLORS)] if label in extra else "#555555"


def _verdict(interval: Interval | None, metric: str) -> str:
    """'better', 'worse' or '' for a candidate-minus-reference difference (only when its CI excludes 0)."""
    if not significant(interval):
        return ""
    better = direction(metric)
    if better is None:
        return "changed"
    return "better" if (interval.mean > 0) == better else "worse"


def _plots(comparison: Comparison, rows: list[dict], plot_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    labels = ordered(comparison.models, MODEL_ORDER)
    drawings = {
        "metrics.png": lambda: _metrics_plot(comparison, labels),
        "differences.png": lambda: _differences_plot(comparison),
        # (3) and (4): spread, not just means - a mean hides a few collapsed answers or a slow tail.
        "judge_scores.png": lambda: _distribution_plot(
            rows, labels, "judge_overall", "judge overall score", "Judge overall score per item", True
        ),
        "latency.png": lambda: _distribution_plot(
            rows, labels, "latency_s", "latency per item (s)", "Generation latency per item", True
        ),
    }
    written: dict[str, Path] = {}
    for name, draw in drawings.items():
        fig = draw()
        if fig is None:
            continue
        path = plot_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written[name] = path
    for name in _CAPTIONS.keys() - written.keys():
        (plot_dir / name).unlink(missing_ok=True)  # no stale plot from an earlier report in the same folder
    return dict(sorted(written.items(), key=lambda item: list(_CAPTIONS).index(item[0])))


def _metrics_plot(comparison: Comparison, labels: list[str]):
    """(1) Key metrics on one 0-1 axis: the judge's 0-10 score is divided by 10 so the bars are comparable."""
    import matplotlib.pyplot as plt

    key = [
        metric
        for metric in ("rouge_l", "semantic_similarity", "exact_match", "judge_overall")
        if any(metric in comparison.models[label] for label in labels)
    ]
    if not key:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
    width = 0.8 / len(labels)
    positions = np.arange(len(key))
    for i, label in enumerate(labels):
        scale = [10.0 if metric == "judge_overall" else 1.0 for metric in key]
        heights = [comparison.models[label].get(metric, np.nan) / s for metric, s in zip(key, scale, strict=True)]
        offset = (i - (len(labels) - 1) / 2) * width
        bars = ax.bar(positions + offset, heights, width, label=label, color=_color(label, labels))
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    names = [METRICS[metric].label + (" ÷ 10" if metric == "judge_overall" else "") for metric in key]
    ax.set_xticks(positions, names)
    ax.set_ylabel("mean per model (0-1 scale)")
    ax.set_ylim(0, 1.12)
    ax.set_title("Key metrics, mean over items")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncols=len(labels), loc="upper left", frameon=False)
    return fig


def _differences_plot(comparison: Comparison):
    """(2) Forest plot. Metrics have very different scales (BLEU 0-100, latency in seconds), so each metric gets
    its own x axis, symmetric around 0: whiskers crossing the center line read "no difference" in every row."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    refs = ordered(comparison.deltas, MODEL_ORDER)
    forest = [metric for metric in METRICS if any(metric in comparison.deltas[ref] for ref in refs)]
    if not forest:
        return None
    fig, axes = plt.subplots(
        len(forest),
        len(refs),
        figsize=(4.2 * len(refs) + 2.6, 0.52 * len(forest) + 1.0),
        squeeze=False,
        layout="constrained",
    )
    palette = {"better": "#2ca02c", "worse": "#d62728", "changed": "#1f77b4", "": "#555555"}
    for row_index, metric in enumerate(forest):
        spec = METRICS[metric]
        for col, ref in enumerate(refs):
            ax = axes[row_index][col]
            ax.set_yticks([])
            ax.tick_params(axis="x", labelsize=7)
            if row_index == 0:
                ax.set_title(f"{comparison.candidate} − {ref}", fontsize=10)
            if col == 0:
                name = spec.label + (" (lower is better)" if spec.higher_is_better is False else "")
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
            interval = comparison.deltas[ref].get(metric)
            if interval is None:
                ax.set_xticks([])
                ax.text(0.5, 0.5, "no pairs", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                continue
            reach = max(abs(interval.low), abs(interval.high), abs(interval.mean)) * 1.25 or 1.0
            ax.set_xlim(-reach, reach)
            ax.set_ylim(-1, 1)
            ax.axvline(0, color="black", linewidth=0.8, linestyle="--")
            color = palette[_verdict(interval, metric)]
            ax.errorbar(
                [interval.mean],
                [0],
                xerr=[[interval.mean - interval.low], [interval.high - interval.mean]],
                fmt="o",
                color=color,
                capsize=3,
                markersize=5,
            )
            ax.xaxis.set_major_locator(MaxNLocator(5, symmetric=True))
    fig.suptitle(
        f"Paired difference, mean and {comparison.confidence:.0%} bootstrap CI "
        "(green: better, red: worse, grey: CI includes 0)",
        fontsize=10,
    )
    return fig


def _distribution_plot(rows: list[dict], labels: list[str], metric: str, ylabel: str, title: str, floor_at_zero: bool):
    import matplotlib.pyplot as plt

    data = {label: [] for label in labels}
    for i, row in enumerate(rows):
        label = model_of(row, i)
        value = metric_value(row, metric)
        if label in data and value is not None:
            data[label].append(value)
    shown = [label for label in labels if data[label]]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    positions = np.arange(1, len(shown) + 1)
    box = ax.boxplot([data[label] for label in shown], positions=positions, widths=0.5, showmeans=True)
    for median in box["medians"]:
        median.set_color("black")
    jitter = np.random.default_rng(0)  # fixed: the same rows give the same picture
    for pos, label in zip(positions, shown, strict=True):
        xs = pos + jitter.uniform(-0.12, 0.12, len(data[label]))
        ax.scatter(xs, data[label], s=10, alpha=0.45, color=_color(label, labels), zorder=3)
    ax.set_xticks(positions, [f"{label}\n(n={len(data[label])})" for label in shown])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if floor_at_zero:
        ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    return fig


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1d2330;
       margin: 0 auto; padding: 24px; max-width: 1150px; line-height: 1.45; background: #fff; }
h1 { font-size: 1.6em; margin: 0 0 12px; }
h2 { font-size: 1.2em; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #d8dde6; }
h3 { font-size: 1.02em; margin: 16px 0 6px; }
.banner { background: #eef4ff; border: 1px solid #b6cdf5; border-left: 6px solid #2f6fd6; border-radius: 4px;
          padding: 10px 14px; font-size: 1.1em; margin-bottom: 16px; }
.muted { color: #5f6b7a; font-size: 0.9em; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 0.9em; }
th, td { border: 1px solid #d8dde6; padding: 4px 9px; vertical-align: top; }
thead th { background: #f1f4f8; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.better { background: #e3f5e1; }
td.worse { background: #fbe3e1; }
td.changed { background: #e6eefb; }
th.group, td.group { border-left: 2px solid #9aa5b4; }
thead th.group[colspan] { text-align: center; }
li.pass { color: #1e7b2e; }
li.fail { color: #b42318; font-weight: 600; }
table.details th { text-align: left; background: #f7f8fa; font-weight: 600; white-space: nowrap; }
table.details td { word-break: break-all; }
ul.gate { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em; padding-left: 20px; }
figure { margin: 14px 0; }
figure img { max-width: 100%; border: 1px solid #e3e6ea; }
figcaption { color: #5f6b7a; font-size: 0.85em; }
.example { border: 1px solid #d8dde6; border-radius: 4px; padding: 8px 12px; margin: 12px 0; }
.example pre { white-space: pre-wrap; word-wrap: break-word; background: #f7f8fa; padding: 6px 8px; margin: 2px 0 8px;
               font-size: 0.85em; max-height: 260px; overflow: auto; }
.label { font-weight: 600; font-size: 0.85em; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _link_or_text(value: object) -> str:
    text = str(value)
    # Only http(s): a "javascript:" or "data:" value must stay inert text.
    if text.startswith(("http://", "https://")):
        return f'<a href="{_e(text)}" target="_blank" rel="noopener noreferrer">{_e(text)}</a>'
    return _e(text)


def _html_table(comparison: Comparison, metrics: list[str] | None) -> str:
    header, body = _table(comparison, metrics)
    head = "".join(f"<th>{_e(text)}</th>" for text in header)
    out = [f"<table><thead><tr>{head}</tr></thead><tbody>"]
    for row in body:
        cells = [f"<td>{_e(row[0].text)}</td>", f"<td>{_e(row[1].text)}</td>"]
        for cell in row[2:]:
            css = " ".join(filter(None, ["num", _verdict(cell.interval, cell.metric) if cell.interval else ""]))
            extra = f' <span class="muted">n={cell.interval.n}</span>' if cell.interval else ""
            cells.append(f'<td class="{css}">{_e(cell.text)}{extra}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _sets_table(by_set: dict[str, dict[str, dict[str, float]]]) -> str:
    """One table, a column group per set: the sets side by side show where a change comes from."""
    groups = [(name, ordered(per_model, MODEL_ORDER)) for name, per_model in by_set.items() if per_model]
    present = [
        metric
        for metric in [*METRICS, *SUMMARY_ONLY]
        if any(metric in by_set[name][label] for name, labels in groups for label in labels)
    ]
    top = '<th rowspan="2">Metric</th>' + "".join(
        f'<th colspan="{len(labels)}" class="group">{_e(name)}</th>' for name, labels in groups
    )
    sub = "".join(
        f'<th class="{"group" if i == 0 else ""}">{_e(label)}</th>'
        for _, labels in groups
        for i, label in enumerate(labels)
    )
    out = [f"<table><thead><tr>{top}</tr><tr>{sub}</tr></thead><tbody>"]

    def row(name: str, values: list[str]) -> str:
        cells = []
        index = 0
        for _, labels in groups:
            for i in range(len(labels)):
                cells.append(f'<td class="num{" group" if i == 0 else ""}">{_e(values[index])}</td>')
                index += 1
        return f"<tr><td>{_e(name)}</td>{''.join(cells)}</tr>"

    out.append(
        row("Items", [str(by_set[name][label].get("items", "-")) for name, labels in groups for label in labels])
    )
    for metric in present:
        spec = metric_spec(metric)
        values = [_format(by_set[name][label].get(metric), spec.fmt) for name, labels in groups for label in labels]
        out.append(row(spec.label, values))
    out.append("</tbody></table>")
    return "".join(out)


def _examples_html(comparison: Comparison, rows: list[dict], limit: int) -> str:
    """The items where the candidate lost most against base: what a reviewer should read before approving."""
    refs = ordered(comparison.deltas, MODEL_ORDER)
    if limit <= 0 or not refs:
        return ""
    ref = "base" if "base" in refs else refs[0]
    metric = next((m for m in ("judge_overall", "rouge_l") if m in comparison.deltas[ref]), None)
    if metric is None:
        return ""
    labels = ordered(comparison.models, MODEL_ORDER)
    by_model = {label: rows_by_item(rows, label) for label in labels}
    drops = []
    for item_id, cand_row in by_model[comparison.candidate].items():
        ref_row = by_model[ref].get(item_id)
        cand_value, ref_value = metric_value(cand_row, metric), metric_value(ref_row or {}, metric)
        if cand_value is not None and ref_value is not None and cand_value < ref_value:
            drops.append((cand_value - ref_value, item_id))
    drops.sort()
    spec = METRICS[metric]
    intro = (
        f"Up to {limit} items with the largest drop in {_e(spec.label)} ({_e(comparison.candidate)} minus "
        f"{_e(ref)}), worst first."
    )
    if not drops:
        return f'<h2>Largest regressions</h2><p class="muted">{intro} None: no item scored lower than {_e(ref)}.</p>'
    out = [f'<h2>Largest regressions</h2><p class="muted">{intro}</p>']
    for drop, item_id in drops[:limit]:
        first = by_model[comparison.candidate][item_id]
        meta = ", ".join(f"{key} {_e(first[key])}" for key in ("set", "kind") if first.get(key) is not None)
        out.append('<div class="example">')
        out.append(
            f'<h3>Item {_e(item_id)} <span class="muted">({meta}; {_e(spec.label)} {_e(comparison.candidate)} '
            f"− {_e(ref)}: {_e(_format(drop, spec.fmt, True))})</span></h3>"
        )
        out.append(f'<div class="label">Prompt</div><pre>{_e(first.get("prompt", ""))}</pre>')
        out.append(f'<div class="label">Reference</div><pre>{_e(first.get("reference", ""))}</pre>')
        for label in labels:
            row = by_model[label].get(item_id)
            if row is None:
                continue
            score = _format(metric_value(row, metric), spec.fmt)
            out.append(
                f'<div class="label">{_e(label)} <span class="muted">({_e(spec.label)} {_e(score)})</span></div>'
                f"<pre>{_e(row.get('response', ''))}</pre>"
            )
        out.append("</div>")
    return "".join(out)


_CAPTIONS = {
    "metrics.png": "Mean of the key metrics per model (judge overall divided by 10 to share the 0-1 axis).",
    "differences.png": "Candidate minus reference per metric, paired by item, with the bootstrap CI. "
    "Each row has its own scale, centered on 0.",
    "judge_scores.png": "Judge overall score per item and model (box: quartiles, line: median, triangle: mean).",
    "latency.png": "Generation latency per item and model.",
}


def write_report(
    comparison: Comparison,
    rows: list[dict],
    out_dir: str | Path,
    *,
    title: str,
    judge_label: str,
    details: dict[str, str] | None = None,
    gate_lines: list[str] | None = None,
    examples: int = 8,
) -> Path:
    """Write ``report.html`` (self-contained), ``plots/*.png`` and ``comparison.json`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(comparison.to_dict(), indent=2), encoding="utf-8")
    plots = _plots(comparison, rows, out / "plots")

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        # The judge decides what "better" means for half the metrics: name it where nobody can miss it.
        f'<div class="banner"><strong>Judge:</strong> {_e(judge_label)}</div>',
    ]
    if details:
        parts.append('<h2>Details</h2><table class="details"><tbody>')
        parts += [f"<tr><th>{_e(key)}</th><td>{_link_or_text(value)}</td></tr>" for key, value in details.items()]
        parts.append("</tbody></table>")
    if gate_lines:
        parts.append('<h2>Gate</h2><ul class="gate">')
        for line in gate_lines:
            # Colour a line that reads as a verdict; anything else stays plain.
            verdict = line.strip().split(" ", 1)[0].rstrip(":").lower()
            css = f' class="{verdict}"' if verdict in ("pass", "fail") else ""
            parts.append(f"<li{css}>{_e(line)}</li>")
        parts.append("</ul>")
    parts.append(f'<h2>Comparison</h2><p class="muted">Candidate: <strong>{_e(comparison.candidate)}</strong>. ')
    parts.append(
        f"{_e(_legend(comparison))} Green: significantly better, red: significantly worse (by the metric's "
        "direction).</p>"
    )
    parts.append(_html_table(comparison, None))
    if comparison.by_set:
        parts.append("<h2>By evaluation set</h2>")
        parts.append('<p class="muted">Mean per model over each set\'s items.</p>' + _sets_table(comparison.by_set))
    if plots:
        parts.append("<h2>Plots</h2>")
        for name, path in plots.items():
            # Embedded, not linked: MLflow shows the report in an iframe that cannot follow relative paths.
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            caption = _CAPTIONS.get(name, "")
            parts.append(
                f'<figure><img alt="{_e(name)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_e(caption)}</figcaption></figure>"
            )
    parts.append(_examples_html(comparison, rows, examples))
    parts.append("</body></html>")
    report = out / "report.html"
    report.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return report
