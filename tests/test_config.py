"""Configuration: types and ranges of every value, defaults per method and task family, help."""

import json
import subprocess
import sys

import pytest
import yaml

from fastadapt.cli import main
from fastadapt.config import resolve
from fastadapt.errors import ConfigError

FAST = ["--ways", "3", "--shots", "1", "--queries", "2", "--steps", "2", "--eval-episodes", "3",
        "--checkpoint-every", "1", "--no-progress"]


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_numbers_written_as_1e_3_are_numbers(tmp_path):
    # PyYAML reads "1e-3" (no dot) as a string.
    assert isinstance(yaml.safe_load("lr: 1e-3")["lr"], str)
    run = tmp_path / "run"
    assert main(["train", "protonet", "--config", write(tmp_path, "lr: 1e-3\n"), *FAST, "--out", str(run)]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 0.001


@pytest.mark.parametrize("text, message", [
    ("ways: five\n", "--ways must be a whole number >= 1, got 'five'"),
    ("steps: 2.5\n", "--steps must be a whole number >= 1, got 2.5"),
    ("lr: -1\n", "--lr must be a number > 0"),
    ("lr: .nan\n", "--lr must be a number > 0"),
    ("download: maybe\n", "--download must be true or false"),
    ("eval: {ways: 0}\n", "--eval-ways must be a whole number >= 1"),
    ("lr_decay: 2\n", "--lr-decay must be a number in (0, 1]"),
])
def test_bad_yaml_values_are_one_line_errors_naming_the_flag(tmp_path, capsys, text, message):
    assert main(["train", "protonet", "--config", write(tmp_path, text), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_method_options_are_typed_and_ranged():
    with pytest.raises(ConfigError, match="--inner-lr must be a number > 0"):
        resolve("maml", {"inner_lr": "fast"}, {})
    with pytest.raises(ConfigError, match="--batching must be one of auto, loop, vmap"):
        resolve("maml", {"batching": "gpu"}, {})
    with pytest.raises(ConfigError, match="--first-order must be true or false"):
        resolve("maml", {"first_order": "yes please"}, {})
    assert resolve("maml", {"inner_steps": 3.0}, {})["inner_steps"] == 3


@pytest.mark.parametrize("bad", [["--lr", "-1"], ["--steps", "-5"], ["--lr", "nan"], ["--inner-lr", "inf"]])
def test_a_refused_command_writes_nothing_and_never_blocks_the_corrected_one(tmp_path, monkeypatch, capsys, bad):
    monkeypatch.chdir(tmp_path)
    method = "maml" if bad[0] == "--inner-lr" else "protonet"
    argv = ["train", method, "--ways", "3", "--shots", "1", "--queries", "2", "--steps", "1", "--meta-batch", "1",
            "--eval-ways", "3", "--eval-episodes", "2", "--no-progress"]
    assert main([*argv, *bad]) == 2
    assert not (tmp_path / "runs").exists()
    assert main(argv) == 0, capsys.readouterr().err


def test_maml_eval_ways_above_training_ways_is_refused_before_training(tmp_path, capsys):
    assert main(["train", "maml", "--ways", "3", "--eval-ways", "5", "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "r")]) == 2
    assert "--eval-ways 5 is more than the 3 ways" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_folder_without_a_checkpoint_does_not_block_a_new_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: protonet\nlr: 0.5\n")  # left by an older, failed attempt
    assert main(["train", "protonet", *FAST, "--out", str(run)]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 0.001


def test_defaults_come_from_the_method_and_the_task_family():
    maml_sin = resolve("maml", {}, {"dataset": "sinusoid"})
    # Finn et al. (2017), sinusoid: inner lr 0.01, meta-batch 25, K = 10.
    assert (maml_sin["inner_lr"], maml_sin["meta_batch"], maml_sin["shots"]) == (0.01, 25, 10)
    maml_img = resolve("maml", {}, {})
    assert (maml_img["inner_lr"], maml_img["meta_batch"]) == (0.4, 32)
    # Only ProtoNet halves its rate every 2000 episodes; the others use a constant rate.
    assert resolve("protonet", {}, {})["lr_decay_every"] == 2000
    for method in ("maml", "fomaml", "anil", "metasgd", "reptile", "imaml", "pretrain"):
        assert resolve(method, {}, {})["lr_decay_every"] == 0, method
    # A preset or a flag still wins over the family's default.
    assert resolve("maml", {"inner_lr": 0.05}, {"dataset": "sinusoid"})["inner_lr"] == 0.05
    assert resolve("maml", {}, {"dataset": "sinusoid", "inner_lr": 0.02})["inner_lr"] == 0.02


@pytest.mark.parametrize("method", ["maml", "reptile", "imaml"])
def test_sinusoid_defaults_train_without_diverging(tmp_path, capsys, method):
    run = tmp_path / method
    assert main(["train", method, "--task", "sinusoid", "--steps", "30", "--eval-episodes", "20",
                 "--no-progress", "--out", str(run), "--log-every", "10"]) == 0
    out = capsys.readouterr()
    assert "diverg" not in out.err
    res = json.loads((run / "results.json").read_text())
    # Predicting 0 scores E[A^2]/2 = 4.3; the diverging defaults of before scored about 500.
    assert res["mse"] < 10.0, res


def _help(*argv):
    return subprocess.run([sys.executable, "-m", "fastadapt", *argv, "--help"], capture_output=True, text=True,
                          check=True).stdout


def test_help_is_per_method_with_the_real_defaults():
    maml = _help("train", "maml")
    proto = _help("train", "protonet")
    assert maml != proto
    flat = " ".join(maml.split())
    assert "--inner-lr" in maml and "--distance" not in maml
    assert "--distance" in proto and "--inner-lr" not in proto
    assert "(default 0.4; sinusoid: 0.01)" in flat
    assert "(default 32; sinusoid: 25)" in flat  # --meta-batch
    assert "(default 0.001)" in flat  # --lr: core options show their defaults too
    assert "(default 2000)" in " ".join(proto.split())  # ProtoNet's schedule, not MAML's
    assert "--threads" in maml
    ev = " ".join(_help("eval").split())
    assert "95%%" not in ev and "95% CI" in ev
    assert "--inner-lr INNER_LR (default: the run's value)" in ev
    assert "default 0.4" not in ev


def test_banner_shows_the_training_and_the_evaluation_setting(tmp_path, capsys):
    assert main(["train", "maml", "--ways", "3", "--shots", "1", "--queries", "2", "--steps", "1", "--meta-batch", "1",
                 "--eval-ways", "2", "--eval-shots", "2", "--eval-episodes", "2", "--no-progress",
                 "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "3-way 1-shot, 2 queries per class" in out and "batching loop" in out and " thread" in out
    assert "then testing on 2 episodes of unseen classes: 2-way 2-shot, 15 queries per class" in out
