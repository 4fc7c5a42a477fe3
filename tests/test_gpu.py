"""Checks that need a CUDA device (skipped without one): episodes drawn on the GPU, captured
training steps, MAML's grouped batching in cuDNN."""

import pytest
import torch

from fastadapt.tasks import EpisodeSampler
from fastadapt.tasks import sampler as sampler_module

from conftest import make_pool

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_episodes_drawn_on_the_gpu_equal_the_cpu_ones(monkeypatch):
    sampler = EpisodeSampler(make_pool(), ways=5, shots=2, queries=3)
    placed = sampler.on_device("cuda")
    assert placed is not sampler and placed._images.is_cuda
    assert placed.on_device("cuda") is placed  # placed once
    a = sampler.sample_batch(torch.Generator().manual_seed(2), 4)
    b = placed.sample_batch(torch.Generator().manual_seed(2), 4)
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert getattr(b, name).is_cuda and torch.equal(getattr(a, name), getattr(b, name).cpu()), name
    # A pool larger than the allowed share of the GPU's memory stays on the host.
    monkeypatch.setattr(sampler_module, "DEVICE_POOL_SHARE", 0.0)
    assert sampler.on_device("cuda") is sampler


# ---------------------------------------------------------------- CUDA-graph training steps

def _protonet_pair():
    """Two equal ProtoNets (Conv-4, channels-last as on a GPU) with fused Adam, as the trainer builds."""
    from fastadapt.methods.protonet import ProtoNet
    from fastadapt.models import Conv4

    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        net = ProtoNet(Conv4(channels_last=True)).cuda().train()
        nets.append((net, torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)))
    return nets


def _glyph_batches(n, ways=10, seed=0):
    from fastadapt.data import build_task_source

    source = build_task_source({"dataset": "builtin"}, "train", ways, 5, 5).on_device("cuda")
    g = torch.Generator().manual_seed(seed)
    return [source.sample_batch(g, 1) for _ in range(n)]


@pytest.fixture(autouse=True)
def _deterministic_convolutions():
    old = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = old


def _close(a, b, lr_steps):
    """Equal weights up to the GPU's rounding, as Adam spreads it: a weight whose gradient is near
    zero moves by about the learning rate either way, whatever the gradient's size, so atomics'
    rounding can part the two by up to twice the sum of the learning rates taken (``lr_steps``)."""
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert float((p - q).abs().max()) <= 2 * lr_steps + 1e-6, name


def _same_loss(a, b, batch):
    with torch.no_grad():
        la, lb = float(a.meta_loss(batch)[0]), float(b.meta_loss(batch)[0])
    assert abs(la - lb) <= 0.01 * abs(la), (la, lb)


def test_captured_protonet_steps_follow_the_eager_steps():
    from fastadapt.engine.graphs import WARMUP, GraphedStep
    import contextlib

    (eager, opt_e), (graphed, opt_g) = _protonet_pair()
    step = GraphedStep(graphed, opt_g, contextlib.nullcontext)
    batches = _glyph_batches(WARMUP + 4)
    for i, b in enumerate(batches):
        m_e = eager.train_step(b, opt_e, i + 1)
        m_g = step(b, i + 1)
        assert set(m_e) == set(m_g) and abs(m_e["loss"] - m_g["loss"]) < 1e-3 * max(1.0, abs(m_e["loss"])), (i, m_e, m_g)
    assert step.captures == 1 and step.replay is not None
    _close(eager, graphed, len(batches) * 1e-3)
    held_out = _glyph_batches(1, seed=7)[0]
    _same_loss(eager, graphed, held_out)
    # A new learning rate is captured anew and followed.
    for opt in (opt_e, opt_g):
        opt.param_groups[0]["lr"] = 5e-4
    for i, b in enumerate(_glyph_batches(2, seed=1)):
        m_e, m_g = eager.train_step(b, opt_e, 100 + i), step(b, 100 + i)
        assert abs(m_e["loss"] - m_g["loss"]) < 1e-3 * max(1.0, abs(m_e["loss"]))
    assert step.captures == 2
    _close(eager, graphed, len(batches) * 1e-3 + 2 * 5e-4)
    _same_loss(eager, graphed, held_out)


