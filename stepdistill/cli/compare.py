"""`stepdistill-compare runs=[D1,D2,...] out=DIR [num_samples=N] [seed=S]`: one table (and figure) over finished runs.

Each entry of `runs` is a run folder or a folder of run folders (a Hydra multirun sweep). Per run:
  * points benchmarks (gmm, gmm_unbalanced): the student is re-sampled (num_samples and seed, by default those of
    the run's final evaluation: eval.final_num_samples, else eval.num_samples, and eval.seed) and scored
    against the exact mixture: modes covered, per-mode mass error, HQ fraction, mode width, sliced W2
    (eval/gmm_metrics.py); the figure shows every student's samples over its mixture's density contours, one
    row per benchmark.
  * image benchmarks: the run's latest evaluation at its own sampling (`run_evaluation`): the student's FD and the
    teacher's (same samples), their ratio, and the student's precision and recall where the benchmark measures
    them (digits). That is the training's last (final) evaluation, or a later `stepdistill-eval` of the run at its
    trained step count; never an evaluation at another step count (`stepdistill-eval steps=K`) or of each step
    along the chain (`every_step=true`), which stepdistill-eval also appends to metrics.jsonl. Which one each row
    shows is printed below the table (and written under it in comparison.md). num_samples= and seed= do not
    apply to them: a note says so, and `stepdistill-eval run_dir=D eval.num_samples=N eval.seed=S` re-scores one.
Every row also gives the run's training time (seconds of the last logged train step) and its step count.
Writes DIR/comparison.md, DIR/comparison.json, (points benchmarks) DIR/comparison.png and, where the runs evaluated
during training, DIR/comparison_curves.png (each student metric against the step, one line per run), and prints
the table.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ..benchmarks.registry import POINTS_BENCHMARKS
from ..checks import at_least, make_folder, or_default
from . import CONF_DIR, checked_groups, first_set, set_threads, user_errors

POINT_COLUMNS = ("modes_covered", "mode_mass_error", "high_quality_fraction", "mode_std_ratio", "sliced_w2")
IMAGE_COLUMNS = ("fd", "teacher_fd", "fd_ratio", "precision", "recall", "latent_fd", "teacher_latent_fd",
                 "latent_fd_ratio", "fid", "clip_score")
FD_COUNTS = ("student_fd_num_samples", "student_latent_fd_num_samples")   # digits', text-to-image's


def fd_count(evaluation: dict):
    """The sample count of an image evaluation's FD (digits' or text-to-image's latent FD), or None."""
    return next((evaluation[k] for k in FD_COUNTS if k in evaluation), None)


def find_runs(entries) -> list[Path]:
    runs = []
    for entry in entries:
        path = Path(entry)
        if (path / "config.yaml").is_file():
            runs.append(path)
            continue
        found = sorted(p.parent for p in path.glob("*/config.yaml"))
        if not found:
            raise FileNotFoundError(f"{path} is neither a run folder (config.yaml) nor a folder of run folders")
        runs.extend(found)
    return runs


def trained_steps(cfg) -> int:
    """The student's trained step count (a run's generator.timesteps, when set, has as many entries: build_roles
    refuses any other)."""
    return int(cfg.generator.get("steps", 1))


def run_label(cfg) -> str:
    """What distinguishes runs in a comparison: the method, fdistill's divergence, a multi-step student."""
    label = str(cfg.method.name)
    if cfg.method.get("divergence"):
        label += f"({cfg.method.divergence})"
    steps = trained_steps(cfg)
    return label + (f" {steps}-step" if steps > 1 else "")


def at_own_sampling(rec: dict, steps: int | None) -> bool:
    """An evaluation of the run's samples at its trained step count: the training's own (no `source`), or
    stepdistill-eval's without steps=K or with the trained K (`student_steps`). Not stepdistill-eval's
    `every_step` records (each step's output along the chain, no `student_fd`) or its other step counts
    (source "stepdistill-eval steps=K")."""
    if rec.get("kind") != "eval":
        return False
    if "source" not in rec:
        return True
    if rec["source"] != "stepdistill-eval":
        return False
    k = rec.get("student_steps")   # none: the trained count (written so before stepdistill-eval recorded it always)
    return k is None or steps is None or int(k) == steps


def run_evaluation(records: list[dict], steps: int | None = None) -> dict:
    """The evaluation a comparison shows: of those at the run's own sampling (`at_own_sampling`), the one at the
    latest step; at one step, the training's (its final one, e.g. of eval.final_num_samples) before
    stepdistill-eval's (maybe of fewer samples or other eval.* settings). {} when there is none."""
    best: dict = {}
    for rec in records:
        if at_own_sampling(rec, steps) and (not best or (rec["step"], "source" not in rec)
                                            >= (best["step"], "source" not in best)):
            best = rec
    return best


