"""Training curves: metrics.jsonl read back as a resumed run left it, and drawn as panels of what it logged."""
import json

import pytest

from stepdistill.eval.curves import curve_panels, read_metrics, save_training_curves


def write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_read_metrics_keeps_the_resumed_record_and_skips_a_cut_line(tmp_path):
    """A run killed at step 30 after its step-20 checkpoint logs 30 again when resumed: the later record is the
    one the run went on from. A line cut short by the kill is skipped; a re-evaluation (`source`) is kept apart."""
    write(tmp_path / "metrics.jsonl", [
        {"step": 10, "kind": "train", "critic/loss": 1.0},
        {"step": 20, "kind": "train", "critic/loss": 0.9},
        {"step": 20, "kind": "eval", "student_fd": 3.0},
        {"step": 30, "kind": "train", "critic/loss": 5.0},          # lost with the kill
        {"step": 30, "kind": "train", "critic/loss": 0.8},          # the resumed run's
        {"step": 20, "kind": "eval", "student_fd": 2.5, "source": "stepdistill-eval"},
    ], tail='{"step": 40, "kind": "tr')
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["kind"]) for r in recs] == [(10, "train"), (20, "train"), (20, "eval"), (20, "eval"),
                                                      (30, "train")]
    assert recs[-1]["critic/loss"] == 0.8


def test_a_second_train_row_at_a_step_adds_to_its_losses(tmp_path):
    """The trainer adds a row at a logged step (`processes` at the end of a multi-process run, `stopped_by` on a
    stop signal): it replaced that step's losses in the curves and in stepdistill-compare's steps and seconds."""
    write(tmp_path / "metrics.jsonl", [
        {"step": 9, "kind": "train", "generator/loss": 1.0, "seconds": 1.8},
        {"step": 10, "kind": "train", "generator/loss": 0.5, "seconds": 2.0},
        {"step": 10, "kind": "train", "processes": 2, "weight_spread_across_processes": 0.0},
    ])
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert recs[-1] == {"step": 10, "kind": "train", "generator/loss": 0.5, "seconds": 2.0, "processes": 2,
                        "weight_spread_across_processes": 0.0}
    panels = {p.title: p for p in curve_panels(recs)}
    assert panels["generator losses"].series == {"loss": ([9, 10], [1.0, 0.5])}
    # two stepdistill-eval runs of one checkpoint are two evaluations: the second's keys do not mix with the first's
    write(tmp_path / "evals.jsonl", [
        {"step": 10, "kind": "eval", "source": "stepdistill-eval", "student_fd": 3.0, "teacher_fd": 9.0},
        {"step": 10, "kind": "eval", "source": "stepdistill-eval", "student_fd": 2.0},
    ])
    assert read_metrics(tmp_path / "evals.jsonl") == [{"step": 10, "kind": "eval", "source": "stepdistill-eval",
                                                       "student_fd": 2.0}]


def test_panels_hold_the_losses_norms_and_student_metrics():
    records = [
        {"step": 5, "kind": "train", "critic/loss": 1.0, "critic/loss_gan_d": 1.3, "critic/grad_norm": 2.0,
         "lr_generator": 1e-4, "seconds": 1.0},
        {"step": 10, "kind": "train", "critic/loss": 0.9, "generator/loss": 0.5, "generator/loss_dm": 0.2,
         "generator/grad_norm": "inf", "lr_generator": 1e-4, "seconds": 2.0},
        {"step": 10, "kind": "eval", "student_fd": 3.0, "student_fd_bootstrap_std": 0.2, "student_fd_num_samples": 100,
         "student_fd_bootstrap_resamples": 50, "student_pr_k": 3, "student_mode_std_ratio": "nan", "figure": "x.png"},
        {"step": 20, "kind": "eval", "student_fd": 2.0, "student_fd_bootstrap_std": 0.1, "teacher_fd": 1.5,
         "student_mode_std_ratio": 0.9},
        {"step": 20, "kind": "eval", "student_fd": 9.0, "source": "stepdistill-eval"},
    ]
    panels = {p.title: p for p in curve_panels(records)}
    assert list(panels) == ["critic losses", "generator losses", "gradient norm", "fd", "mode_std_ratio"]
    assert panels["critic losses"].series == {"loss": ([5, 10], [1.0, 0.9]), "loss_gan_d": ([5], [1.3])}
    assert panels["generator losses"].series == {"loss": ([10], [0.5]), "loss_dm": ([10], [0.2])}
    assert panels["gradient norm"].series == {"critic/grad_norm": ([5], [2.0])}   # a non-finite norm is not drawn
    fd = panels["fd"]
    assert fd.series == {"student": ([10, 20], [3.0, 2.0])} and fd.reference == 1.5
    assert fd.spread == {"student": [0.2, 0.1]} and fd.reference_label == "teacher"
    assert panels["mode_std_ratio"].series == {"student": ([20], [0.9])} and panels["mode_std_ratio"].reference is None