def test_a_captured_step_refuses_a_nan_loss_and_a_changed_class_count():
    from fastadapt.engine.graphs import WARMUP, GraphedStep
    from fastadapt.errors import ConfigError, NonFiniteLossError
    import contextlib

    (net, opt), _ = _protonet_pair()
    step = GraphedStep(net, opt, contextlib.nullcontext)
    batches = _glyph_batches(WARMUP + 1)
    for i, b in enumerate(batches):
        step(b, i + 1)
    assert step.captures == 1
    before = [p.detach().clone() for p in net.parameters()]
    bad = batches[0]
    nan = type(bad)(bad.support_x.clone().fill_(float("nan")), bad.support_y, bad.query_x, bad.query_y)
    with pytest.raises(NonFiniteLossError, match="step 9"):
        step(nan, 9)
    assert all(torch.equal(p, q) for p, q in zip(before, net.parameters())), "a NaN step must not touch the weights"
    fewer = type(bad)(bad.support_x, bad.support_y.clamp(max=3), bad.query_x, bad.query_y.clamp(max=3))
    with pytest.raises(ConfigError, match="class count"):
        step(fewer, 10)
    assert all(torch.equal(p, q) for p, q in zip(before, net.parameters()))
    step(batches[1], 11)  # and it goes on
    assert not all(torch.equal(p, q) for p, q in zip(before, net.parameters()))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_meta_train_on_the_gpu_with_and_without_graphs(precision):
    from fastadapt.data import build_task_source
    from fastadapt.engine.evaluate import evaluate
    from fastadapt.engine.trainer import TrainSettings, meta_train
    from fastadapt.methods.protonet import ProtoNet
    from fastadapt.models import Conv4

    train = build_task_source({"dataset": "builtin"}, "train", 10, 5, 5)
    test = build_task_source({"dataset": "builtin"}, "test", 5, 1, 5)
    results = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        learner = ProtoNet(Conv4(channels_last=True))
        r = meta_train(learner, train, TrainSettings(steps=40, device="cuda", progress=False, log_every=10,
                                                     precision=precision, cuda_graphs=graphs))
        results[graphs] = (r, evaluate(learner, test, 100, device="cuda", progress=False)["accuracy"])
    for r, acc in results.values():
        assert r.step == 40 and acc > 60.0, (r, acc)  # chance is 20 %
    assert abs(results[True][0].last_metrics["loss"] - results[False][0].last_metrics["loss"]) < 0.05


@pytest.mark.parametrize("method", ["maml", "anil"])
def test_captured_maml_steps_follow_the_eager_steps(method):
    # The MAML family's vmap path (its GPU default), second order.
    import contextlib

    from fastadapt.config import resolve
    from fastadapt.engine.graphs import WARMUP, GraphedStep
    from fastadapt.registry import METHODS

    cfg = resolve(method, {}, {"dataset": "builtin", "ways": 5, "shots": 1, "queries": 5})
    pairs = []
    for _ in range(2):
        torch.manual_seed(0)
        net = METHODS.get(method).from_config(cfg, (1, 28, 28)).cuda().train()
        assert net.decide_run_options("cuda") == {"batching": "vmap"}
        pairs.append((net, torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)))
    (eager, opt_e), (graphed, opt_g) = pairs
    step = GraphedStep(graphed, opt_g, contextlib.nullcontext)
    from fastadapt.data import build_task_source

    source = build_task_source({"dataset": "builtin"}, "train", 5, 1, 5).on_device("cuda")
    g = torch.Generator().manual_seed(0)
    for i in range(WARMUP + 3):
        b = source.sample_batch(g, 4)
        m_e, m_g = eager.train_step(b, opt_e, i + 1), step(b, i + 1)
        assert abs(m_e["loss"] - m_g["loss"]) < 1e-3 * max(1.0, abs(m_e["loss"])), (i, m_e, m_g)
        assert set(m_e) == set(m_g)
    assert step.captures == 1
    _close(eager, graphed, (WARMUP + 3) * 1e-3)
    _same_loss(eager, graphed, source.sample_batch(torch.Generator().manual_seed(9), 4))


@pytest.mark.parametrize("cls_name", ["MAML", "ANIL"])
def test_grouped_batching_on_the_gpu_equals_the_loop(cls_name):
    # Conv-4 in channels-last (the GPU layout), grouped convolutions in cuDNN, float64 so that
    # only the arithmetic's order differs.
    import copy

    from fastadapt import methods
    from fastadapt.methods.maml import BodyHead
    from fastadapt.models import Conv4
    from fastadapt.tasks import Episode

    torch.manual_seed(0)
    model = BodyHead(Conv4(1, hidden=8, out_channels=8, image_size=32, channels_last=True), torch.nn.Linear(32, 5))
    cls = getattr(methods, cls_name)
    g = torch.Generator().manual_seed(1)
    batch = Episode(torch.rand(5, 5, 1, 32, 32, generator=g), torch.arange(5).repeat(5, 1),
                    torch.rand(5, 10, 1, 32, 32, generator=g), torch.arange(5).repeat_interleave(2).repeat(5, 1))
    batch = Episode(*(t.double().cuda() if t.is_floating_point() else t.cuda()
                      for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))
    grads = {}
    for mode in ("loop", "grouped"):
        learner = cls(copy.deepcopy(model), inner_steps=2, inner_lr=0.4, batching=mode).double().cuda()
        learner.group_size = 2
        learner._backward(batch, mode, 0)
        grads[mode] = [p.grad for p in learner.parameters()]
    for a, b in zip(grads["loop"], grads["grouped"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
