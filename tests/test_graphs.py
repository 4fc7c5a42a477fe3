"""The bookkeeping of recorded training steps (fastadapt.engine.graphs), on the CPU.

CUDA graphs need a GPU (tests/test_gpu.py records real ones). Here a stand-in backend records
nothing and re-runs the step at each replay, reading the recorded batch's tensors, which is what
a replayed graph computes: so these tests check, against eager steps bit for bit, that batches are
copied into the recorded inputs, that the warm-up, re-recording and fallbacks happen when they
should, and that a bad step leaves the weights and Adam's state as they were.
"""

import warnings

import pytest
import torch
from torch import nn

from fastadapt.engine.graphs import WARMUP, GraphedStep
from fastadapt.errors import ConfigError, NonFiniteLossError
from fastadapt.methods.maml import MAML
from fastadapt.methods.protonet import ProtoNet
from fastadapt.tasks import EpisodeSampler

from conftest import make_pool


class Rerun:
    """Records nothing: a replay re-runs the recorded step (on the recorded batch's tensors)."""

    def __init__(self, fail: bool = False) -> None:
        self.eager_steps, self.fail = 0, fail

    def eager(self, fn):
        self.eager_steps += 1
        return fn()

    def capture(self, fn, optimizer):
        if self.fail:
            raise RuntimeError("no capture here")
        return fn


def _source(ways=4):
    pool = make_pool(classes=10, per_class=8, size=8)
    pool.images[:, 0, 2:, 2:] = torch.randint(0, 255, pool.images[:, 0, 2:, 2:].shape, dtype=torch.uint8,
                                              generator=torch.Generator().manual_seed(0))
    return EpisodeSampler(pool, ways=ways, shots=2, queries=3)


def _protonet():
    torch.manual_seed(0)
    return ProtoNet(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8)))


def _pair(build):
    nets = [build() for _ in range(2)]
    return [(n, torch.optim.Adam(n.parameters(), lr=1e-2, fused=True)) for n in nets]


def _same(m_eager, m_recorded):
    # Recorded metrics are scaled on the GPU in float32, eager ones on the host in double.
    assert m_recorded == pytest.approx(m_eager, rel=1e-6)


def _equal(a, b):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_recorded_steps_equal_eager_steps_and_follow_each_batch():
    (eager, opt_e), (rec, opt_r) = _pair(_protonet)
    backend = Rerun()
    step = GraphedStep(rec, opt_r, lambda: torch.autocast("cpu", enabled=False), backend)
    g = torch.Generator().manual_seed(0)
    for i in range(WARMUP + 4):
        b = _source().sample_batch(g, 2)
        _same(eager.train_step(b, opt_e, i + 1), step(b, i + 1))
    assert backend.eager_steps == WARMUP and step.captures == 1
    _equal(eager, rec)
    # A new learning rate (a schedule's step) is recorded anew, and followed.
    for opt in (opt_e, opt_r):
        opt.param_groups[0]["lr"] = 5e-3
    for i in range(3):
        b = _source().sample_batch(g, 2)
        _same(eager.train_step(b, opt_e, 100 + i), step(b, 100 + i))
    assert step.captures == 2
    _equal(eager, rec)
    # So is a batch of other shapes.
    b = _source().sample_batch(g, 3)
    _same(eager.train_step(b, opt_e, 200), step(b, 200))
    assert step.captures == 3
    _equal(eager, rec)


def test_a_bad_recorded_step_is_refused_and_changes_nothing():
    (net, opt), _ = _pair(_protonet)
    step = GraphedStep(net, opt, lambda: torch.autocast("cpu", enabled=False), Rerun())
    g = torch.Generator().manual_seed(1)
    batches = [_source().sample_batch(g, 2) for _ in range(WARMUP + 2)]
    for i, b in enumerate(batches[:-1]):
        step(b, i + 1)
    assert step.captures == 1
    params = {k: v.clone() for k, v in net.named_parameters()}
    state = {k: {n: t.clone() for n, t in s.items()} for k, s in enumerate(opt.state.values())}
    bad = batches[0]
    nan = type(bad)(bad.support_x.clone().fill_(float("nan")), bad.support_y, bad.query_x, bad.query_y)
    with pytest.raises(NonFiniteLossError, match="step 9"):
        step(nan, 9)
    fewer = type(bad)(bad.support_x, bad.support_y.clamp(max=2), bad.query_x, bad.query_y.clamp(max=2))
    with pytest.raises(ConfigError, match="class count"):
        step(fewer, 10)
    # A query label past the recorded classes is refused too (on a GPU it would stop the device).
    beyond = type(bad)(bad.support_x, bad.support_y, bad.query_x, bad.query_y + 1)
    with pytest.raises(ConfigError, match="class count"):
        step(beyond, 11)
    for k, v in net.named_parameters():
        assert torch.equal(v, params[k]), f"a refused step changed {k}"
    for k, s in enumerate(opt.state.values()):
        for n, t in s.items():
            assert torch.equal(t, state[k][n]), f"a refused step changed Adam's {n}"
    step(batches[-1], 12)  # and training goes on
    assert any(not torch.equal(v, params[k]) for k, v in net.named_parameters())


