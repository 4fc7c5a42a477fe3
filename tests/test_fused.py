"""Conv-4's fused BatchNorm -> ReLU -> max-pool block against PyTorch's layers (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadapt.methods import MAML, ProtoNet
from fastadapt.models import Conv4, fused, native
from fastadapt.models.fused import bn_relu_pool, can_fuse, fused_blocks
from fastadapt.models.norm import BatchStatNorm
from fastadapt.tasks import Episode

DT = torch.float64


def _inputs(shape, in_channels, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Values on a coarse grid: many exact ties inside pooling windows, as in images with a flat
    # background, where the gradient must go to the first maximum as in max_pool2d.
    x = torch.round(torch.randn(shape[0], in_channels, *shape[2:], generator=g, dtype=DT) * 2) / 2
    w = torch.randn(shape[1], in_channels, 3, 3, generator=g, dtype=DT) * 0.5
    gamma = torch.rand(shape[1], generator=g, dtype=DT) * 2 - 0.6  # some channels negative
    beta = torch.randn(shape[1], generator=g, dtype=DT)
    return x, w, gamma, beta


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape,in_channels", [((6, 5, 8, 8), 1), ((4, 6, 7, 9), 3), ((2, 3, 2, 3), 2)])
def test_fused_block_equals_the_three_layers_with_their_gradients(shape, in_channels, layout):
    x, w, gamma, beta = _inputs(shape, in_channels)
    x = x.contiguous(memory_format=layout)
    out_shape = F.max_pool2d(torch.zeros(shape, dtype=DT), 2).shape
    grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(1), dtype=DT)

    def run(use_fused):
        bn = BatchStatNorm(shape[1]).to(DT)
        with torch.no_grad():
            bn.weight.copy_(gamma)
            bn.bias.copy_(beta)
        weight = w.clone().requires_grad_()
        z = F.conv2d(x, weight, padding=1)
        out = bn_relu_pool(z, bn) if use_fused else F.max_pool2d(F.relu(bn(z)), 2)
        out.backward(grad_out)
        return out.detach(), weight.grad, bn.weight.grad, bn.bias.grad

    for ref, got in zip(run(False), run(True)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_running_statistics_are_updated_as_batchnorm2d_does():
    x, w, gamma, beta = _inputs((8, 4, 6, 6), 2)
    z = F.conv2d(x, w, padding=1)
    for momentum in (0.1, None):
        ref = nn.BatchNorm2d(4, momentum=momentum).to(DT)
        with torch.no_grad():
            ref.weight.copy_(gamma)
            ref.bias.copy_(beta)
        ours = copy.deepcopy(ref)
        for _ in range(3):
            expected = F.max_pool2d(F.relu(ref(z)), 2)
            with fused_blocks():
                assert can_fuse(z, ours, nn.ReLU(), nn.MaxPool2d(2))
            got = bn_relu_pool(z, ours)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-12, atol=1e-12)


def test_fusion_is_used_only_where_it_is_safe():
    z = torch.randn(2, 3, 4, 4)
    bn, relu, pool = nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2)
    assert not can_fuse(z, bn, relu, pool)  # outside fused_blocks
    with fused_blocks():
        assert can_fuse(z, bn, relu, pool)
        assert not can_fuse(z, bn.eval(), relu, pool)  # running statistics: not the batch's
        bn.train()
        assert not can_fuse(z, bn, relu, nn.MaxPool2d(3))
        assert not can_fuse(z, bn, nn.LeakyReLU(), pool)
        assert not can_fuse(z.half(), bn, relu, pool)
        assert not can_fuse(z[..., ::2], bn, relu, pool)  # neither NCHW nor channels-last
        assert not can_fuse(z[:0], bn, relu, pool)  # an empty batch: PyTorch's layers say what is wrong
        with torch.autocast("cpu", dtype=torch.bfloat16):  # only where the native kernels take z
            assert can_fuse(z, bn, relu, pool) == native.usable(z)
            assert not can_fuse(z.double(), bn, relu, pool)
        seen = []
        torch.compile(lambda t: (seen.append(can_fuse(t, bn, relu, pool)), t + 1)[1], backend="eager")(z)
        assert seen == [False]  # compiled graphs fuse the plain layers themselves
        seen.clear()
        torch.func.grad(lambda t: (seen.append(can_fuse(t, bn, relu, pool)), t.sum())[1])(z)
        assert seen == [False]  # torch.func transforms may differentiate twice
        fused.ENABLED = False
        try:
            assert not can_fuse(z, bn, relu, pool)
        finally:
            fused.ENABLED = True
    assert not can_fuse(z, bn, relu, pool)


def test_the_fused_backward_refuses_a_second_derivative():
    x, w, gamma, beta = _inputs((4, 3, 4, 4), 1)
    bn = BatchStatNorm(3).to(DT)
    weight = w.requires_grad_()
    loss = bn_relu_pool(F.conv2d(x, weight, padding=1), bn).square().sum()
    (g,) = torch.autograd.grad(loss, weight, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


@pytest.fixture
def fused_calls(monkeypatch):
    """The number of fused blocks Conv-4 runs (so the tests below know the fused path ran)."""
    import fastadapt.models.conv4 as conv4

    calls = []

    def counted(z, bn):
        calls.append(z.shape)
        return bn_relu_pool(z, bn)

    monkeypatch.setattr(conv4, "bn_relu_pool", counted)
    return calls


def _episodes(tasks=3, ways=3, shots=1, queries=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Episode(torch.rand(tasks, ways * shots, 1, size, size, generator=g, dtype=DT),
                   torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1),
                   torch.rand(tasks, ways * queries, 1, size, size, generator=g, dtype=DT),
                   torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1))


def _plain_conv4(params, x):
    for i in range(4):
        w, b, g, beta = params[4 * i: 4 * i + 4]
        x = F.max_pool2d(F.relu(F.batch_norm(F.conv2d(x, w, b, padding=1), None, None, g, beta, training=True)), 2)
    return F.linear(x.flatten(1), params[16], params[17])


def test_maml_with_fused_query_blocks_gives_the_hand_written_meta_gradient(fused_calls):
    torch.manual_seed(0)
    learner = MAML.from_config({"ways": 3, "inner_steps": 2, "inner_lr": 0.3, "batching": "loop"}, (1, 16, 16)).to(DT)
    batch = _episodes()
    learner._backward(batch, "loop", 0)
    assert len(fused_calls) == 4 * batch.num_tasks  # the query passes; the inner loop runs unfused
    ours = [p.grad.clone() for p in learner.model.parameters()]
    params = [p.detach().clone().requires_grad_() for p in learner.model.parameters()]
    total = 0.0
    for i in range(batch.num_tasks):
        fast = params
        for _ in range(2):
            loss = F.cross_entropy(_plain_conv4(fast, batch.support_x[i]), batch.support_y[i])
            grads = torch.autograd.grad(loss, fast, create_graph=True)
            fast = [p - 0.3 * g for p, g in zip(fast, grads)]
        total = total + F.cross_entropy(_plain_conv4(fast, batch.query_x[i]), batch.query_y[i])
    (total / batch.num_tasks).backward()
    for a, b in zip(ours, params):
        torch.testing.assert_close(a, b.grad, rtol=1e-9, atol=1e-12)


def test_protonet_training_is_the_same_with_and_without_fused_blocks(fused_calls):
    torch.manual_seed(0)
    model = ProtoNet(Conv4(1, image_size=16)).to(DT)
    other = copy.deepcopy(model)
    batch = _episodes(tasks=2, ways=4, shots=2, queries=3)
    for net, enabled in ((model, True), (other, False)):
        fused.ENABLED = enabled
        try:
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            for _ in range(2):
                net.train_step(batch, opt)
        finally:
            fused.ENABLED = True
    assert len(fused_calls) == 4 * 2 * 2  # blocks x episodes x steps, all in the fused run
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
