"""TENT, BN adaptation and TTT: what they change, what they optimise, and their references."""

from __future__ import annotations

from copy import deepcopy

import numpy as np
import pytest
import torch
from torch import nn

from fastadapt.errors import ConfigError, FastAdaptError
from fastadapt.models.resnet_cifar import ResNetCifar
from fastadapt.tta import BNAdapt, TTT, Tent, collect_params, configure_model, setup_tent, softmax_entropy
from fastadapt.tta.augment import random_crop_flip, rotate_batch
from fastadapt.measure.stats import mean_ci95
from fastadapt.tta.evaluate import build_adapter, run_stream, stream_order


def small_bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10),
    )


def shifted_batch(n: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.rand(n, 3, 16, 16, generator=g) + 0.5 + 0.2 * torch.randn(n, 3, 16, 16, generator=g)


def _pretend_trained(model: nn.Module) -> nn.Module:
    """Give BatchNorm non-trivial running statistics, as a trained source model has."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(64, 3, 16, 16))
    return model.eval()


def test_tent_changes_only_batchnorm_affine_parameters():
    model = _pretend_trained(small_bn_net())
    before = {k: v.clone() for k, v in model.named_parameters()}
    tent = setup_tent(model, lr=1e-2)
    tent(shifted_batch(16))
    bn_names = set(collect_params(model)[1])
    assert len(bn_names) == 6  # weight + bias of three BatchNorm layers
    for name, p in model.named_parameters():
        if name in bn_names:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name
            assert not p.requires_grad


def test_tent_step_matches_hand_written_adam_on_entropy():
    model = _pretend_trained(small_bn_net())
    x = shifted_batch()
    ref = deepcopy(model).train()  # train mode: BatchNorm normalises with the batch statistics
    params = {n: p for n, p in ref.named_parameters()}
    names = collect_params(deepcopy(model))[1]
    loss = softmax_entropy(ref(x)).mean()
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    lr, eps = 1e-3, 1e-8
    # Adam's first step: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps).
    expected = {n: params[n].detach() - lr * g / (g.abs() + eps) for n, g in zip(names, grads)}
    tent = setup_tent(model, lr=lr)
    out = tent(x)
    torch.testing.assert_close(out, ref(x).detach(), rtol=1e-5, atol=1e-6)  # prediction before the update
    for n, p in model.named_parameters():
        if n in expected:
            torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-7)


def test_tent_lowers_entropy_on_a_shifted_batch():
    model = _pretend_trained(small_bn_net())
    tent = setup_tent(model, lr=1e-3)
    x = shifted_batch()
    h0 = float(softmax_entropy(tent(x)).mean())
    with torch.no_grad():
        h1 = float(softmax_entropy(model(x)).mean())
    assert h1 < h0


def test_tent_reset_restores_weights_and_optimizer_exactly():
    model = _pretend_trained(small_bn_net())
    tent = setup_tent(model, lr=1e-2)
    initial = deepcopy(model.state_dict())
    x = shifted_batch()
    first = tent(x)
    for _ in range(3):
        tent(x)
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())
    tent.reset()
    for k, v in model.state_dict().items():
        assert torch.equal(initial[k], v), k
    assert tent.optimizer.state_dict()["state"] == {}
    torch.testing.assert_close(tent(x), first, rtol=0, atol=0)


def test_tent_episodic_resets_before_each_batch():
    model = _pretend_trained(small_bn_net())
    tent = setup_tent(model, lr=1e-2, episodic=True)
    x = shifted_batch()
    a, b = tent(x), tent(x)
    assert torch.equal(a, b)
    online = setup_tent(_pretend_trained(small_bn_net()), lr=1e-2)
    assert not torch.equal(online(x), online(x))


def test_tent_on_models_without_batchnorm_is_a_clear_error():
    gn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Flatten(), nn.LazyLinear(10))
    for call in (lambda: configure_model(gn), lambda: collect_params(gn), lambda: setup_tent(gn),
                 lambda: BNAdapt(gn), lambda: Tent(gn, torch.optim.SGD(gn.parameters(), lr=0.1))):
        with pytest.raises(ConfigError) as info:
            call()
        msg = str(info.value)
        assert "BatchNorm" in msg and "\n" not in msg and isinstance(info.value, FastAdaptError)


def test_tent_refuses_an_unconfigured_model():
    model = small_bn_net()
    with pytest.raises(ConfigError, match="configure_model"):
        Tent(model, torch.optim.Adam(model.parameters(), lr=1e-3))


def test_tent_wraps_a_resnet_cifar_with_rotation_head():
    model = ResNetCifar(depth=8, rotation_head=True)
    tent = setup_tent(model)
    out = tent(torch.rand(8, 3, 32, 32))
    assert out.shape == (8, 10)


def test_bn_adapt_uses_test_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3))
    model[0].weight.data = torch.tensor([1.5, 0.5, 2.0])
    model[0].bias.data = torch.tensor([0.1, -0.2, 0.3])
    model[0].running_mean.fill_(5.0)
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    out = BNAdapt(deepcopy(model))(x)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    ref = (x - mean) / torch.sqrt(var + 1e-5) * model[0].weight.view(1, -1, 1, 1) + model[0].bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    adapter = BNAdapt(deepcopy(model))
    adapter(x)
    assert adapter.model[0].running_mean is None  # nothing accumulates across batches


# ------------------------------------------------------------------------------------- TTT

def test_rotation_labels_are_counter_clockwise_quarter_turns():
    img = torch.arange(2 * 5 * 5, dtype=torch.float32).view(1, 2, 5, 5)
    x = img.repeat(4, 1, 1, 1)
    out = rotate_batch(x, torch.tensor([0, 1, 2, 3]))
    ref = img[0].numpy()
    for k in range(4):
        np.testing.assert_array_equal(out[k].numpy(), np.rot90(ref, k, axes=(1, 2)))
    # 90 degrees counter-clockwise: the top-right pixel moves to the top-left corner
    assert out[1, 0, 0, 0] == img[0, 0, 0, 4]
    assert len({tuple(o.flatten().tolist()) for o in out}) == 4


def test_random_crop_flip_is_a_padded_crop():
    x = torch.rand(6, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, g, padding=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        found = False
        for dy in range(5):
            for dx in range(5):
                crop = padded[i, :, dy : dy + 8, dx : dx + 8]
                found |= torch.equal(out[i], crop) or torch.equal(out[i], crop.flip(-1))
        assert found


def _ttt_model() -> ResNetCifar:
    torch.manual_seed(0)
    return ResNetCifar(depth=8, norm="gn", rotation_head=True).eval()


def _reference_ttt_step(model: ResNetCifar, image: torch.Tensor, copies: int, lr: float, seed: int,
                        head: str) -> ResNetCifar:
    """One hand-written TTT step: the authors' adapt_single with SGD over ``ssh`` (trunk + rotation
    head, ``ssh.train()``) or, for ``head="frozen"``, over the trunk only (``ssh.eval(); ext.train()``)."""
    ref = deepcopy(model).eval()
    gen = torch.Generator().manual_seed(seed)
    x = random_crop_flip(image.unsqueeze(0).expand(copies, *image.shape), gen)
    labels = torch.randint(0, 4, (copies,), generator=gen)
    modules = [ref.trunk, ref.rot_head] if head == "train" else [ref.trunk]
    for m in modules:
        m.train()
    params = [p for m in modules for p in m.parameters()]
    loss = torch.nn.functional.cross_entropy(ref.rot_head(ref.trunk(rotate_batch(x, labels))), labels)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g
    return ref.eval()


@pytest.mark.parametrize("head", ["train", "frozen"])
def test_ttt_step_matches_the_authors_update(head):
    torch.manual_seed(0)
    model = _pretend_trained(ResNetCifar(depth=8, norm="bn", rotation_head=True))
    before = deepcopy(model.state_dict())
    image = torch.rand(3, 16, 16)
    expected = _reference_ttt_step(model, image, copies=8, lr=0.05, seed=3, head=head)
    ttt = TTT(model, online=True, steps=1, copies=8, lr=0.05, seed=3, head=head)
    ttt.adapt(image)
    got = model.state_dict()
    for k, v in expected.state_dict().items():  # weights and BatchNorm statistics
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    for k, v in got.items():
        if k.startswith("head."):  # the classification head is never touched
            assert torch.equal(v, before[k]), k
        if k.startswith("rot_head.") and v.is_floating_point():
            assert torch.equal(v, before[k]) == (head == "frozen"), k


def test_ttt_default_trains_trunk_and_rotation_head_and_lowers_rotation_loss():
    model = _ttt_model()
    cls_head = {k: v.clone() for k, v in model.named_parameters() if k.startswith("head.")}
    branch = {k: v.clone() for k, v in model.named_parameters() if not k.startswith("head.")}
    image = torch.rand(3, 16, 16)

    def full_rotation_loss():
        x = image.unsqueeze(0).repeat(4, 1, 1, 1)
        labels = torch.arange(4)
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model.forward_rotation(rotate_batch(x, labels)), labels))

    before = full_rotation_loss()
    ttt = TTT(model, online=False, steps=10, copies=16, lr=1e-2)
    ttt.adapt(image)
    assert full_rotation_loss() < before
    for k, v in model.named_parameters():
        if k in cls_head:
            assert torch.equal(v, cls_head[k]), k
    for part in ("trunk.", "rot_head."):
        assert any(not torch.equal(v, branch[k]) for k, v in model.named_parameters() if k.startswith(part)), part


def test_ttt_frozen_head_trains_only_the_trunk():
    model = _ttt_model()
    heads = {k: v.clone() for k, v in model.named_parameters() if not k.startswith("trunk.")}
    ttt = TTT(model, online=False, steps=3, copies=8, lr=1e-2, head="frozen")
    ttt.adapt(torch.rand(3, 16, 16))
    for k, v in model.named_parameters():
        if k in heads:
            assert torch.equal(v, heads[k]), k
        else:
            assert v.requires_grad
    with pytest.raises(ConfigError, match="rotation-head"):
        TTT(_ttt_model(), head="fixed")


def test_ttt_standard_resets_per_image_online_keeps_weights():
    a, b, c = torch.rand(3, 3, 16, 16).unbind(0)
    std1 = TTT(_ttt_model(), online=False, steps=2, copies=4, seed=5)(torch.stack([a, b]))
    std2 = TTT(_ttt_model(), online=False, steps=2, copies=4, seed=5)(torch.stack([c, b]))
    torch.testing.assert_close(std1[1], std2[1], rtol=0, atol=0)  # b's prediction ignores what came before
    on1 = TTT(_ttt_model(), online=True, steps=2, copies=4, seed=5)(torch.stack([a, b]))
    on2 = TTT(_ttt_model(), online=True, steps=2, copies=4, seed=5)(torch.stack([c, b]))
    assert not torch.equal(on1[1], on2[1])
    model = _ttt_model()
    source = deepcopy(model.state_dict())
    ttt = TTT(model, online=True, steps=2, copies=4)
    ttt(torch.stack([a, b]))
    ttt.reset()
    for k, v in model.state_dict().items():
        assert torch.equal(v, source[k]), k


def test_ttt_batchnorm_modes():
    torch.manual_seed(0)
    image = torch.rand(3, 16, 16)
    for bn, head, moving in (("frozen", "train", ()), ("train", "train", ("trunk.", "rot_head.")),
                             ("train", "frozen", ("trunk.",))):
        model = ResNetCifar(depth=8, norm="bn", rotation_head=True).eval()
        stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        ttt = TTT(model, online=True, steps=2, copies=4, bn=bn, head=head)
        ttt(image.unsqueeze(0))
        assert not model.training
        for part in ("trunk.", "rot_head.", "head."):  # the classification head's statistics always stay
            changed = any(not torch.equal(v, stats[k]) for k, v in model.state_dict().items()
                          if k in stats and k.startswith(part))
            assert changed == (part in moving), (bn, head, part)
        ttt.reset()
        for k, v in model.state_dict().items():
            if k in stats:
                assert torch.equal(v, stats[k]), k
    with pytest.raises(ConfigError):
        TTT(_ttt_model(), bn="batch")


def test_ttt_needs_a_rotation_head():
    with pytest.raises(ConfigError, match="rotation head"):
        TTT(ResNetCifar(depth=8))


# ----------------------------------------------------------------------------- source training

def test_joint_source_training_step_uses_separate_clean_and_rotated_passes(tmp_path):
    """One step of train_source against the authors' loop: loss = CE(net(x), y) + CE(ssh(rot(x)), r),
    each a forward pass of its own, so BatchNorm sees the clean and the rotated batch separately."""
    from fastadapt.tta.augment import random_rotation_labels, to_float
    from fastadapt.tta.train_source import DEFAULTS, load_source_model, model_from_config, train_source

    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (8,), generator=g)
    cfg = {**DEFAULTS, "rotation_head": True, "epochs": 1, "batch_size": 8, "lr": 0.05, "seed": 0}
    train_source(cfg, tmp_path / "run", images, labels, progress=False)
    got, _ = load_source_model(tmp_path / "run")

    torch.manual_seed(0)
    ref = model_from_config(cfg).train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(8, generator=gen)
    x = random_crop_flip(to_float(images[perm]), gen)
    r = random_rotation_labels(8, gen)
    ce = torch.nn.functional.cross_entropy
    loss = ce(ref(x), labels[perm]) + ce(ref.rot_head(ref.trunk(rotate_batch(x, r))), r)
    opt.zero_grad()
    loss.backward()
    opt.step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, rtol=1e-4, atol=1e-6, msg=k)


# --------------------------------------------------------------------------- evaluation loop

@pytest.mark.parametrize("method", ["source", "bn", "tent", "ttt", "ttt-online"])
def test_every_method_runs_a_stream_and_leaves_the_source_model_alone(method):
    model = ResNetCifar(depth=8, rotation_head=True).eval()
    state = deepcopy(model.state_dict())
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 10, (10,))
    adapter = build_adapter(method, model, {"steps": 1, "copies": 4})
    r = run_stream(adapter, images, labels, batch_size=4, progress=False)
    assert r["images"] == 10 and 0 <= r["error"] <= 100 and r["ms_per_image"] > 0 and r["peak_mem_mb"] > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_stream_order_is_seeded_subset():
    a, b = stream_order(100, 0, 10), stream_order(100, 0, 10)
    assert torch.equal(a, b) and len(a) == 10 and len(set(a.tolist())) == 10
    assert not torch.equal(stream_order(100, 1, 10), a)
    with pytest.raises(ConfigError):
        build_adapter("tent++", ResNetCifar(depth=8))


class _FixedOutcomes(nn.Module):
    """Predicts class 1 for the images of batch ``k`` that ``wrong(k, i)`` says; the label is 0."""

    def __init__(self, wrong):
        super().__init__()
        self.wrong, self.k = wrong, 0

    def forward(self, x):
        w = torch.tensor([self.wrong(self.k, i) for i in range(len(x))])
        self.k += 1
        return torch.stack([(~w).float(), w.float()], 1)


def _stream(wrong, ci, n=128, batch=16):
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    return run_stream(_FixedOutcomes(wrong), images, torch.zeros(n, dtype=torch.long), batch, progress=False, ci=ci)


def test_batch_ci_is_wider_when_errors_are_correlated_within_batches():
    from scipy.stats import t

    wrong = lambda k, i: k % 2 == 0  # whole batches right or wrong: 8 batches, not 128 trials
    per_image, per_batch = _stream(wrong, "image"), _stream(wrong, "batch")
    assert per_image["error"] == per_batch["error"] == 50.0
    assert per_image["ci95"] == pytest.approx(1.96 * np.std([100.0] * 64 + [0.0] * 64, ddof=1) / np.sqrt(128))
    batch_errors = [100.0, 0.0] * 4
    assert per_batch["ci95"] == pytest.approx(t.ppf(0.975, 7) * np.std(batch_errors, ddof=1) / np.sqrt(8))
    assert per_batch["ci95"] > 4 * per_image["ci95"]
    assert per_batch["ci_method"].startswith("batch means") and per_image["ci_method"].startswith("per-image")
    # half of every batch wrong: batches agree exactly, so the batch-level interval is narrower
    balanced = _stream(lambda k, i: i % 2 == 0, "batch")
    assert balanced["error"] == 50.0 and balanced["ci95"] == 0.0 < per_image["ci95"]


def test_batch_ci_weights_a_short_last_batch_and_needs_two_batches():
    from fastadapt.measure.stats import batch_mean_ci95

    values = [100.0] * 10 + [0.0] * 10 + [100.0] * 5  # batches of 10, 10, 5
    mean, half = batch_mean_ci95(values, 10)
    assert mean == 60.0
    sizes, means = np.array([10, 10, 5]), np.array([100.0, 0.0, 100.0])
    var = 3 / 2 * np.sum((sizes * (means - 60.0)) ** 2) / 25 ** 2
    from scipy.stats import t

    assert half == pytest.approx(t.ppf(0.975, 2) * np.sqrt(var))
    assert batch_mean_ci95([0.0, 100.0], 4) == (50.0, None)
    one = _stream(lambda k, i: i == 0, "batch", n=8, batch=8)
    assert one["ci95"] is None and "single batch" in one["ci_method"]


@pytest.mark.parametrize("method,kind", [("source", "per-image"), ("ttt", "per-image"), ("bn", "batch means"),
                                         ("tent", "batch means"), ("ttt-online", "batch means")])
def test_each_method_records_its_ci_method(method, kind, monkeypatch):
    from fastadapt.tta import evaluate as tta_eval
    from fastadapt.measure.stats import batch_mean_ci95
    from fastadapt.tta.evaluate import evaluate_run, unpack_wrong

    model = ResNetCifar(depth=8, rotation_head=True).eval()
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 10, (12,))
    monkeypatch.setattr(tta_eval, "load_source_model", lambda run, device: (model, {"arch": "resnet8"}))
    monkeypatch.setattr(tta_eval, "load_cifar10", lambda split, data_dir, progress=True: (images, labels))
    r = evaluate_run("run", method, ["clean"], 5, batch_size=4, options={"steps": 1, "copies": 2}, progress=False)[0]
    assert r["ci_method"].startswith(kind)
    wrong = [100.0 * w for w in unpack_wrong(r["wrong_bits"], 12)]
    assert sum(wrong) / 12 == pytest.approx(r["error"])
    ref = mean_ci95(wrong)[1] if kind == "per-image" else batch_mean_ci95(wrong, 4)[1]
    assert r["ci95"] == pytest.approx(ref)


def test_paired_difference_to_the_source_per_image_per_batch_and_over_corruptions():
    from scipy.stats import t

    from fastadapt.tta.evaluate import pack_wrong, paired_difference

    def cell(wrong, batch=4):
        return {"images": len(wrong), "batch_size": batch, "wrong_bits": pack_wrong(wrong)}

    src = cell([True] * 8)
    better = cell([False] * 8)
    d = paired_difference(better, src, "batch")
    assert d["difference"] == -100.0 and d["ci95"] == 0.0 and d["significant"] is True
    same = paired_difference(src, src, "image")
    assert same["difference"] == 0.0 and same["significant"] is False
    # batch 1 all better, batch 2 unchanged: two batch differences, -100 and 0
    mixed = paired_difference(cell([False] * 4 + [True] * 4), src, "batch")
    assert mixed["difference"] == -50.0
    assert mixed["ci95"] == pytest.approx(t.ppf(0.975, 1) * np.std([-100.0, 0.0], ddof=1) / np.sqrt(2))
    assert mixed["significant"] is False and mixed["ci_method"].startswith("paired, batch means")
    per_image = paired_difference(cell([False] * 4 + [True] * 4), src, "image")
    assert per_image["ci95"] == pytest.approx(mean_ci95([-100.0] * 4 + [0.0] * 4)[1])
    # over corruptions: each image's differences are averaged first
    two = paired_difference([cell([False] * 8), cell([True] * 8)], [src, src], "image")
    assert two["difference"] == -50.0 and two["ci95"] == 0.0 and two["results"] == 2
    with pytest.raises(ConfigError):
        paired_difference(cell([False] * 4), src, "image")
