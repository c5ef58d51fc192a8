"""Training curves: a run's metrics.jsonl drawn as one PNG, so its progress is a look rather than a read of JSON
lines, whichever logger ran (metrics.jsonl is always written).

Panels, in this order: each role's losses (``generator/loss*``, ``critic/loss*``), the gradient norms, then one
panel per evaluation metric of the student (``student_*``), with the teacher's value on the same noise as a dashed
line and the bootstrap spread as error bars where the evaluation has them. Sample counts, figures and other
bookkeeping are not drawn.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SKIP_TRAIN = ("step", "kind", "seconds", "lr_generator", "stopped_by", "processes", "weight_spread_across_processes")
BOOKKEEPING = ("num_", "resamples", "pr_k")   # in an evaluation key: the counts behind a metric, not a metric


@dataclass
class Panel:
    title: str
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    reference: float | None = None          # the teacher's value of an evaluation metric
    reference_label: str = "teacher"
    spread: dict[str, list[float]] | None = None   # bootstrap std per point, per series that has it


def read_metrics(path) -> list[dict]:
    """The records of metrics.jsonl in step order, one per (kind, step, source). A resumed run logs again the steps
    after its checkpoint, and the later record is the one the run went on from (the trainer drops the crashed run's
    rows after the checkpoint first). Train rows of one step are merged, later values winning: the trainer adds a
    second row at a step that has one (`processes`, `stopped_by`), which replaced its losses. Evaluations stay
    whole (a second stepdistill-eval of one checkpoint replaces the first: its settings may differ). A line cut
    short by a kill is skipped."""
    records: dict = {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            key = (rec.get("kind"), rec["step"], rec.get("source"))
            records[key] = {**records.get(key, {}), **rec} if rec.get("kind") == "train" else rec
    return sorted(records.values(), key=lambda r: r["step"])


def _number(v) -> float | None:
    """A finite float, else None (metrics.jsonl writes non-finite values as strings such as "nan")."""
    if isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _add(series: dict, name: str, step: int, value) -> None:
    x = _number(value)
    if x is not None:
        steps, values = series.setdefault(name, ([], []))
        steps.append(step)
        values.append(x)


def _sample_count(record: dict, who: str) -> int | None:
    """The number of samples behind an evaluation record's `who` (student or teacher) metrics: every metric of
    one evaluation scores the same samples."""
    for key, value in record.items():
        if key.startswith(f"{who}_") and key.endswith("num_samples") and (x := _number(value)) is not None:
            return int(x)
    return None


def curve_panels(records: list[dict]) -> list[Panel]:
    """What `save_training_curves` draws, as data: the panels of `read_metrics`'s records."""
    losses: dict[str, Panel] = {}
    grads = Panel("gradient norm")
    for r in records:
        if r.get("kind") != "train":
            continue
        for key, value in r.items():
            if key in SKIP_TRAIN:
                continue
            role, _, name = key.rpartition("/")
            if name.endswith("grad_norm"):
                _add(grads.series, key, r["step"], value)
            elif "loss" in name:
                _add(losses.setdefault(role, Panel(f"{role or 'train'} losses")).series, name, r["step"], value)
    evals: dict[str, Panel] = {}
    spreads: dict[tuple[str, str], dict[int, float]] = {}
    # the training's own evaluations: `stepdistill-eval` records (a `source`) may change steps or settings
    evaluations = [(r, _sample_count(r, "student")) for r in records if r.get("kind") == "eval" and "source" not in r]
    # an FD's bias depends on its sample count: evaluations of different counts (a larger final one,
    # eval.final_num_samples) are separate series, and the teacher's line says its count
    counts = {n for _, n in evaluations if n is not None}
    for r, n in evaluations:
        series = f"student, {n} samples" if len(counts) > 1 and n is not None else "student"
        for key, value in r.items():
            if not key.startswith("student_") or any(b in key for b in BOOKKEEPING):
                continue
            metric = key[len("student_"):]
            if metric.endswith("_bootstrap_std"):
                if (x := _number(value)) is not None:
                    spreads.setdefault((metric[:-len("_bootstrap_std")], series), {})[r["step"]] = x
                continue
            panel = evals.setdefault(metric, Panel(metric))
            _add(panel.series, series, r["step"], value)
            teacher = _number(r.get(f"teacher_{metric}"))
            if teacher is not None:
                panel.reference = teacher
                if len(counts) > 1:
                    panel.reference_label = f"teacher, {_sample_count(r, 'teacher')} samples"
    for (metric, series), by_step in spreads.items():
        panel = evals.get(metric)
        if panel is not None and series in panel.series:
            panel.spread = panel.spread or {}
            panel.spread[series] = [by_step.get(s, 0.0) for s in panel.series[series][0]]
    panels = [p for p in (*losses.values(), grads) if p.series]
    return panels + [p for p in evals.values() if p.series]


