"""fastadapt.load_run: a trained run as a learner, ready to adapt and predict."""

import json
import shutil

import pytest
import torch
import yaml

import fastadapt
from fastadapt.cli import main
from fastadapt.data import build_task_source
from fastadapt.errors import ConfigError, DataError
from fastadapt.io import load_checkpoint, save_checkpoint
from fastadapt.models.conv4 import use_memory_format
from fastadapt.registry import METHODS

FAST = ["--ways", "3", "--shots", "1", "--queries", "2", "--steps", "3", "--eval-ways", "3", "--eval-episodes", "2",
        "--log-every", "1", "--no-progress"]


def train(run, method, *extra):
    assert main(["train", method, *FAST, *extra, "--out", str(run)]) == 0


def cli_eval_path_learner(run):
    """The learner as ``fastadapt eval`` has always rebuilt it: source shape, from_config, the run's
    Conv-4 layout, weights, eval mode."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    ev = cfg["eval"]
    source = build_task_source(cfg, "test", ev["ways"], ev["shots"], ev["queries"])
    learner = METHODS.get(cfg["method"]).from_config(cfg, source.in_shape)
    use_memory_format(learner, cfg["memory_format"])
    learner.load_state_dict(load_checkpoint(run / "checkpoint.pt")["model"])
    return learner.eval(), source


@pytest.mark.parametrize("method, extra", [("protonet", ()), ("maml", ("--meta-batch", "2", "--batching", "loop")),
                                           ("maml", ("--meta-batch", "3", "--batching", "grouped"))])
def test_load_run_gives_the_trained_learner_and_its_config(tmp_path, capsys, method, extra):
    run = tmp_path / "run"
    train(run, method, *extra)
    learner, cfg = fastadapt.load_run(run)
    assert cfg == yaml.safe_load((run / "config.yaml").read_text())
    if "--batching" in extra:
        assert cfg["batching"] == extra[extra.index("--batching") + 1] == learner.batching
    assert isinstance(learner, METHODS.get(method)) and learner.training is False
    saved = load_checkpoint(run / "checkpoint.pt")["model"]
    assert saved.keys() == learner.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in learner.state_dict().items())
    assert all(p.device.type == "cpu" for p in learner.parameters())

    # Predictions on test episodes equal those of the eval path, and their accuracy what `fastadapt eval` prints.
    reference, source = cli_eval_path_learner(run)
    gen = torch.Generator().manual_seed(0)
    scores = []
    for _ in range(3):
        ep = source.sample(gen)
        with torch.set_grad_enabled(learner.adapt_requires_grad):
            mine = learner.predict(learner.adapt(ep.support_x, ep.support_y), ep.query_x)
            theirs = reference.predict(reference.adapt(ep.support_x, ep.support_y), ep.query_x)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
        scores.append(100.0 * float((mine.argmax(-1) == ep.query_y).float().mean()))
    js = tmp_path / "eval.json"
    assert main(["eval", str(run), "--episodes", "3", "--json", str(js), "--no-progress"]) == 0
    assert json.loads(js.read_text())["accuracy"] == pytest.approx(sum(scores) / 3, abs=1e-9)


def test_load_run_overrides_and_device(tmp_path, capsys):
    run = tmp_path / "run"
    train(run, "maml", "--meta-batch", "1", "--batching", "loop")
    learner, cfg = fastadapt.load_run(run, device="cpu", inner_steps=3)
    assert learner.inner_steps == 3 and cfg["inner_steps"] == 3 and cfg["device"] == "cpu"
    with pytest.raises(ConfigError, match="unknown option 'inner_stpes'"):
        fastadapt.load_run(run, inner_stpes=3)
    with pytest.raises(ConfigError, match="not a device"):
        fastadapt.load_run(run, device="gpu0")


def one_line_error(exc_type, *args, match, **kwargs):
    with pytest.raises(exc_type, match=match) as info:
        fastadapt.load_run(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_load_run_errors_are_one_line_and_name_the_problem(tmp_path, capsys):
    one_line_error(ConfigError, tmp_path / "nothing", match="is not a run directory")
    (tmp_path / "file").write_text("x")
    one_line_error(ConfigError, tmp_path / "file", match="is not a run directory")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text("method: [unclosed\n")
    one_line_error(ConfigError, bad, match="not valid YAML")
    (bad / "config.yaml").write_text("just text\n")
    one_line_error(ConfigError, bad, match="does not hold a run configuration")

    run = tmp_path / "run"
    train(run, "protonet")
    ck = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").unlink()
    one_line_error(DataError, run, match="has no checkpoint.pt")
    (run / "checkpoint.pt").write_bytes(ck[: len(ck) // 2])
    one_line_error(DataError, run, match="checkpoint.pt cannot be read .*delete it")
    save_checkpoint({"step": 3}, run / "checkpoint.pt")
    one_line_error(DataError, run, match="holds no model weights")
    state = {k: v for k, v in load_checkpoint_from_bytes(ck, tmp_path)["model"].items() if "encoder.0" not in k}
    save_checkpoint({"model": state, "step": 3}, run / "checkpoint.pt")
    one_line_error(DataError, run, match="do not fit the model")


def load_checkpoint_from_bytes(data, tmp_path):
    path = tmp_path / "copy.pt"
    path.write_bytes(data)
    return load_checkpoint(path)


def test_builtin_and_omniglot_runs_load_without_their_data(tmp_path, monkeypatch):
    # An Omniglot run whose data is gone: its input shape follows from the configuration.
    from fastadapt.config import resolve

    run = tmp_path / "omni"
    run.mkdir()
    cfg = resolve("protonet", None, {"dataset": "omniglot", "data_dir": str(tmp_path / "gone"), "download": False})
    trained = METHODS.get("protonet").from_config(cfg, (1, 28, 28))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    save_checkpoint({"model": trained.state_dict(), "step": 7, "train_seconds": 1.5}, run / "checkpoint.pt")
    learner, _ = fastadapt.load_run(run)
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(learner.backbone(x), trained.eval().backbone(x))


def test_a_run_whose_data_moved_is_a_clear_error_then_loads_with_data_dir(tmp_path, capsys):
    from fastadapt.data.imagefolder import imagefolder_pools
    from test_data import make_folder

    data = make_folder(tmp_path / "images", splits=("train", "test"), classes=3, per_class=4)
    run = tmp_path / "run"
    train(run, "protonet", "--dataset", "imagefolder", "--data-dir", str(data), "--image-size", "16",
          "--eval-shots", "1", "--eval-queries", "2")
    moved = tmp_path / "moved"
    shutil.move(str(data), str(moved))
    imagefolder_pools.cache_clear()
    msg = one_line_error(DataError, run, match="imagefolder data of this run cannot be read")
    assert str(data) in msg and "data_dir=" in msg
    learner, cfg = fastadapt.load_run(run, data_dir=str(moved))
    assert cfg["data_dir"] == str(moved) and learner.training is False
