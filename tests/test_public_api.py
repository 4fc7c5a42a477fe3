"""The top-level API: every method importable from ``fastadapt`` and usable on your own nn.Module."""

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

import fastadapt
from fastadapt.errors import ConfigError
from fastadapt.registry import METHODS

from test_maml import DT, assert_grads_close, class_batch, conv_bn_model, meta_grads


def test_every_registered_method_is_exported_from_the_top_level():
    for name in METHODS.names():
        cls = METHODS.get(name)
        assert getattr(fastadapt, cls.__name__, None) is cls, f"fastadapt.{cls.__name__} ({name}) is not exported"
        assert cls.__name__ in fastadapt.__all__, cls.__name__
    for attr in ("MAML", "FOMAML", "ANIL", "MetaSGD", "Reptile", "IMAML", "Pretrained", "ProtoNet", "BodyHead"):
        assert attr in fastadapt.__all__ and hasattr(fastadapt, attr), attr


class CustomNet(nn.Module):
    """A user's model: a trunk, then an output layer called ``fc`` (as in torchvision's ResNets)."""

    def __init__(self, trunk: nn.Module, fc: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.fc = fc

    def forward(self, x):
        return self.fc(self.trunk(x))


def _same_model_three_ways(seed: int):
    ref = conv_bn_model(seed=seed)  # BodyHead(body, head)
    body, head = copy.deepcopy(ref.body), copy.deepcopy(ref.head)
    seq = nn.Sequential(OrderedDict([*((f"layer{i}", m) for i, m in enumerate(copy.deepcopy(body))),
                                     ("fc", copy.deepcopy(head))]))
    return ref, {"sequential": seq, "module": CustomNet(body, head)}


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("kind", ["sequential", "module"])
def test_anil_on_a_model_with_a_named_head_equals_anil_on_bodyhead(kind, batching):
    ref_model, models = _same_model_three_ways(seed=3)
    batch = class_batch(shape=(1, 8, 8), seed=4)
    ref = fastadapt.ANIL(ref_model, inner_steps=2, inner_lr=0.5, batching=batching)
    mine = fastadapt.ANIL(models[kind], head="fc", inner_steps=2, inner_lr=0.5, batching=batching)
    ref_grads, my_grads = meta_grads(ref, batch), meta_grads(mine, batch)
    assert len(ref_grads) == len(my_grads)
    assert_grads_close(dict(enumerate(my_grads.values())), dict(enumerate(ref_grads.values())))
    assert any(g.abs().sum() > 0 for k, g in my_grads.items() if not k.startswith("model.fc"))  # the body learns
    # adaptation (head only) and prediction agree as well
    sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    adapted = mine.adapt(sx, sy)
    assert set(adapted) == {"weight", "bias"}
    torch.testing.assert_close(mine.predict(adapted, qx), ref.predict(ref.adapt(sx, sy), qx), rtol=1e-9, atol=1e-12)


def test_anil_head_must_name_a_submodule_that_is_called():
    _, models = _same_model_three_ways(seed=0)
    with pytest.raises(ConfigError, match="no submodule 'head'.*fc"):
        fastadapt.ANIL(models["module"])  # default head="head": this model calls it fc
    with pytest.raises(ConfigError, match="no submodule 'classifier'"):
        fastadapt.ANIL(models["module"], head="classifier")
    with pytest.raises(ConfigError, match="no parameters"):
        fastadapt.ANIL(models["sequential"], head="layer2")  # a ReLU
    unused = CustomNet(models["module"].trunk, models["module"].fc)
    unused.extra = nn.Linear(3, 3)
    learner = fastadapt.ANIL(unused, head="extra")
    with pytest.raises(ConfigError, match="never called its head 'extra'"):
        learner.adapt(torch.randn(6, 1, 8, 8, dtype=DT), torch.arange(3).repeat_interleave(2))