def describe_evaluation(evaluation: dict, steps: int) -> str:
    """Which evaluation a row shows, in words."""
    if not evaluation:
        return "no evaluation logged"
    who = "the training's evaluation" if "source" not in evaluation else "stepdistill-eval"
    n = fd_count(evaluation)
    return (f"{who} at step {evaluation['step']}, {steps}-step sampling" + (f", {n} samples" if n else "")
            + (f" ({' '.join(evaluation['eval_overrides'])})" if evaluation.get("eval_overrides") else ""))


def logged(records: list[dict], steps: int | None = None) -> tuple[dict, dict]:
    """The last train record (its `seconds` the training time over every session of a resumed run: each session
    counts from its own start), and the evaluation at the run's own sampling (`run_evaluation`) of a run's metrics;
    `steps`: the run's trained step count (None: any stepdistill-eval record without every_step counts)."""
    train, before = {}, 0.0
    for rec in records:
        if rec.get("kind") == "train" and isinstance(rec.get("seconds"), (int, float)):
            if train and rec["seconds"] < train["seconds"]:   # a resumed session's clock started again
                before += train["seconds"]
            train = rec
    if train:
        train = {**train, "seconds": before + train["seconds"]}
    return train, run_evaluation(records, steps)


def metric(value) -> float | None:
    """A logged metric as a float: metrics.jsonl writes a non-finite one as a string ("nan"), which the ratios
    below divided by."""
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def compare_run(run_dir: Path, records: list[dict], num_samples: int | None,
                seed: int | None) -> tuple[dict, object, str | None]:
    """One table row; the re-drawn student samples for points benchmarks (else None); for image benchmarks, which
    logged evaluation the row's metrics come from (else None)."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    steps = trained_steps(cfg)
    train, evaluation = logged(records, steps)
    # the steps trained: the last train row's (a run stopped early, by the non-finite guard or a signal, did not
    # reach trainer.max_steps)
    row = {"benchmark": str(cfg.benchmark.name), "method": run_label(cfg), "run": run_dir.name,
           "run_dir": str(run_dir), "train_steps": train.get("step"), "train_seconds": train.get("seconds")}
    if cfg.benchmark.name in POINTS_BENCHMARKS:
        from ..eval.gmm_metrics import gmm_metrics
        from ..train.checkpoint import latest_checkpoint
        from .sample import sample_student
        if latest_checkpoint(run_dir / "checkpoints") is None:   # a job that failed before its first save
            return row, None, "no checkpoint: the run stopped before its first save"
        # the final evaluation's count: eval.final_num_samples where the run set one
        n = int(first_set(num_samples, cfg.eval.get("final_num_samples"), cfg.eval.num_samples))
        seed = int(or_default(seed, cfg.eval.seed))
        samples, _ = sample_student(run_dir, n, seed=seed)
        mixture = _mixture(cfg)
        metrics = gmm_metrics(samples, mixture)   # its exact reference draws as the run's own evaluations
        row.update({k: metrics[k] for k in POINT_COLUMNS}, num_samples=n)
        return row, (samples, mixture), None
    row["fd"], row["teacher_fd"] = metric(evaluation.get("student_fd")), metric(evaluation.get("teacher_fd"))
    if row.get("fd") is not None and row.get("teacher_fd"):
        row["fd_ratio"] = row["fd"] / row["teacher_fd"]
    for key in ("precision", "recall", "latent_fd", "fid", "clip_score"):   # text-to-image: latent FD, FID, CLIP
        if f"student_{key}" in evaluation:
            row[key] = metric(evaluation[f"student_{key}"])
    if evaluation.get("teacher_latent_fd") is not None:   # text-to-image's FD, against the teacher's as digits'
        row["teacher_latent_fd"] = metric(evaluation["teacher_latent_fd"])
        if row.get("latent_fd") is not None and row["teacher_latent_fd"]:
            row["latent_fd_ratio"] = row["latent_fd"] / row["teacher_latent_fd"]
    row["num_samples"] = fd_count(evaluation)
    return row, None, describe_evaluation(evaluation, steps)


def evaluation_notes(rows: list[dict], evaluations: dict) -> list[str]:
    """One line per image row (and per run without a checkpoint): where its metrics come from."""
    return [f"{r['benchmark']} {r['method']} ({r['run_dir']}): {evaluations[r['run_dir']]}"
            for r in rows if r["run_dir"] in evaluations]


def _mixture(cfg):
    from ..networks.gmm import GaussianMixture
    m = cfg.benchmark.mixture
    return GaussianMixture(m.means, m.stds, m.weights)


def markdown_table(rows: list[dict]) -> str:
    cols = ["benchmark", "method", "run", "train_steps", "train_seconds", "num_samples"]
    extra = [c for c in (*POINT_COLUMNS, *IMAGE_COLUMNS) if any(c in r for r in rows)]
    cols += extra

    def fmt(v):
        if v is None:
            return "–"
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def curve_labels(runs: list[tuple[str, Path]]) -> list[str]:
    """One distinct legend label per run: "benchmark method", then with the run's folder name where runs of one
    method share it (a sweep over a setting), then with its path where folder names repeat too (two sweeps' jobs
    of one name: one run's curves were dropped)."""
    labels = [label for label, _ in runs]
    named = [label if labels.count(label) == 1 else f"{label} ({d.name})" for label, d in runs]
    return [n if named.count(n) == 1 else f"{label} ({d})" for n, (label, d) in zip(named, runs)]


def sampling_note(rows: list[dict], num_samples: int | None, seed: int | None) -> list[str]:
    """A line when num_samples= or seed= was given and some rows are logged image evaluations, which they do not
    change (they were silently unused)."""
    given = [f"{k}={v}" for k, v in (("num_samples", num_samples), ("seed", seed)) if v is not None]
    images = [r for r in rows if r["benchmark"] not in POINTS_BENCHMARKS]
    if not (given and images):
        return []
    return [f"{' and '.join(given)} re-sample the gmm runs only; the {len(images)} image row(s) show logged "
            "evaluations: `stepdistill-eval run_dir=D eval.num_samples=N eval.seed=S` re-scores a run"]


def compare(entries, out, num_samples: int | None = None, seed: int | None = None) -> dict:
    from ..eval.curves import curve_panels, run_records, save_comparison_curves
    from ..eval.grids import save_gmm_scatter_grid
    out = make_folder(out, "out")
    rows, panels, run_curves, evaluations = [], {}, [], {}
    for run_dir in find_runs(entries):
        records = run_records(run_dir)   # a resumed run's re-logged steps, a line cut by a kill: read_metrics
        row, drawn, source = compare_run(run_dir, records, num_samples, seed)
        rows.append(row)
        if source is not None:   # an image row (its metrics are a logged evaluation's), or a run without a checkpoint
            evaluations[row["run_dir"]] = source
        run_curves.append((f"{row['benchmark']} {row['method']}", run_dir, curve_panels(records)))
        if drawn is not None:
            samples, mixture = drawn
            title = (f"{row['method']} ({row['run']}): {row['modes_covered']}/{mixture.means.shape[0]}, "
                     f"HQ {row['high_quality_fraction']:.2f}")
            panels.setdefault(row["benchmark"], (mixture, []))[1].append((title, samples))
    rows.sort(key=lambda r: (r["benchmark"], r["method"]))
    table = markdown_table(rows)
    notes = evaluation_notes(rows, evaluations) + sampling_note(rows, num_samples, seed)
    (out / "comparison.md").write_text(table + "\n" + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else ""))
    # NaN (a mode width with no mode covered, a diverged student's FD) as null: JSON has no NaN
    finite = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]
    (out / "comparison.json").write_text(json.dumps(finite, indent=2, allow_nan=False))
    result = {"table": table, "rows": rows, "markdown": str(out / "comparison.md"), "evaluations": notes}
    curves = dict(zip(curve_labels([(label, run_dir) for label, run_dir, _ in run_curves]),
                      (run_panels for _, _, run_panels in run_curves)))
    if figure := save_comparison_curves(out / "comparison_curves.png", curves):
        result["curves"] = figure
    if panels:
        names = sorted(panels)
        result["figure"] = save_gmm_scatter_grid(out / "comparison.png", [panels[n][1] for n in names],
                                                 [panels[n][0] for n in names], row_labels=names)
    return result


@checked_groups("stepdistill-compare", "compare")
@hydra.main(version_base=None, config_path=CONF_DIR, config_name="compare")
@user_errors("stepdistill-compare")
def main(cfg: DictConfig) -> None:
    if not cfg.get("runs"):   # the input first, before torch loads (set_threads)
        raise ValueError("give runs=[DIR,...] (run folders or sweep folders) and out=DIR")
    runs = [cfg.runs] if isinstance(cfg.runs, str) else list(cfg.runs)
    n = cfg.get("num_samples")
    n = None if n is None else at_least("num_samples", n, 2)
    set_threads(cfg.get("num_threads"))
    seed = cfg.get("seed")
    result = compare(runs, cfg.out, n, None if seed is None else at_least("seed", seed, 0))
    print(result["table"])
    if result["evaluations"]:
        print("\nmetrics from:\n" + "\n".join(f"  {n}" for n in result["evaluations"]))
    print(f"\ntable: {result['markdown']}" + (f"\nfigure: {result['figure']}" if "figure" in result else "")
          + (f"\ncurves: {result['curves']}" if "curves" in result else ""))


if __name__ == "__main__":
    main()
