import json
import subprocess
import sys

import pytest

from fastadapt.cli import main



def fast(steps: int = 4) -> list[str]:
    return ["--ways", "3", "--shots", "1", "--queries", "2", "--steps", str(steps), "--eval-episodes", "5",
            "--log-every", "2", "--checkpoint-every", "2", "--no-progress"]


FAST = fast()


def test_train_then_eval_writes_outputs_and_json(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "protonet", *FAST, "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "accuracy:" in out and "%" in out and "meta-training: 4 iterations" in out
    for name in ("config.yaml", "checkpoint.pt", "metrics.jsonl", "learning_curve.png", "results.json"):
        assert (run / name).is_file(), name
    js = tmp_path / "eval.json"
    assert main(["eval", str(run), "--ways", "4", "--shots", "2", "--queries", "3", "--episodes", "7",
                 "--json", str(js), "--no-progress"]) == 0
    res = json.loads(js.read_text())
    for key in ("accuracy", "ci95", "ways", "shots", "episodes", "adapt_ms", "peak_mem_mb", "meta_train_seconds"):
        assert key in res, key
    assert (res["ways"], res["shots"], res["episodes"]) == (4, 2, 7)
    assert 0 <= res["accuracy"] <= 100
    assert "accuracy:" in capsys.readouterr().out


def test_same_seed_same_result(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["train", "protonet", *FAST, "--out", str(tmp_path / name)]) == 0
    ra = json.loads((tmp_path / "a" / "results.json").read_text())
    rb = json.loads((tmp_path / "b" / "results.json").read_text())
    assert (ra["accuracy"], ra["ci95"]) == (rb["accuracy"], rb["ci95"])


def test_rerunning_resumes_and_refuses_a_different_config(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "protonet", *FAST, "--out", str(run)]) == 0
    assert main(["train", "protonet", *fast(6), "--out", str(run)]) == 0
    assert "resuming" in capsys.readouterr().out
    assert main(["train", "protonet", *FAST, "--lr", "0.5", "--out", str(run)]) == 2
    assert "holds a run with lr=0.001" in capsys.readouterr().err


def test_config_file_and_flag_precedence(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ways: 4\nshots: 1\nqueries: 2\nsteps: 2\neval: {episodes: 3, ways: 3}\n")
    run = tmp_path / "run"
    assert main(["train", "protonet", "--config", str(cfg), "--ways", "3", "--no-progress", "--out", str(run)]) == 0
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["ways"] == 3 and saved["steps"] == 2 and saved["eval"]["episodes"] == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("wayz: 3\n")
    assert main(["train", "protonet", "--config", str(bad)]) == 2
    assert "unknown keys ['wayz']" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "nomethod"], "unknown method 'nomethod'; known methods: "),
    (["train", "protonet", "--dataset", "nodata", "--no-progress"], "unknown dataset 'nodata'"),
    (["train", "protonet", "--ways", "1200", "--no-progress"], "--ways 1200 is more than the 1000 classes"),
    (["train", "protonet", "--eval-ways", "400", "--no-progress"], "--eval-ways 400 is more than the 300 classes"),
    (["train", "protonet", "--shots", "15", "--queries", "15", "--no-progress"], "images per class"),
    (["train", "protonet", "--steps", "0", "--no-progress"], "--steps must be a whole number >= 1, got 0"),
    (["train", "protonet", "--device", "cuda", "--no-progress"], "cuda"),
    (["train", "protonet", "--dataset", "omniglot", "--data-dir", "/nonexistent/omni", "--no-download",
      "--no-progress"], "Omniglot not found"),
    (["eval", "/nonexistent/run"], "is not a run directory"),
])
def test_bad_input_gives_one_line_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if argv[-1] == "--no-progress" and "--device" in argv:
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not list(tmp_path.rglob("checkpoint.pt"))


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "fastadapt", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "eval" in out.stdout
    out = subprocess.run([sys.executable, "-m", "fastadapt", "list"], capture_output=True, text=True, check=True)
    assert "protonet" in out.stdout and "omniglot" in out.stdout


def test_eval_on_a_tta_run_points_to_tta_eval(tmp_path, capsys):
    run = tmp_path / "tta"
    run.mkdir()
    (run / "config.yaml").write_text("dataset: cifar10\narch: resnet8\nnorm: bn\nrotation_head: true\n")
    assert main(["eval", str(run)]) == 2
    assert f"fastadapt tta eval {run}" in capsys.readouterr().err


def test_ctrl_c_during_eval_does_not_claim_a_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "protonet", *FAST, "--out", str(run)]) == 0
    capsys.readouterr()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("fastadapt.cli.train.evaluate", interrupted)
    assert main(["eval", str(run), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "checkpoint" not in err and "saved" not in err


def test_resuming_with_an_unreadable_config_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "protonet", *FAST, "--out", str(run)]) == 0
    (run / "config.yaml").write_text("method: [unclosed\n")  # the saved run can no longer be compared
    assert main(["train", "protonet", *fast(6), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "\n" not in err.strip()


def test_too_small_images_for_conv4_are_a_one_line_error(tmp_path, capsys):
    assert main(["train", "protonet", "--image-size", "8", "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    assert "conv4 needs images of at least 16x16" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
