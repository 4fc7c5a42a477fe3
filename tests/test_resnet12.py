"""ResNet-12: shapes, DropBlock, and ``--backbone resnet12`` for every image method, MAML's
functional inner loop included."""

import pytest
import torch

import fastadapt as fa
from fastadapt.config import resolve
from fastadapt.errors import ConfigError
from fastadapt.methods.maml import build_model
from fastadapt.models import build_backbone
from fastadapt.models.resnet12 import DropBlock
from fastadapt.registry import BACKBONES, METHODS


@pytest.mark.parametrize("size, side", [(28, 1), (84, 5)])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shapes(size, side, channels):
    net = fa.ResNet12(in_channels=channels, image_size=size).eval()
    with torch.no_grad():
        assert net(torch.rand(2, channels, size, size)).shape == (2, 640) and net.out_features == 640
        flat = fa.ResNet12(in_channels=channels, image_size=size, avg_pool=False).eval()
        assert flat(torch.rand(2, channels, size, size)).shape == (2, 640 * side * side)
        assert flat.out_features == 640 * side * side
        maps = [net.blocks[: i + 1](torch.rand(1, channels, size, size)).shape[1] for i in range(4)]
    assert maps == [64, 160, 320, 640]
    block = net.blocks[0]
    assert [c.kernel_size for c in (block.conv1, block.conv2, block.conv3)] == [(3, 3)] * 3
    assert block.shortcut[0].kernel_size == (1, 1) and block.act.negative_slope == 0.1
    # the width of MetaOptNet's and FEAT's ResNet-12 (about 12.4 M parameters)
    assert 12.0e6 < sum(p.numel() for p in net.parameters()) < 12.6e6


def test_registered_and_too_small_images_refused():
    assert {"resnet12", "resnet12-dropblock"} <= set(BACKBONES.names())
    with pytest.raises(ConfigError, match="16x16"):
        build_backbone("resnet12", (1, 8, 8))


def test_dropblock_drops_blocks_in_training_only():
    torch.manual_seed(0)
    drop = DropBlock(0.2, block_size=3)
    x = torch.ones(64, 4, 12, 12)
    y = drop.train()(x)
    zero = (y == 0).float().mean().item()
    assert 0.12 < zero < 0.28  # about the rate (overlapping blocks and edges make it inexact)
    assert torch.allclose(y.mean(), torch.tensor(1.0), atol=0.02)  # rescaled to keep the mean
    rows = (y[0, 0] == 0)
    if rows.any():  # a dropped pixel belongs to a dropped 3x3 square
        i, j = [int(v) for v in rows.nonzero()[0]]
        assert bool(rows[i:i + 3, j:j + 3].all())
    assert torch.equal(drop.eval()(x), x)
    net = build_backbone("resnet12-dropblock", (1, 28, 28))
    assert [b.drop.drop_rate for b in net.blocks] == [0.0, 0.0, 0.1, 0.1]


IMAGE_METHODS = [n for n in METHODS.names() if METHODS.get(n).task_kind == "classification"]


@pytest.mark.parametrize("name", IMAGE_METHODS)
def test_every_image_method_builds_on_resnet12_and_adapts(name):
    cfg = resolve(name, None, {"backbone": "resnet12", "ways": 2, "shots": 1, "queries": 1, "eval": {"ways": 2}})
    learner = METHODS.get(name).from_config(cfg, (1, 28, 28)).eval()
    assert any(isinstance(m, fa.ResNet12) for m in learner.modules())
    sx, sy = torch.rand(2, 1, 28, 28), torch.tensor([0, 1])
    with torch.set_grad_enabled(learner.adapt_requires_grad):
        adapted = learner.adapt(sx, sy)
    with torch.no_grad():
        out = learner.predict(adapted, torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 2) and torch.isfinite(out).all()


def test_maml_inner_loop_runs_on_resnet12():
    torch.manual_seed(0)
    model = build_model({"backbone": "resnet12", "ways": 2}, (1, 28, 28), "classification")
    learner = fa.MAML(model, inner_steps=1, inner_lr=0.1, batching="loop")
    batch = fa.Episode(torch.rand(1, 2, 1, 28, 28), torch.tensor([[0, 1]]), torch.rand(1, 2, 1, 28, 28),
                       torch.tensor([[0, 1]]))
    before = {k: v.detach().clone() for k, v in learner.named_parameters()}
    opt = torch.optim.SGD(learner.parameters(), lr=0.01)
    metrics = learner.train_step(batch, opt, 1)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    grads = [p.grad for p in learner.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the meta-gradient reaches the first block through the functional inner step
    assert not torch.equal(before["model.body.blocks.0.conv1.weight"], learner.model.body.blocks[0].conv1.weight)