def test_evaluations_of_different_sample_counts_are_separate_series():
    """A final evaluation of more samples (eval.final_num_samples) than the periodic ones: an FD's bias depends on
    the count, so each count is its own line, and the teacher's line (from the final one) names its count."""
    records = [
        {"step": 10, "kind": "eval", "student_fd": 3.0, "student_fd_bootstrap_std": 0.3, "student_fd_num_samples": 1000},
        {"step": 20, "kind": "eval", "student_fd": 2.5, "student_fd_bootstrap_std": 0.3, "student_fd_num_samples": 1000},
        {"step": 30, "kind": "eval", "student_fd": 1.0, "student_fd_bootstrap_std": 0.1, "student_fd_num_samples": 5000,
         "teacher_fd": 0.7, "teacher_fd_num_samples": 5000},
    ]
    (fd,) = curve_panels(records)
    assert fd.series == {"student, 1000 samples": ([10, 20], [3.0, 2.5]), "student, 5000 samples": ([30], [1.0])}
    assert fd.spread == {"student, 1000 samples": [0.3, 0.3], "student, 5000 samples": [0.1]}
    assert fd.reference == 0.7 and fd.reference_label == "teacher, 5000 samples"


def test_curves_png_is_drawn_from_the_run_folder(tmp_path):
    assert save_training_curves(tmp_path) is None   # no metrics.jsonl yet
    write(tmp_path / "metrics.jsonl", [{"step": 1, "kind": "train", "seconds": 1.0}])
    assert save_training_curves(tmp_path) is None   # nothing to draw
    write(tmp_path / "metrics.jsonl", [{"step": s, "kind": "train", "generator/loss": 1 / s} for s in range(1, 40)])
    from PIL import Image
    with Image.open(save_training_curves(tmp_path)) as img:
        assert img.format == "PNG" and img.size == (288, 216)   # one panel, 3.6 x 2.7 inches at 80 dpi


def test_training_draws_its_curves(gmm_cfg, tmp_path, monkeypatch):
    """Every evaluation redraws RUN/curves.png and the end of the run draws it once more, unless the run ended in
    an evaluation; the CLI's summary names it. `logger.curves=false` draws nothing."""
    import stepdistill.eval.curves as curves
    from stepdistill.cli.train import summary, train
    drawn = []
    monkeypatch.setattr(curves, "save_training_curves",
                        lambda run_dir, save=curves.save_training_curves: drawn.append(run_dir) or save(run_dir))
    result = train(gmm_cfg("trainer.max_steps=6", "eval.every=3", "eval.num_samples=64", "eval.batch_size=64",
                           "logger.every=1", "logger.curves=true"), tmp_path / "on")
    assert (tmp_path / "on" / "curves.png").is_file() and drawn == [tmp_path / "on"] * 2   # at step 3, at the end
    assert f"curves:       {tmp_path / 'on' / 'curves.png'}" in summary(result)
    titles = [p.title for p in curve_panels(read_metrics(tmp_path / "on" / "metrics.jsonl"))]
    assert {"critic losses", "generator losses", "high_quality_fraction"} <= set(titles)
    # a run that ends in its final evaluation draws once at the end: the close has nothing new to draw
    train(gmm_cfg("trainer.max_steps=2", "eval.final=true", "eval.num_samples=64", "eval.batch_size=64",
                  "logger.curves=true"), tmp_path / "final")
    assert drawn[2:] == [tmp_path / "final"]
    result = train(gmm_cfg("trainer.max_steps=2", "logger.curves=false"), tmp_path / "off")
    assert not (tmp_path / "off" / "curves.png").exists() and "curves:" not in summary(result) and len(drawn) == 3


