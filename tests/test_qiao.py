"""Parameter prediction from activations (qiao) and the nearest-class-mean baseline (ncm), against
hand computations: gradients reach the predicted weights through the support set only, the
normalised cosine classifier, the training mix's probability, nearest means, the two-stage
schedule and its exact resume, and a short training run on the built-in glyphs."""

import json
import math
import os
import signal

import pytest
import torch
import yaml
from torch import nn

import fastadapt as fa
from fastadapt.cli import main
from fastadapt.config import resolve
from fastadapt.data import build_task_source
from fastadapt.engine import trainer as trainer_mod
from fastadapt.engine.trainer import CHECKPOINT
from fastadapt.errors import ConfigError
from fastadapt.io import load_checkpoint
from fastadapt.methods.classifier import cosine_logits
from fastadapt.methods.qiao import training_mix
from fastadapt.models import Conv4
from fastadapt.tasks import Episode, EpisodeWithClasses, LabelledBatch

from conftest import make_pool


class Flat(nn.Module):
    """An extractor that is the identity on flat vectors (activations = inputs)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_features = dim

    def forward(self, x):
        return x.flatten(1)


def small_conv(seed=0):
    torch.manual_seed(seed)
    return Conv4(in_channels=1, hidden=8, out_channels=8, image_size=16)


def episode(ways=3, shots=2, queries=2, shape=(1, 16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(ways * shots, *shape, generator=g)
    qx = torch.rand(ways * queries, *shape, generator=g)
    return sx, torch.arange(ways).repeat_interleave(shots), qx, torch.arange(ways).repeat_interleave(queries)


# ------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("train_mode", [True, False])
def test_predicted_weights_depend_on_the_support_set_only(train_mode):
    learner = fa.Qiao(small_conv(), base_classes=6, finetune_extractor=True)
    learner.train(train_mode)
    sx, sy, qx, _ = episode()
    sx.requires_grad_(True)
    qx.requires_grad_(True)
    weights, query = learner.episode_forward(sx, sy, qx)
    assert weights.shape == (3, 8) and query.shape == (6, 8)
    assert torch.allclose(weights.norm(dim=-1), torch.ones(3), atol=1e-5)
    g_support, g_query = torch.autograd.grad(weights.sum() + (weights ** 2).sum(), [sx, qx], allow_unused=True)
    assert g_query is None or torch.count_nonzero(g_query) == 0, "the query set leaked into the predicted weights"
    assert g_support is not None and g_support.abs().sum() > 0
    # The check can fail: a train-mode extractor over the same concatenated batch mixes the
    # query images into the support activations through the BatchNorm statistics.
    a = learner.backbone.train()(torch.cat([sx, qx]))
    leak = torch.autograd.grad(a[: len(sx)].sum() + (a[: len(sx)] ** 2).sum(), qx)[0]
    assert leak.abs().sum() > 0


def test_frozen_extractor_gives_no_gradient_to_the_inputs_and_stays_fixed():
    learner = fa.Qiao(small_conv(), base_classes=6)  # finetune_extractor=False
    sx, sy, qx, _ = episode()
    sx.requires_grad_(True)
    weights, _ = learner.episode_forward(sx, sy, qx)
    assert weights.requires_grad  # through phi
    assert torch.autograd.grad(weights.sum(), [sx], allow_unused=True)[0] is None
    batch = EpisodeWithClasses(Episode(sx.detach(), sy, qx, torch.tensor([0, 0, 1, 1, 2, 2])), torch.tensor([4, 0, 2]))
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    assert all(p.grad is None for p in learner.backbone.parameters())
    assert learner.classifier.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.predictor.parameters())


# ------------------------------------------------------------------------------------------ formulas
def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def test_normalised_cosine_classifier_matches_a_hand_computation():
    dim, ways, shots = 5, 3, 2
    learner = fa.Qiao(Flat(dim), base_classes=4, predictor="linear", scale=7.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a predictor that is not the identity
        learner.predictor.net[0].weight.copy_(torch.randn(dim, dim, generator=g))
        learner.predictor.net[0].bias.copy_(torch.randn(dim, generator=g))
    sx = torch.randn(ways * shots, dim, generator=g)
    sy = torch.arange(ways).repeat_interleave(shots)
    qx = torch.randn(4, dim, generator=g)
    learner.eval()
    logits = learner.predict(learner.adapt(sx, sy), qx)

    W, b = learner.predictor.net[0].weight.tolist(), learner.predictor.net[0].bias.tolist()
    expected = []
    rows = sx.tolist()
    weights = []
    for k in range(ways):
        acts = [_unit(r) for r, y in zip(rows, sy.tolist()) if y == k]
        mean = [sum(a[d] for a in acts) / len(acts) for d in range(dim)]
        m = _unit(mean)
        z = [sum(W[i][j] * m[j] for j in range(dim)) + b[i] for i in range(dim)]
        weights.append(_unit(z))
    for q in qx.tolist():
        a = _unit(q)
        expected.append([7.0 * sum(a[d] * w[d] for d in range(dim)) for w in weights])
    assert torch.allclose(logits, torch.tensor(expected), atol=1e-5)
    # the pre-training classifier is the same cosine form
    base = learner.classifier.detach()
    hand = [[7.0 * sum(x * y for x, y in zip(_unit(q), _unit(w))) for w in base.tolist()] for q in qx.tolist()]
    assert torch.allclose(cosine_logits(qx, base, 7.0), torch.tensor(hand), atol=1e-5)


def test_untrained_predictor_is_the_identity_on_mean_activations():
    learner = fa.Qiao(Flat(4), base_classes=3)  # mlp, identity-initialised
    sx = torch.rand(4, 4)  # non-negative, as after a ReLU
    sy = torch.tensor([0, 0, 1, 1])
    w = learner.adapt(sx, sy)
    a = torch.nn.functional.normalize(sx, dim=-1)
    expected = torch.nn.functional.normalize(torch.stack([a[:2].mean(0), a[2:].mean(0)]), dim=-1)
    assert torch.allclose(w, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------ training mix
def test_training_mix_draws_base_weights_with_probability_one_minus_p():
    g = torch.Generator().manual_seed(0)
    base, pred = torch.zeros(50, 2), torch.ones(50, 2)
    n, base_draws = 0, 0
    for _ in range(400):
        rows, use = training_mix(base, pred, 0.7, generator=g)
        assert torch.equal(rows[use], pred[use]) and torch.equal(rows[~use], base[~use])
        base_draws += int((~use).sum())
        n += use.numel()
    sd = math.sqrt(0.3 * 0.7 / n)
    assert abs(base_draws / n - 0.3) < 4 * sd  # 20,000 draws: 0.3 +- 0.013


def test_meta_loss_mixes_rows_into_the_full_base_classifier():
    torch.manual_seed(0)
    learner = fa.Qiao(Flat(4), base_classes=6, mix_prob=0.6)
    sx, sy = torch.rand(6, 4), torch.arange(3).repeat_interleave(2)
    qx, qy = torch.rand(3, 4), torch.arange(3)
    classes = torch.tensor([5, 1, 3])
    batch = EpisodeWithClasses(Episode(sx, sy, qx, qy), classes)
    shares = [learner.meta_loss(batch)[1]["predicted_share"] for _ in range(600)]
    mean, sd = sum(shares) / len(shares), math.sqrt(0.6 * 0.4 / (3 * len(shares)))
    assert abs(mean - 0.6) < 4 * sd
    # p = 0: every row is the base row, so the loss is the base classifier's over all 6 classes
    # with the classes' global ids as targets; p = 1: the episode's rows are all predicted.
    for p in (0.0, 1.0):
        learner.mix_prob = p
        loss, _ = learner.meta_loss(batch)
        base = torch.nn.functional.normalize(learner.classifier.detach(), dim=-1)
        if p == 1.0:
            base = base.index_put((classes,), learner.adapt(sx, sy).detach())
        logits = learner.scale.detach() * torch.nn.functional.normalize(qx, dim=-1) @ base.T
        assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, classes[qy]), atol=1e-6)


def test_joint_setting_classifies_among_novel_and_base_classes():
    learner = fa.Qiao(small_conv(), base_classes=6).eval()
    sx, sy, qx, qy = episode()
    novel = learner.predict(learner.adapt(sx, sy), qx)
    learner.joint = True
    adapted = learner.adapt(sx, sy)
    joint = learner.predict(adapted, qx)
    assert adapted.shape == (3 + 6, 8) and joint.shape == (6, 3 + 6)
    assert torch.allclose(joint[:, :3], novel, atol=1e-6)  # novel classes first, then the base classes
    right_joint, right_novel = joint.argmax(-1) == qy, novel.argmax(-1) == qy
    assert not (right_joint & ~right_novel).any()  # among more classes a query can only lose


# ------------------------------------------------------------------------------------------ ncm
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_ncm_predicts_the_hand_computed_nearest_mean(distance):
    learner = fa.NCM(Flat(3), base_classes=4, distance=distance).eval()
    g = torch.Generator().manual_seed(1)
    sx, sy = torch.randn(8, 3, generator=g), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    qx = torch.randn(20, 3, generator=g)
    logits = learner.predict(learner.adapt(sx, sy), qx)
    means = [[sum(r[d] for r, y in zip(sx.tolist(), sy.tolist()) if y == k) / 2 for d in range(3)] for k in range(4)]

    def dist(q, m):
        if distance == "euclidean":
            return sum((a - b) ** 2 for a, b in zip(q, m))
        return 1 - sum(a * b for a, b in zip(_unit(q), _unit(m)))

    hand = torch.tensor([[-dist(q, m) for m in means] for q in qx.tolist()])
    assert torch.allclose(logits, hand, atol=1e-5)
    assert torch.equal(logits.argmax(-1), hand.argmax(-1))


def test_ncm_trains_only_the_classifier_on_labelled_batches():
    cfg = resolve("ncm", None, {"ways": 3, "shots": 1, "queries": 1, "pretrain_batch": 16})
    source = build_task_source(cfg, "train", 3, 1, 1)
    learner = fa.NCM.from_config(cfg, source.in_shape)
    assert learner.base_classes == source.num_classes == 1000
    gen = torch.Generator().manual_seed(0)
    for step in (1, 10_000):
        batch = learner.draw_batch(source, gen, 4, step)
        assert isinstance(batch, LabelledBatch) and batch.x.shape == (16, 1, 28, 28)


# ------------------------------------------------------------------------------------------ sampler
def test_sampler_gives_episodes_with_their_class_ids_and_labelled_batches():
    pool = make_pool(classes=12, per_class=10)
    sampler = fa.EpisodeSampler(pool, ways=4, shots=2, queries=3)
    plain = sampler.sample_batch(torch.Generator().manual_seed(5), 3)
    both = sampler.sample_batch_with_classes(torch.Generator().manual_seed(5), 3)
    for field in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(plain, field), getattr(both.episode, field))  # the same stream
    assert both.classes.shape == (3, 4)
    for (ep, classes) in both.tasks():
        decoded = torch.round(ep.support_x[:, 0, 0, 0] * 255).long()  # pixel (0, 0) holds the class
        assert torch.equal(decoded, classes[ep.support_y])
    batch = sampler.sample_labelled(torch.Generator().manual_seed(0), 500)
    assert torch.equal(torch.round(batch.x[:, 0, 0, 0] * 255).long(), batch.y)
    assert set(batch.y.tolist()) == set(range(12))


# ------------------------------------------------------------------------------------------ runs
def run(out, steps, *extra):
    return main(["train", "qiao", "--ways", "3", "--shots", "1", "--queries", "2", "--meta-batch", "2",
                 "--steps", str(steps), "--pretrain-steps", "3", "--pretrain-batch", "8", "--eval-ways", "3",
                 "--eval-episodes", "3", "--log-every", "1", "--checkpoint-every", "2", "--no-progress",
                 "--out", str(out), *extra])


def test_two_stages_in_one_run_resume_exactly_across_the_switch(tmp_path, capsys, monkeypatch):
    assert run(tmp_path / "a", 6) == 0
    banner = capsys.readouterr().out
    assert "iterations 1-3 pre-train a classifier of 1000 classes on batches of 8 images" in banner
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert ["predicted_share" in r for r in rows] == [False] * 3 + [True] * 3
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["base_classes"] == 1000
    # b: stopped by SIGTERM during iteration 2 (pre-training), resumed by the same command;
    # c: 4 iterations, then extended to 6 (resumed in the meta-training stage).
    real = trainer_mod.meta_train

    def interrupting(*args, **kw):
        def on_log(row):
            if row["step"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kw, on_log=on_log)

    monkeypatch.setattr("fastadapt.cli.train.meta_train", interrupting)
    assert run(tmp_path / "b", 6) == 130
    monkeypatch.setattr("fastadapt.cli.train.meta_train", real)
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT)["step"] == 2
    assert run(tmp_path / "b", 6) == 0
    assert run(tmp_path / "c", 4) == 0 and run(tmp_path / "c", 6) == 0
    wa = load_checkpoint(tmp_path / "a" / CHECKPOINT)["model"]
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    for other in "bc":
        wo = load_checkpoint(tmp_path / other / CHECKPOINT)["model"]
        assert wa.keys() == wo.keys() and all(torch.equal(wa[k], wo[k]) for k in wa), other
        lo = [json.loads(x)["loss"] for x in (tmp_path / other / "metrics.jsonl").read_text().splitlines()]
        assert la == lo, other
    # the evaluation options: --joint at eval time, from the saved run
    js = tmp_path / "joint.json"
    assert main(["eval", str(tmp_path / "a"), "--joint", "--episodes", "3", "--json", str(js), "--no-progress"]) == 0
    assert 0 <= json.loads(js.read_text())["accuracy"] <= 100
    learner, cfg = fa.load_run(tmp_path / "a", joint=True)
    assert cfg["joint"] and learner.joint and learner.base_classes == 1000


def test_pretraining_longer_than_the_run_is_refused(tmp_path, capsys):
    assert main(["train", "qiao", "--steps", "5", "--pretrain-steps", "5", "--no-progress",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--pretrain-steps 5 leaves no meta-training in --steps 5" in err and "\n" not in err.strip()
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="--mix-prob"):
        fa.Qiao(Flat(3), base_classes=4, mix_prob=1.5)


def test_briefly_trained_qiao_beats_chance_on_glyphs():
    cfg = resolve("qiao", None, {"ways": 10, "shots": 1, "queries": 5, "pretrain_batch": 64, "pretrain_steps": 80,
                                 "steps": 110, "seed": 0})
    source = build_task_source(cfg, "train", 10, 1, 5)
    learner = fa.Qiao.from_config(cfg, source.in_shape)
    test = build_task_source(cfg, "test", 5, 1, 5)
    # Random Conv-4 features already separate glyphs well (about 62 %), so training must also
    # beat the untrained learner on the same episodes, not only chance (20 %).
    untrained = fa.evaluate(learner, test, episodes=60, progress=False)
    fa.meta_train(learner, source, fa.TrainSettings(steps=110, lr=3e-3, seed=0, progress=False))
    res = fa.evaluate(learner, test, episodes=60, progress=False)
    assert res["accuracy"] > 55.0, res
    assert res["accuracy"] > untrained["accuracy"] + 4.0, (untrained, res)


def test_omniglot_preset_builds_without_reading_the_data():
    from pathlib import Path

    from fastadapt.config import load_yaml

    preset = load_yaml(Path(__file__).resolve().parents[1] / "configs" / "qiao_omniglot_5w1s.yaml")
    cfg = resolve("qiao", preset, {})
    learner = fa.Qiao.from_config(cfg, (1, 28, 28))
    assert learner.base_classes == 4112 and learner.pretrain_steps < cfg["steps"]
    assert (cfg["ways"], cfg["shots"], cfg["eval"]["ways"], cfg["eval"]["shots"]) == (60, 1, 5, 1)


def test_predictor_has_its_own_learning_rate():
    learner = fa.Qiao(Flat(4), base_classes=3, predictor_lr=2e-4)
    groups = learner.parameter_groups()
    assert groups[1]["lr"] == 2e-4 and {id(p) for p in groups[1]["params"]} == {id(p) for p in learner.predictor.parameters()}
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in learner.parameters()}
    assert fa.Qiao(Flat(4), base_classes=3, predictor_lr=None).parameter_groups() is None


def test_finetune_extractor_trains_extractor_and_base_rows_in_the_meta_stage():
    learner = fa.Qiao(small_conv(), base_classes=6, finetune_extractor=True, mix_prob=0.5)
    sx, sy, qx, qy = episode()
    loss, _ = learner.meta_loss(EpisodeWithClasses(Episode(sx, sy, qx, qy), torch.tensor([4, 0, 2])))
    loss.backward()
    assert all(p.grad is not None for p in learner.backbone.parameters() if p.requires_grad)
    assert learner.classifier.grad is not None and learner.classifier.grad.abs().sum() > 0
    # BatchNorm ran in eval mode (its running statistics untouched) and the train mode is back
    assert learner.backbone.training
    bn = next(m for m in learner.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