def test_maml_recorded_steps_equal_eager_steps():
    def build():
        torch.manual_seed(0)
        return MAML(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4)), batching="vmap")

    (eager, opt_e), (rec, opt_r) = _pair(build)
    step = GraphedStep(rec, opt_r, lambda: torch.autocast("cpu", enabled=False), Rerun())
    g = torch.Generator().manual_seed(2)
    for i in range(WARMUP + 3):
        b = _source().sample_batch(g, 3)
        _same(eager.train_step(b, opt_e, i + 1), step(b, i + 1))
    assert step.captures == 1
    _equal(eager, rec)


def test_steps_without_a_recording_run_eagerly():
    # MAML's loop has no recorded step; a failed capture falls back with a warning.
    torch.manual_seed(0)
    loop = MAML(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), batching="loop")
    opt = torch.optim.Adam(loop.parameters(), lr=1e-2, fused=True)
    step = GraphedStep(loop, opt, lambda: torch.autocast("cpu", enabled=False), backend := Rerun())
    g = torch.Generator().manual_seed(3)
    for i in range(WARMUP + 2):
        step(_source().sample_batch(g, 2), i + 1)
    assert step.captures == 0 and backend.eager_steps == 0

    (eager, opt_e), (net, opt_n) = _pair(_protonet)
    step = GraphedStep(net, opt_n, lambda: torch.autocast("cpu", enabled=False), Rerun(fail=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(WARMUP + 3):
            b = _source().sample_batch(g, 2)
            _same(eager.train_step(b, opt_e, i + 1), step(b, i + 1))
    assert step.captures == 0
    assert sum("capture of the training step failed" in str(w.message) for w in caught) == 1
    _equal(eager, net)


def test_a_batch_that_is_not_tensors_runs_eagerly():
    class Odd(ProtoNet):
        def graphable_loss(self, batch):
            return super().graphable_loss(batch.episode)

        def meta_loss(self, batch):
            return super().meta_loss(batch.episode)

    class Wrapped:  # not a dataclass of tensors
        def __init__(self, episode):
            self.episode = episode

    torch.manual_seed(0)
    net = Odd(_protonet().backbone)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, fused=True)
    step = GraphedStep(net, opt, lambda: torch.autocast("cpu", enabled=False), backend := Rerun())
    g = torch.Generator().manual_seed(4)
    for i in range(WARMUP + 2):
        assert set(step(Wrapped(_source().sample_batch(g, 2)), i + 1)) == {"loss", "accuracy"}
    assert step.captures == 0 and backend.eager_steps == 0


def test_eager_fallbacks_keep_the_autocast_context_and_fast_changes_stop_recording():
    entered = []

    class Context:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False

    # A learning rate that changes every step: recorded once, then eager with a warning.
    (eager, opt_e), (net, opt_n) = _pair(_protonet)
    step = GraphedStep(net, opt_n, Context, Rerun())
    g = torch.Generator().manual_seed(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(WARMUP + 4):
            for opt in (opt_e, opt_n):
                opt.param_groups[0]["lr"] = 1e-2 / (i + 1)
            b = _source().sample_batch(g, 2)
            entered.clear()
            _same(eager.train_step(b, opt_e, i + 1), step(b, i + 1))
            assert entered, f"step {i + 1} ran outside the autocast context"
    assert step.captures == 1
    assert sum("runs without CUDA graphs" in str(w.message) for w in caught) == 1
    _equal(eager, net)
