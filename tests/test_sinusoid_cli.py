"""The sinusoid task family and the command line of the optimization-based methods."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastadapt.cli import main
from fastadapt.errors import ConfigError
from fastadapt.registry import DATASETS
from fastadapt.tasks import SinusoidTasks


def test_sinusoid_tasks_follow_the_paper_distribution():
    src = DATASETS.get("sinusoid")({}, "train", 5, 10, 20)
    assert src.kind == "regression" and src.in_shape == (1,)
    b = src.sample_batch(torch.Generator().manual_seed(0), 200)
    assert b.support_x.shape == (200, 10, 1) and b.query_y.shape == (200, 20, 1) and b.batched
    x = torch.cat([b.support_x, b.query_x], 1).double()
    y = torch.cat([b.support_y, b.query_y], 1).double()
    assert float(x.min()) >= -5 and float(x.max()) <= 5
    # y = a sin x + c cos x per task: recover amplitude sqrt(a^2 + c^2) and phase by least squares.
    basis = torch.cat([torch.sin(x), torch.cos(x)], -1)
    coef = torch.linalg.lstsq(basis, y).solution[..., 0]
    torch.testing.assert_close(basis @ coef[..., None], y, rtol=1e-4, atol=1e-4)  # one curve per task
    amp = coef.norm(dim=-1)
    phase = torch.atan2(-coef[:, 1], coef[:, 0])  # A sin(x - p) = A cos p sin x - A sin p cos x
    assert 0.1 - 1e-4 <= float(amp.min()) and float(amp.max()) <= 5 + 1e-4
    assert -1e-4 <= float(phase.min()) and float(phase.max()) <= math.pi + 1e-4
    ep = src.sample(torch.Generator().manual_seed(1))
    assert not ep.batched and ep.support_y.shape == (10, 1)
    with pytest.raises(ConfigError, match="--shots"):
        SinusoidTasks(0, 5)


def test_cli_trains_and_evaluates_maml_on_sinusoid(tmp_path, capsys):
    run = tmp_path / "maml-sin"
    assert main(["train", "maml", "--task", "sinusoid", "--inner-lr", "0.01", "--meta-batch", "4", "--steps", "3",
                 "--eval-episodes", "5", "--out", str(run), "--no-progress"]) == 0
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--inner-steps", "2", "--episodes", "4", "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["mse"] > 0 and res["ci95"] >= 0 and res["episodes"] == 4 and "adapt_ms" in res


@pytest.mark.parametrize("method, extra", [
    ("maml", ["--inner-steps", "1", "--inner-lr", "0.4", "--batching", "vmap"]),
    ("fomaml", ["--batching", "loop"]), ("anil", ["--batching", "loop"]), ("metasgd", ["--batching", "loop"]),
    ("reptile", ["--inner-steps", "2", "--batching", "loop"]),
    ("imaml", ["--inner-steps", "2", "--cg-steps", "2", "--batching", "loop"]),
])
def test_cli_trains_and_evaluates_every_method_on_images(tmp_path, method, extra):
    run = tmp_path / method
    assert main(["train", method, "--dataset", "builtin", "--image-size", "16", "--ways", "3", "--shots", "1", "--queries", "2",
                 "--meta-batch", "2", "--steps", "2", "--eval-ways", "3", "--eval-episodes", "3",
                 "--out", str(run), "--no-progress", *extra]) == 0
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--inner-steps", "3", "--episodes", "3", "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert 0 <= res["accuracy"] <= 100 and "ci95" in res


@pytest.mark.parametrize("flags, message", [
    (["--inner-steps", "0"], "--inner-steps"), (["--inner-lr", "-1"], "--inner-lr"),
    (["--inner-lr", "nan"], "--inner-lr"),
])
def test_cli_rejects_bad_inner_loop_options(tmp_path, capsys, flags, message):
    assert main(["train", "maml", "--task", "sinusoid", "--steps", "1", "--out", str(tmp_path / "r"),
                 "--no-progress", *flags]) == 2
    assert message in capsys.readouterr().err