@pytest.mark.parametrize("bad", ["[1, 2]", "{\"kind\": \"train\"}"])
def test_records_without_a_step_are_ignored(tmp_path, bad):
    (tmp_path / "metrics.jsonl").write_text(bad + "\n" + json.dumps({"step": 1, "kind": "train", "g/loss": 1}) + "\n")
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_comparison_curves_put_each_run_on_each_metric(tmp_path, monkeypatch):
    """A panel per student metric, a line per run that measured it; losses are not compared."""
    from stepdistill.eval import curves
    runs = {"gmm dmd2": curve_panels([{"step": 5, "kind": "train", "generator/loss": 1.0},
                                      {"step": 5, "kind": "eval", "student_sliced_w2": 0.3, "student_mmd": 0.1}]),
            "gmm dmd": curve_panels([{"step": 5, "kind": "eval", "student_sliced_w2": 0.2}]),
            "gmm sid": [],
            # a larger final evaluation: one line per sample count
            "gmm sim": curve_panels([{"step": 5, "kind": "eval", "student_sliced_w2": 0.4, "student_num_samples": 100},
                                     {"step": 9, "kind": "eval", "student_sliced_w2": 0.1, "student_num_samples": 900}])}
    drawn = {}
    monkeypatch.setattr(curves, "draw_panels", lambda panels, out, **kw: drawn.update(out=out, panels=panels, **kw)
                        or str(out))
    assert curves.save_comparison_curves(tmp_path / "c.png", runs) == str(tmp_path / "c.png")
    assert drawn["shared_legend"]
    assert [(p.title, p.series) for p in drawn["panels"]] == [
        ("sliced_w2", {"gmm dmd2": ([5], [0.3]), "gmm dmd": ([5], [0.2]), "gmm sim, 100 samples": ([5], [0.4]),
                       "gmm sim, 900 samples": ([9], [0.1])}),
        ("mmd", {"gmm dmd2": ([5], [0.1])})]


def test_a_shared_legend_names_each_run_once_in_one_colour_everywhere(tmp_path, monkeypatch):
    """Comparison curves: a legend in every panel, of a sweep's long folder names, covered the curves. One legend
    under the panels names each series once, and a series has one colour (and style) in every panel, also where
    another panel lacks an earlier series."""
    from matplotlib.figure import Figure

    from stepdistill.eval.curves import Panel, draw_panels
    figures = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: figures.append(fig) or real_savefig(fig, *a, **kw))
    names = [f"digits dmd2 ({i}_method.critic_steps={i},trainer.max_steps=2000)" for i in range(12)]
    panels = [Panel("fd", {n: ([1, 2], [float(i), 1.0]) for i, n in enumerate(names)}),
              Panel("recall", {n: ([1, 2], [0.5, 0.6]) for n in names[5:]})]
    assert draw_panels(panels, tmp_path / "c.png", shared_legend=True) == str(tmp_path / "c.png")
    fig = figures[-1]
    assert all(ax.get_legend() is None for ax in fig.axes)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == names
    look = [{line.get_label(): (line.get_color(), line.get_linestyle()) for line in ax.get_lines()} for ax in fig.axes[:2]]
    assert all(look[1][n] == look[0][n] for n in names[5:])
    assert len(set(look[0].values())) == 12   # past the 10 colours, a new line style
