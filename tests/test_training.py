import json
import os
import signal

import pytest
import torch
from torch import nn

from fastadapt.engine.evaluate import evaluate
from fastadapt.engine.trainer import CHECKPOINT, METRICS, TrainSettings, meta_train
from fastadapt.errors import NonFiniteLossError
from fastadapt.io import load_checkpoint
from fastadapt.methods.protonet import ProtoNet
from fastadapt.models import Conv4
from fastadapt.tasks import EpisodeSampler

from conftest import make_pool


def tiny_learner():
    torch.manual_seed(0)
    return ProtoNet(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8)))


def tiny_source():
    pool = make_pool(classes=10, per_class=8, size=8)
    pool.images[:, 0, 2:, 2:] = torch.randint(0, 255, pool.images[:, 0, 2:, 2:].shape, dtype=torch.uint8)
    return EpisodeSampler(pool, ways=4, shots=2, queries=3)


def settings(steps, **kw):
    return TrainSettings(steps=steps, lr=1e-2, lr_decay_every=3, checkpoint_every=2, log_every=1, progress=False, **kw)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    straight = tiny_learner()
    meta_train(straight, tiny_source(), settings(8), tmp_path / "a")

    part = tiny_learner()
    meta_train(part, tiny_source(), settings(5), tmp_path / "b")  # stops at 5 (checkpoint at 5 = the end)
    resumed = tiny_learner()  # a fresh process would start from new weights
    result = meta_train(resumed, tiny_source(), settings(8), tmp_path / "b")
    assert result.resumed_from == 5 and result.step == 8
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    rows_a = [json.loads(l) for l in (tmp_path / "a" / METRICS).read_text().splitlines()]
    rows_b = [json.loads(l) for l in (tmp_path / "b" / METRICS).read_text().splitlines()]
    assert [r["step"] for r in rows_b] == list(range(1, 9))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert (tmp_path / "b" / "learning_curve.png").is_file()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_checkpoints_between_steps_and_resumes_exactly(tmp_path, signum):
    straight = tiny_learner()
    meta_train(straight, tiny_source(), settings(7), tmp_path / "a")

    def interrupt(row):
        if row["step"] == 3:  # as if Ctrl-C arrived during step 3
            os.kill(os.getpid(), signum)

    learner = tiny_learner()
    with pytest.raises(KeyboardInterrupt):
        meta_train(learner, tiny_source(), settings(7), tmp_path / "b", on_log=interrupt)
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT)["step"] == 3
    resumed = tiny_learner()
    meta_train(resumed, tiny_source(), settings(7), tmp_path / "b")
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_log_lines_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    meta_train(tiny_learner(), tiny_source(), settings(4), tmp_path)
    with open(tmp_path / METRICS, "a") as f:  # lines of a run killed after its last checkpoint
        f.write(json.dumps({"step": 5, "loss": 9.0}) + "\n" + '{"step": 6, "lo')
    meta_train(tiny_learner(), tiny_source(), settings(6), tmp_path)
    rows = [json.loads(l) for l in (tmp_path / METRICS).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[4]["loss"] != 9.0


class ExplodingProtoNet(ProtoNet):
    def meta_loss(self, batch):
        loss, metrics = super().meta_loss(batch)
        if self.calls == 5:
            loss = loss * float("nan")
        self.calls += 1
        return loss, metrics


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    learner = ExplodingProtoNet(tiny_learner().backbone)
    learner.calls = 0
    with pytest.raises(NonFiniteLossError, match="step 6"):
        meta_train(learner, tiny_source(), settings(10), tmp_path)
    ck = load_checkpoint(tmp_path / CHECKPOINT)
    assert ck["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in learner.parameters()), "a NaN step must not touch the weights"


def test_short_training_on_builtin_glyphs_beats_chance_by_far():
    from fastadapt.data import build_task_source

    cfg = {"dataset": "builtin"}
    train = build_task_source(cfg, "train", 10, 5, 5)
    test = build_task_source(cfg, "test", 5, 1, 5)
    torch.manual_seed(0)
    learner = ProtoNet(Conv4())
    before = evaluate(learner, test, 50, progress=False)["accuracy"]
    meta_train(learner, train, TrainSettings(steps=40, progress=False))
    after = evaluate(learner, test, 100, progress=False)
    assert after["accuracy"] > 60.0, after  # chance is 20%
    assert after["accuracy"] > before + 10.0
    assert after["adapt_ms"] > 0 and after["peak_mem_mb"] > 0


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    from fastadapt.errors import DataError

    (tmp_path / CHECKPOINT).write_bytes(b"half a checkpoint")
    with pytest.raises(DataError, match="cannot be read.*delete it"):
        meta_train(tiny_learner(), tiny_source(), settings(2), tmp_path)


def test_only_learners_that_define_their_own_captured_loss_are_captured():
    from fastadapt.engine.graphs import usable

    cuda = torch.device("cuda")
    assert usable(tiny_learner(), cuda, 1, True)
    assert not usable(tiny_learner(), cuda, 1, False)  # --no-cuda-graphs
    assert not usable(tiny_learner(), torch.device("cpu"), 1, True)
    assert not usable(tiny_learner(), cuda, 2, True)  # several processes
    # A subclass with its own loss is not replaced by its parent's captured one.
    assert not usable(ExplodingProtoNet(tiny_learner().backbone), cuda, 1, True)
    # The MAML family offers its vmap step; Reptile, with a training step of its own, does not.
    from fastadapt.methods.maml import MAML
    from fastadapt.methods.reptile import Reptile
    assert usable(MAML(nn.Sequential(nn.Flatten(), nn.Linear(64, 4))), cuda, 1, True)
    assert not usable(MAML(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), batching="loop"), cuda, 1, True)
    assert not usable(Reptile(nn.Sequential(nn.Flatten(), nn.Linear(64, 4))), cuda, 1, True)
    from fastadapt.methods.imaml import IMAML
    assert not usable(IMAML(nn.Sequential(nn.Flatten(), nn.Linear(64, 4))), cuda, 1, True)  # its own meta-loss


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's imports
def test_compiled_learners_are_not_captured():
    from fastadapt.engine.graphs import usable

    compiled = tiny_learner()
    compiled.compile_networks()
    assert not usable(compiled, torch.device("cuda"), 1, True)


def test_captured_losses_equal_the_eager_meta_losses():
    # What a CUDA graph records (graphable_loss) computes meta_loss's loss and metrics, as tensors.
    from fastadapt.methods.maml import MAML

    torch.manual_seed(0)
    learner, source = tiny_learner(), tiny_source()
    batch = source.sample_batch(torch.Generator().manual_seed(0), 2)
    loss_fn = learner.graphable_loss(batch)
    loss, metrics = learner.meta_loss(batch)
    g_loss, g_metrics, ok = loss_fn(batch)
    assert bool(ok) and torch.allclose(loss, g_loss)
    assert {k: float(v) for k, v in g_metrics.items()} == pytest.approx(metrics)
    fewer = type(batch)(batch.support_x, batch.support_y.clamp(max=2), batch.query_x, batch.query_y.clamp(max=2))
    assert not bool(loss_fn(fewer)[2]), "a batch with another class count is flagged"

    maml = MAML(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), batching="vmap")
    loss, metrics = maml.meta_loss(batch)
    g_loss, g_metrics, ok = maml.graphable_loss(batch)(batch)
    assert bool(ok) and torch.allclose(loss, g_loss)
    assert {k: float(v) for k, v in g_metrics.items()} == pytest.approx(metrics)
    assert MAML(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), batching="loop").graphable_loss(batch) is None