def run_records(run_dir) -> list[dict]:
    """RUN/metrics.jsonl as `read_metrics` reads it; none before the run has logged anything."""
    source = Path(run_dir) / "metrics.jsonl"
    return read_metrics(source) if source.is_file() else []


def save_training_curves(run_dir, path=None) -> str | None:
    """Draw RUN/metrics.jsonl into RUN/curves.png (or `path`); None when there is nothing to draw yet."""
    return draw_panels(curve_panels(run_records(run_dir)), Path(path) if path else Path(run_dir) / "curves.png")


def save_comparison_curves(path, runs: dict[str, list[Panel]]) -> str | None:
    """One panel per student metric, one line per run (`runs`: label -> its `curve_panels`): how each run got to
    the figures of a comparison table. Losses are left out (each method's are on its own scale)."""
    merged: dict[str, Panel] = {}
    for label, panels in runs.items():
        for p in panels:
            for name, points in p.series.items():   # "student", or "student, N samples" per sample count
                if name == "student" or name.startswith("student, "):
                    merged.setdefault(p.title, Panel(p.title)).series[label + name[len("student"):]] = points
    # one legend under the panels, one colour per run in every panel: a legend in each panel of a sweep's long
    # folder names covered its curves
    return draw_panels(list(merged.values()), Path(path), shared_legend=True)


LEGEND_ROW_INCHES = 0.18


def draw_panels(panels: list[Panel], out: Path, cols: int = 4, shared_legend: bool = False) -> str | None:
    """`shared_legend`: each series keeps one colour across the panels and is named once, under them."""
    from matplotlib.figure import Figure

    if not panels:
        return None
    cols = min(cols, len(panels))
    rows = math.ceil(len(panels) / cols)
    names = list(dict.fromkeys(name for p in panels for name in p.series)) if shared_legend else []
    # one colour per series, and past ten colours another line style
    looks = {name: {"color": f"C{i % 10}", "ls": ("-", ":", "-.", "--")[i // 10 % 4]} for i, name in enumerate(names)}
    legend_h = (len(names) + 1) * LEGEND_ROW_INCHES if names else 0.0
    width, height = 3.6 * cols, 2.7 * rows + legend_h
    fig = Figure(figsize=(width, height), dpi=80)
    # margins fixed in inches, not a constrained layout: measuring every tick label to place the panels took half
    # of the ~0.8 s a 10-panel figure costs, and training redraws it at every evaluation
    gap_w, gap_h = 0.75, 0.75   # room for a panel's y tick labels, and for its x label and the next title
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, bottom=(0.5 + legend_h) / height,
                        top=1 - 0.3 / height, wspace=gap_w / (3.6 - gap_w), hspace=gap_h / (2.7 - gap_h))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    handles: dict = {}
    for ax, panel in zip(axes, panels):
        for name, (steps, values) in panel.series.items():
            marker = "o" if len(steps) < 30 else None   # evaluations are few: show where they were taken
            style = looks.get(name, {})
            if panel.spread and name in panel.spread:
                line = ax.errorbar(steps, values, yerr=panel.spread[name], marker=marker, ms=3, capsize=2, label=name,
                                   **style)
            else:
                line = ax.plot(steps, values, marker=marker, ms=3, lw=1, label=name, **style)[0]
            handles.setdefault(name, line)
        if panel.reference is not None:
            ax.axhline(panel.reference, color="k", ls="--", lw=1, label=panel.reference_label)
        ax.set_title(panel.title, fontsize="medium")
        ax.set_xlabel("step", fontsize="small")
        ax.tick_params(labelsize="small")
        if not shared_legend and (len(panel.series) > 1 or panel.reference is not None):
            ax.legend(fontsize="x-small")
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    if names:   # one name per row, left-aligned under the panels, however long a sweep's folder names are
        fig.legend([handles[n] for n in names], names, loc="lower left", bbox_to_anchor=(0.1 / width, 0.05 / height),
                   fontsize="small", frameon=False, borderaxespad=0, labelspacing=0.25, handlelength=2.5)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=80)
    return str(out)


__all__ = ["Panel", "read_metrics", "run_records", "curve_panels", "save_training_curves", "save_comparison_curves"]
