"""The shared smoke test: every registered method builds, trains a step, adapts and predicts."""

import pytest
import torch

import fastadapt.data  # noqa: F401
import fastadapt.methods  # noqa: F401
from fastadapt.config import resolve
from fastadapt.data import build_task_source
from fastadapt.engine.evaluate import evaluate
from fastadapt.registry import METHODS

SMOKE_DATASET = {"classification": "builtin", "regression": "sinusoid", "image_function": "builtin-images"}


@pytest.mark.parametrize("name", METHODS.names())
def test_registered_method_trains_adapts_and_predicts(name):
    cls = METHODS.get(name)
    assert cls.__doc__ and cls.name == name
    cfg = resolve(name, None, {"dataset": SMOKE_DATASET[cls.task_kind], "ways": 3, "shots": 2, "queries": 2,
                               "meta_batch": 2, "eval": {"ways": 3}})
    source = build_task_source(cfg, "train", 3, 2, 2)
    learner = cls.from_config(cfg, source.in_shape)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in learner.parameters()]
    gen = torch.Generator().manual_seed(0)
    # The trainer's path: a learner draws its own batches (classifier pre-training draws labelled images).
    metrics = learner.train_step(learner.draw_batch(source, gen, 2, 1), opt, 1)
    assert metrics and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    moved = any(not torch.equal(a, p) for a, p in zip(before, learner.parameters()))
    # A baseline with nothing to meta-train (random-init) must leave its weights alone instead.
    assert moved == getattr(cls, "meta_trained", True), "a step must move weights (and only when meta-trained)"
    res = evaluate(learner, build_task_source(cfg, "test", 3, 2, 2), episodes=3, progress=False)
    assert res["ci95"] >= 0 and res["adapt_ms"] > 0
