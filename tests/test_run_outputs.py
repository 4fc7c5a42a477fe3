"""What a training run leaves behind: metrics in one unit (percent) and a labelled learning curve."""

import json

import pytest

from fastadapt.cli import main
from fastadapt.engine import trainer


def train(run, method="protonet", *extra):
    argv = ["train", method, "--ways", "3", "--shots", "1", "--queries", "2", "--steps", "4", "--log-every", "1",
            "--val-every", "2", "--val-episodes", "4", "--eval-episodes", "6", "--no-progress", "--out", str(run),
            *extra]
    assert main(argv) == 0


@pytest.mark.parametrize("method, extra", [("protonet", ()), ("maml", ("--meta-batch", "2", "--eval-ways", "3"))])
def test_metrics_rows_give_training_and_validation_accuracy_in_percent(tmp_path, capsys, method, extra):
    train(tmp_path / "run", method, *extra)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all("accuracy" in r and "acc" not in r for r in rows)
    assert all(0.0 <= r["accuracy"] <= 100.0 for r in rows)
    # 3-way episodes: chance is 33 %, so a mean of at most 1 could only be a fraction
    assert sum(r["accuracy"] for r in rows) / len(rows) > 1.0
    val = [r["val_accuracy"] for r in rows if "val_accuracy" in r]
    assert len(val) == 2 and all(1.0 < v <= 100.0 for v in val)


def test_learning_curve_has_title_and_final_test_result(tmp_path, capsys):
    run = tmp_path / "run"
    train(run)
    res = json.loads((run / "results.json").read_text())
    fig = trainer.learning_curve_figure(run)
    assert fig._suptitle.get_text() == "protonet · builtin · 3-way 1-shot"
    acc_ax = fig.axes[1]
    assert acc_ax.get_ylabel() == "accuracy (%)"
    labels = [line.get_label() for line in acc_ax.get_lines()]
    want = f"test 5-way 1-shot: {res['accuracy']:.1f} ± {res['ci95']:.1f} %"
    assert labels == ["train accuracy", "val accuracy", want]
    test_line = acc_ax.get_lines()[2]
    assert list(test_line.get_ydata()) == [res["accuracy"]] * 2
    # the saved PNG was drawn after results.json was written
    assert (run / "learning_curve.png").stat().st_mtime_ns >= (run / "results.json").stat().st_mtime_ns


def test_learning_curve_of_a_regression_run(tmp_path, capsys):
    run = tmp_path / "sin"
    assert main(["train", "maml", "--task", "sinusoid", "--inner-lr", "0.01", "--meta-batch", "2", "--steps", "3",
                 "--log-every", "1", "--eval-episodes", "4", "--no-progress", "--out", str(run)]) == 0
    res = json.loads((run / "results.json").read_text())
    fig = trainer.learning_curve_figure(run)
    assert fig._suptitle.get_text() == "maml · sinusoid · 10-shot"
    assert fig.axes[1].get_lines()[-1].get_label().startswith(f"test 10-shot: mse {res['mse']:.4g}")
