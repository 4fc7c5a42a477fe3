"""Same command, same bits; an interrupted or extended run continues exactly, for every
optimization-based method, not only ProtoNet."""

import json
import os
import signal

import pytest
import torch
import yaml

from fastadapt.cli import main
from fastadapt.engine import trainer as trainer_mod
from fastadapt.engine.trainer import CHECKPOINT, RunInterrupted, TrainSettings, meta_train
from fastadapt.errors import DataError
from fastadapt.io import load_checkpoint, previous_checkpoint
from fastadapt.methods import Reptile
from fastadapt.tasks.sinusoid import SinusoidTasks

ARGS = {
    "maml": ["--inner-steps", "1", "--inner-lr", "0.4"],
    "reptile": ["--anneal", "--inner-steps", "2"],
    "imaml": ["--inner-steps", "2", "--cg-steps", "2"],
}


def run(method, out, steps, *extra):
    argv = ["train", method, "--ways", "3", "--shots", "1", "--queries", "2", "--meta-batch", "2",
            "--steps", str(steps), "--eval-ways", "3", "--eval-episodes", "3", "--log-every", "1",
            "--checkpoint-every", "2", "--no-progress", "--out", str(out), *ARGS[method], *extra]
    return main(argv)


def weights(path):
    return load_checkpoint(path / CHECKPOINT)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", ["maml", "reptile", "imaml"])
def test_same_command_same_bits_and_extended_run_equals_straight_run(tmp_path, capsys, method):
    assert run(method, tmp_path / "a", 4) == 0
    assert run(method, tmp_path / "b", 4) == 0
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    ra, rb = (json.loads((tmp_path / n / "results.json").read_text()) for n in "ab")
    assert (ra["accuracy"], ra["ci95"]) == (rb["accuracy"], rb["ci95"])
    # The path was decided once and recorded, in config.yaml and in the checkpoint.
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["batching"] == "loop"
    assert load_checkpoint(tmp_path / "a" / CHECKPOINT)["run_state"]["batching"] == "loop"

    # 2 iterations, then the same command with --steps 4: the same weights and log as 4 at once.
    assert run(method, tmp_path / "c", 2) == 0
    assert run(method, tmp_path / "c", 4) == 0
    assert "resuming" in capsys.readouterr().out
    if method == "reptile":
        # The anneal horizon is the first --steps: extending the run does not raise beta again.
        assert yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())["anneal_steps"] == 2
    else:
        assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "c"))
        la, lc = ((tmp_path / n / "metrics.jsonl").read_text().splitlines() for n in "ac")
        assert [json.loads(x)["loss"] for x in la] == [json.loads(x)["loss"] for x in lc]


@pytest.mark.parametrize("method", ["maml", "reptile", "imaml"])
def test_killed_run_resumes_exactly(tmp_path, capsys, monkeypatch, method):
    assert run(method, tmp_path / "a", 5) == 0
    real = trainer_mod.meta_train

    def interrupting(*args, **kw):
        def on_log(row):
            if row["step"] == 3:  # SIGTERM during iteration 3
                os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kw, on_log=on_log)

    monkeypatch.setattr("fastadapt.cli.train.meta_train", interrupting)
    assert run(method, tmp_path / "b", 5) == 130
    assert "saved at iteration 3" in capsys.readouterr().err
    monkeypatch.setattr("fastadapt.cli.train.meta_train", real)
    assert run(method, tmp_path / "b", 5) == 0
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_reptile_schedule_survives_resume_and_extension(tmp_path):
    learner = Reptile(torch.nn.Linear(1, 1), anneal=True, anneal_steps=4)
    assert learner.run_state()["anneal_steps"] == 4
    other = Reptile(torch.nn.Linear(1, 1), anneal=True, anneal_steps=8)
    with pytest.raises(Exception, match="--anneal-steps 4"):
        other.load_run_state(learner.run_state())


def test_interrupt_before_the_first_checkpoint_says_nothing_was_saved(tmp_path):
    source = SinusoidTasks(5, 5)
    from fastadapt.methods import MAML

    learner = MAML(torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)),
                   inner_lr=0.01, task_kind="regression")

    def stop(row):
        raise KeyboardInterrupt  # a second Ctrl-C aborts at once

    with pytest.raises(RunInterrupted, match="nothing was saved"):
        meta_train(learner, source, TrainSettings(steps=5, checkpoint_every=10, log_every=1, progress=False),
                   tmp_path, on_log=stop)
    assert not (tmp_path / CHECKPOINT).exists()


def _settings(steps):
    return TrainSettings(steps=steps, meta_batch=2, checkpoint_every=1, log_every=1, progress=False)


def _learner():
    from fastadapt.methods import MAML

    torch.manual_seed(0)
    return MAML(torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)),
                inner_lr=0.01, task_kind="regression")


def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    straight = _learner()
    meta_train(straight, SinusoidTasks(5, 5), _settings(4), tmp_path / "a")
    meta_train(_learner(), SinusoidTasks(5, 5), _settings(3), tmp_path / "b")
    prev = previous_checkpoint(tmp_path / "b" / CHECKPOINT)
    assert load_checkpoint(prev)["step"] == 2
    (tmp_path / "b" / CHECKPOINT).write_bytes(b"cut short by a full disk")
    resumed = _learner()
    result = meta_train(resumed, SinusoidTasks(5, 5), _settings(4), tmp_path / "b")
    assert result.resumed_from == 2 and result.step == 4
    assert "continuing from the previous checkpoint checkpoint.prev.pt (step 2)" in capsys.readouterr().err
    assert_same_weights(straight.state_dict(), resumed.state_dict())


def test_corrupt_checkpoint_message_is_one_short_line_without_unsafe_advice(tmp_path):
    path = tmp_path / CHECKPOINT
    # A pickle that weights_only refuses: torch's own message would advise weights_only=False.
    torch.save({"f": len}, path)
    with pytest.raises(DataError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "weights_only" not in msg and "\n" not in msg and "cannot be read" in msg and len(msg) < 200


def test_cuda_rng_state_is_saved_and_restored(monkeypatch):
    calls = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([7], dtype=torch.uint8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: calls.setdefault("set", s))
    state = trainer_mod.rng_state(torch.device("cuda"))
    assert torch.equal(state["cuda_rng"][0], torch.tensor([7], dtype=torch.uint8))
    trainer_mod.set_rng_state(state, torch.device("cuda"))
    assert torch.equal(calls["set"][0], torch.tensor([7], dtype=torch.uint8))
    assert "cuda_rng" not in trainer_mod.rng_state(torch.device("cpu"))


def test_sinusoid_splits_draw_from_their_own_streams():
    train = SinusoidTasks(5, 5, split="train").sample_batch(torch.Generator().manual_seed(0), 50)
    test = SinusoidTasks(5, 5, split="test").sample_batch(torch.Generator().manual_seed(0), 50)
    again = SinusoidTasks(5, 5, split="test").sample_batch(torch.Generator().manual_seed(0), 50)
    assert torch.equal(test.support_x, again.support_x)  # a split's stream is reproducible
    # No test task equals a training task (first support point's value identifies a curve).
    assert not torch.isclose(train.support_y[:, None, 0, 0], test.support_y[None, :, 0, 0]).any()


def test_divergence_is_reported_while_training():
    watch = trainer_mod._DivergenceWatch()
    assert watch.check(10, 2.0) is None and watch.check(20, 5.0) is None
    msg = watch.check(30, 500.0)
    assert msg and "divergent" in msg and "--inner-lr" in msg
    assert watch.check(40, 900.0) is None  # said once
