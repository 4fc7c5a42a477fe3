"""MAML, FOMAML, ANIL and Meta-SGD against hand-written references (float64)."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadapt.errors import ConfigError, NonFiniteLossError
from fastadapt.methods import ANIL, FOMAML, IMAML, MAML, MetaSGD, Pretrained, Reptile
from fastadapt.methods.learned_init import LearnedInit
from fastadapt.methods.inner import BatchStatNorm, convert_batchnorm, map_tasks
from fastadapt.methods.maml import BodyHead
from fastadapt.models import MLP, Conv4
from fastadapt.tasks import Episode

DT = torch.float64


def tiny_model(seed: int = 0, d_in: int = 3, hidden: int = 4, ways: int = 3) -> BodyHead:
    torch.manual_seed(seed)
    return BodyHead(MLP(in_features=d_in, hidden=(hidden,)), nn.Linear(hidden, ways)).to(DT)


def conv_bn_model(seed: int = 0, ways: int = 3) -> BodyHead:
    """A two-block conv net with BatchNorm (running statistics on, to be converted) and max-pool."""
    torch.manual_seed(seed)
    body = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    with torch.no_grad():  # non-trivial affine parameters
        for m in body:
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return BodyHead(body, nn.Linear(16, ways)).to(DT)


def class_batch(tasks: int = 3, ways: int = 3, shots: int = 2, queries: int = 3, shape=(3,), seed: int = 1) -> Episode:
    g = torch.Generator().manual_seed(seed)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return Episode(torch.randn(tasks, ways * shots, *shape, generator=g, dtype=DT), sy,
                   torch.randn(tasks, ways * queries, *shape, generator=g, dtype=DT), qy)


def meta_grads(learner, batch) -> dict[str, torch.Tensor]:
    learner.zero_grad(set_to_none=True)
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    return {k: p.grad.clone() for k, p in learner.named_parameters()}


def train_step_grads(learner, batch) -> dict[str, torch.Tensor]:
    """Gradients as left by ``train_step`` (an optimiser with lr 0 leaves the weights alone)."""
    opt = torch.optim.SGD(learner.parameters(), lr=0.0)
    learner.train_step(batch, opt, 1)
    return {k: p.grad.clone() for k, p in learner.named_parameters()}


def hand_unroll(model: nn.Module, batch: Episode, steps: int, lr: float, first_order: bool = False,
                head_only: bool = False) -> dict[str, torch.Tensor]:
    """Second-order (or first-order) MAML written out with torch.autograd.grad, one task at a time."""
    model = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    theta = [p for _, p in model.named_parameters()]
    total = 0.0
    for ep in batch.tasks():
        if head_only:
            w, b = model.head.weight, model.head.bias
            fs, fq = model.body(ep.support_x), model.body(ep.query_x)
            for _ in range(steps):
                gw, gb = torch.autograd.grad(F.cross_entropy(F.linear(fs, w, b), ep.support_y), (w, b),
                                             create_graph=not first_order)
                w, b = w - lr * gw, b - lr * gb
            total = total + F.cross_entropy(F.linear(fq, w, b), ep.query_y)
            continue
        params = list(theta)
        for _ in range(steps):
            out = torch.func.functional_call(model, dict(zip(names, params)), (ep.support_x,))
            grads = torch.autograd.grad(F.cross_entropy(out, ep.support_y), params, create_graph=not first_order)
            params = [p - lr * g for p, g in zip(params, grads)]
        out = torch.func.functional_call(model, dict(zip(names, params)), (ep.query_x,))
        total = total + F.cross_entropy(out, ep.query_y)
    grads = torch.autograd.grad(total / batch.num_tasks, theta)
    return dict(zip(names, grads))


def assert_grads_close(a, b, rtol=1e-9, atol=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=f"gradient of {k} differs")


@pytest.mark.parametrize("batching", ["loop", "vmap", "grouped"])
def test_maml_meta_gradient_equals_hand_written_second_order_unroll(batching):
    model, batch = tiny_model(), class_batch()
    learner = MAML(copy.deepcopy(model), inner_steps=2, inner_lr=0.5, batching=batching)
    learner.group_size = 2  # grouped: a group of 2 tasks and one of 1
    expected = {f"model.{k}": v for k, v in hand_unroll(model, batch, 2, 0.5).items()}
    assert_grads_close(meta_grads(learner, batch), expected)
    assert_grads_close(train_step_grads(learner, batch), expected)
    # The first-order formula differs: the test can tell second order from first order.
    fo = hand_unroll(model, batch, 2, 0.5, first_order=True)
    assert max(float((expected[f"model.{k}"] - fo[k]).abs().max()) for k in fo) > 1e-4


def test_maml_meta_gradient_matches_finite_differences():
    model, batch = tiny_model(seed=3), class_batch(seed=4)
    learner = MAML(model, inner_steps=3, inner_lr=0.4, batching="loop")
    grads = meta_grads(learner, batch)
    g = torch.Generator().manual_seed(5)
    direction = {k: torch.randn(p.shape, generator=g, dtype=DT) for k, p in learner.named_parameters()}
    analytic = sum(float((grads[k] * direction[k]).sum()) for k in grads)
    eps = 1e-6
    values = []
    for sign in (1, -1):
        probe = copy.deepcopy(learner)
        with torch.no_grad():
            for k, p in probe.named_parameters():
                p.add_(sign * eps * direction[k])
            values.append(float(probe.meta_loss(batch)[0]))
    numeric = (values[0] - values[1]) / (2 * eps)
    assert numeric == pytest.approx(analytic, rel=1e-6)


def test_fomaml_gradient_equals_first_order_formula():
    model, batch = tiny_model(seed=2), class_batch(seed=7)
    steps, lr = 2, 0.5
    learner = FOMAML(copy.deepcopy(model), inner_steps=steps, inner_lr=lr, first_order=True, batching="loop")
    # mean_i grad L_q(phi_i), phi_i from plain gradient steps.
    names = [n for n, _ in model.named_parameters()]
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for ep in batch.tasks():
        phi = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _ in range(steps):
            phi = {n: v.requires_grad_() for n, v in phi.items()}
            loss = F.cross_entropy(torch.func.functional_call(model, phi, (ep.support_x,)), ep.support_y)
            g = torch.autograd.grad(loss, list(phi.values()))
            phi = {n: (v - lr * gi).detach() for (n, v), gi in zip(phi.items(), g)}
        phi = {n: v.requires_grad_() for n, v in phi.items()}
        gq = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, phi, (ep.query_x,)), ep.query_y),
                                 [phi[n] for n in names])
        for n, gi in zip(names, gq):
            expected[n] += gi / batch.num_tasks
    expected = {f"model.{k}": v for k, v in expected.items()}
    for batching in ("loop", "vmap"):
        learner.batching = batching
        assert_grads_close(meta_grads(learner, batch), expected)


@pytest.mark.parametrize("batching", ["loop", "vmap", "grouped"])
def test_anil_meta_gradient_equals_head_only_unroll(batching):
    model, batch = tiny_model(seed=5), class_batch(seed=2)
    learner = ANIL(copy.deepcopy(model), inner_steps=3, inner_lr=0.7, batching=batching)
    learner.group_size = 2
    expected = {f"model.{k}": v for k, v in hand_unroll(model, batch, 3, 0.7, head_only=True).items()}
    assert_grads_close(meta_grads(learner, batch), expected)
    assert_grads_close(train_step_grads(learner, batch), expected)
    # Only the head is adapted: the adapted parameters are the head's.
    assert set(learner.adapt(batch.support_x[0], batch.support_y[0])) == {"weight", "bias"}


def test_metasgd_learning_rates_receive_the_exact_gradient():
    # One inner step: phi = theta - alpha * g_s, so dL_q/dalpha = -g_s * grad L_q(phi) (elementwise).
    model, batch = tiny_model(seed=6), class_batch(tasks=2, seed=3)
    learner = MetaSGD(copy.deepcopy(model), inner_steps=1, inner_lr=0.3, batching="loop")
    with torch.no_grad():  # distinct rates per entry
        for p in learner.inner_lrs.parameters():
            p.uniform_(0.1, 0.5)
    grads = meta_grads(learner, batch)
    alphas = {k.replace("__", "."): p.detach() for k, p in learner.inner_lrs.items()}
    expected = {k: torch.zeros_like(v) for k, v in alphas.items()}
    for ep in batch.tasks():
        theta = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
        gs = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, theta, (ep.support_x,)),
                                                 ep.support_y), list(theta.values()))
        phi = {n: (theta[n] - alphas[n] * g).detach().requires_grad_() for n, g in zip(theta, gs)}
        gq = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, phi, (ep.query_x,)),
                                                 ep.query_y), list(phi.values()))
        for n, a, b in zip(theta, gs, gq):
            expected[n] += -a * b / batch.num_tasks
    for k, v in expected.items():
        got = grads[f"inner_lrs.{k.replace('.', '__')}"]
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, v, rtol=1e-9, atol=1e-12)
    # And a Meta-SGD step changes the learning rates.
    before = [p.detach().clone() for p in learner.inner_lrs.parameters()]
    opt = torch.optim.Adam(learner.parameter_groups(), lr=1e-2)
    learner.train_step(batch, opt, 1)
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.inner_lrs.parameters()))


@pytest.mark.parametrize("cls", [MAML, FOMAML, ANIL, MetaSGD])
def test_vmap_loop_and_grouped_give_the_same_second_order_gradients_through_batchnorm(cls):
    model = conv_bn_model()
    batch = class_batch(tasks=3, shape=(1, 8, 8), seed=11)
    kw = dict(inner_steps=2, inner_lr=0.4, first_order=cls is FOMAML)
    loop = cls(copy.deepcopy(model), batching="loop", **kw)
    vmap = cls(copy.deepcopy(model), batching="vmap", **kw)
    grouped = cls(copy.deepcopy(model), batching="grouped", **kw)
    grouped.group_size = 2
    g_loop, g_vmap = meta_grads(loop, batch), meta_grads(vmap, batch)
    assert_grads_close(g_loop, g_vmap, rtol=1e-10, atol=1e-13)
    assert_grads_close(train_step_grads(loop, batch), g_vmap, rtol=1e-10, atol=1e-13)
    assert_grads_close(train_step_grads(grouped, batch), g_vmap, rtol=1e-10, atol=1e-13)
    assert_grads_close(meta_grads(grouped, batch), g_vmap, rtol=1e-10, atol=1e-13)
    # BatchNorm's own parameters get a real gradient (the pitfall lives there).
    assert float(g_loop["model.body.1.weight"].abs().sum()) > 0


@pytest.mark.parametrize("cls", [MAML, FOMAML, ANIL, MetaSGD])
def test_grouped_conv4_with_fused_blocks_equals_the_loop(cls):
    # Conv-4 runs its grouped form in the channel layout, with the fused BatchNorm/ReLU/pool
    # blocks in the query pass (negative BatchNorm scales included); 32x32 images leave 2x2 maps,
    # so the features' flattening order counts.
    torch.manual_seed(3)
    model = BodyHead(Conv4(1, hidden=4, out_channels=4, image_size=32), nn.Linear(16, 3)).to(DT)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.0, 1.5)
    batch = class_batch(tasks=5, shape=(1, 32, 32), seed=14)
    kw = dict(inner_steps=2, inner_lr=0.4, first_order=cls is FOMAML)
    loop = cls(copy.deepcopy(model), batching="loop", **kw)
    grouped = cls(copy.deepcopy(model), batching="grouped", **kw)
    grouped.group_size = 3
    fused_calls = []
    with patch_fused(fused_calls):
        g_grouped = train_step_grads(grouped, batch)
    # 9 query images; 3 tasks' 4 channels side by side, then the last 2 tasks'; 4 blocks each
    assert fused_calls == [(9, 12)] * 4 + [(9, 8)] * 4
    assert_grads_close(g_grouped, train_step_grads(loop, batch), rtol=1e-9, atol=1e-12)


@contextlib.contextmanager
def patch_fused(calls):
    """Record the (images, channels) of every fused block that runs."""
    import fastadapt.models.conv4 as conv4

    original = conv4.affine_relu_pool

    def recording(z, *args):
        calls.append(tuple(z.shape[:2]))
        return original(z, *args)

    conv4.affine_relu_pool = recording
    try:
        yield
    finally:
        conv4.affine_relu_pool = original


def test_grouped_batching_refuses_what_it_cannot_run():
    batch = class_batch(tasks=2)
    torch.manual_seed(0)
    odd = BodyHead(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Linear(4, 3)).to(DT)
    with pytest.raises(ConfigError, match="no grouped form of Tanh"):  # when the learner is built
        MAML(odd, batching="grouped")
    learner = MAML(odd, batching="loop")
    learner.batching = "grouped"  # e.g. resumed from a run saved as grouped: refused before any update
    with pytest.raises(ConfigError, match="no grouped form of Tanh"):
        learner.meta_loss(batch)
    for cls in (IMAML, Reptile, Pretrained):
        with pytest.raises(ConfigError, match=f"--batching must be one of auto, vmap, loop for {cls.name}"):
            cls(tiny_model(), batching="grouped")
    with pytest.raises(ConfigError, match="--batching must be one of auto, vmap, loop for learned-init"):
        LearnedInit.from_config({"batching": "grouped", "dataset": "builtin-images"}, (3, 8, 8))
    headless = nn.Sequential(MLP(in_features=3, hidden=(4,)), nn.Linear(4, 3)).to(DT)
    with pytest.raises(ConfigError, match="body-and-head"):
        ANIL(headless, head="1", batching="grouped")
    with pytest.raises(ConfigError, match="--compile does not apply to --batching grouped"):
        FOMAML(tiny_model(), batching="grouped").compile_networks()


def test_maml_through_batchnorm_equals_hand_unroll_with_batch_statistics():
    # The reference uses nn.BatchNorm2d in training mode (batch statistics), task by task.
    model = conv_bn_model(seed=2)
    batch = class_batch(tasks=2, shape=(1, 8, 8), seed=12)
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = None
        if isinstance(m, nn.ReLU):
            m.inplace = False
    expected = {f"model.{k}": v for k, v in hand_unroll(reference, batch, 2, 0.3).items()}
    learner = MAML(copy.deepcopy(model), inner_steps=2, inner_lr=0.3, batching="vmap")
    assert_grads_close(meta_grads(learner, batch), expected, rtol=1e-9, atol=1e-12)


def test_gradient_checkpointing_gives_the_same_meta_gradient():
    model, batch = conv_bn_model(seed=4), class_batch(tasks=2, shape=(1, 8, 8), seed=13)
    plain = MAML(copy.deepcopy(model), inner_steps=3, inner_lr=0.3, batching="loop")
    ckpt = MAML(copy.deepcopy(model), inner_steps=3, inner_lr=0.3, grad_checkpoint=True)
    assert_grads_close(train_step_grads(plain, batch), train_step_grads(ckpt, batch), rtol=1e-10, atol=1e-13)


def test_batch_stat_norm_matches_batchnorm_in_training_mode_and_is_exact_under_vmap():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5).to(DT)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    ours = convert_batchnorm(copy.deepcopy(bn))
    assert isinstance(ours, BatchStatNorm) and ours.weight.dtype == DT
    x = torch.randn(4, 6, 5, 3, 3, dtype=DT)
    want = torch.stack([bn(xi) for xi in x])
    torch.testing.assert_close(torch.func.vmap(ours)(x), want)
    torch.testing.assert_close(torch.stack([ours(xi) for xi in x]), want)


def test_adapt_and_predict_use_the_training_inner_loop():
    model, batch = tiny_model(seed=8), class_batch(tasks=1, seed=9)
    learner = MAML(copy.deepcopy(model), inner_steps=2, inner_lr=0.5)
    ep = batch.task(0)
    params = {n: p.detach() for n, p in model.named_parameters()}
    for _ in range(2):
        params = {n: v.requires_grad_() for n, v in params.items()}
        loss = F.cross_entropy(torch.func.functional_call(model, params, (ep.support_x,)), ep.support_y)
        g = torch.autograd.grad(loss, list(params.values()))
        params = {n: (v - 0.5 * gi).detach() for (n, v), gi in zip(params.items(), g)}
    adapted = learner.adapt(ep.support_x, ep.support_y)
    for n in params:
        torch.testing.assert_close(adapted[n], params[n])
    torch.testing.assert_close(learner.predict(adapted, ep.query_x),
                               torch.func.functional_call(model, params, (ep.query_x,)))


def test_fewer_ways_at_evaluation_use_the_first_rows_of_the_head():
    model = tiny_model(ways=5)
    learner = MAML(model, inner_steps=1, inner_lr=0.5)
    ep = class_batch(tasks=1, ways=3, seed=3).task(0)
    out = learner.predict(learner.adapt(ep.support_x, ep.support_y), ep.query_x)
    assert out.shape == (9, 3)
    too_many = class_batch(tasks=1, ways=6, seed=3).task(0)
    with pytest.raises(ConfigError, match="--ways 5 or fewer"):
        learner.adapt(too_many.support_x, too_many.support_y)


def test_nonfinite_inner_loss_stops_naming_the_step_and_task():
    learner = MAML(tiny_model(), inner_steps=2, inner_lr=0.5)
    batch = class_batch(tasks=4)
    batch.support_x[2, 0, 0] = float("nan")
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    before = [p.detach().clone() for p in learner.parameters()]
    learner.group_size = 3
    for batching in ("loop", "vmap", "grouped"):
        learner.batching = batching
        with pytest.raises(NonFiniteLossError, match="inner step 1 of task 2"):
            learner.train_step(batch, opt, 7)
    # A query loss that is not finite, in the second group: named by its task too.
    late = class_batch(tasks=5)
    late.query_x[4, 0, 0] = float("inf")
    learner.batching = "grouped"
    with pytest.raises(NonFiniteLossError, match="task 4"):
        learner.train_step(late, opt, 8)
    assert all(torch.equal(a, b) for a, b in zip(before, learner.parameters()))
    with pytest.raises(NonFiniteLossError, match="inner step 1 of task 0"):
        learner.adapt(batch.support_x[2], batch.support_y[2])


@pytest.mark.parametrize("kwargs, flag", [
    ({"inner_steps": 0}, "--inner-steps"), ({"inner_steps": -2}, "--inner-steps"), ({"inner_steps": 1.5}, "--inner-steps"),
    ({"inner_lr": 0.0}, "--inner-lr"), ({"inner_lr": -0.1}, "--inner-lr"), ({"inner_lr": math.nan}, "--inner-lr"),
    ({"inner_lr": math.inf}, "--inner-lr"), ({"batching": "threads"}, "--batching"),
    ({"grad_checkpoint": True, "batching": "vmap"}, "--grad-checkpoint"),
    ({"grad_checkpoint": True, "batching": "grouped"}, "--grad-checkpoint"),
])
def test_bad_options_are_config_errors(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        MAML(tiny_model(), **kwargs)


def test_batchnorm_with_running_statistics_is_handled_or_explained():
    model = conv_bn_model()
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    learner = MAML(model, batching="vmap")  # converted: batch statistics, no running ones
    assert not any(isinstance(m, nn.BatchNorm2d) for m in learner.modules())
    assert not any("running" in k for k in learner.state_dict())
    # A raw model with running statistics under vmap gets an error that says what to change.
    raw = conv_bn_model()
    x = torch.randn(2, 3, 1, 8, 8, dtype=DT)
    with pytest.raises(ConfigError, match="convert_batchnorm"):
        map_tasks(lambda xi: torch.func.functional_call(raw, dict(raw.named_parameters()) | dict(raw.named_buffers()),
                                                        (xi,)), "vmap", x)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_auto_batching_is_decided_once_by_a_fixed_rule_and_computes_each_task_once(kind):
    if kind == "mlp":
        model, batch, expected_mode = tiny_model(seed=9), class_batch(seed=10), "vmap"
    else:
        model, expected_mode = conv_bn_model(seed=9), "loop"
        g = torch.Generator().manual_seed(10)
        batch = Episode(torch.randn(2, 3, 1, 8, 8, generator=g, dtype=DT), torch.arange(3).repeat(2, 1),
                        torch.randn(2, 6, 1, 8, 8, generator=g, dtype=DT), torch.arange(3).repeat(2, 2))
    auto = MAML(copy.deepcopy(model), inner_steps=2, inner_lr=0.5, batching="auto")
    calls = []
    task = auto._task
    auto._task = lambda *a: calls.append(1) or task(*a)
    forced = MAML(copy.deepcopy(model), inner_steps=2, inner_lr=0.5, batching=expected_mode)
    expected = train_step_grads(forced, batch)
    got = train_step_grads(auto, batch)
    # No timing runs: every task is computed once (loop) or in one batched call (vmap).
    assert len(calls) == (batch.num_tasks if expected_mode == "loop" else 1)
    assert auto.batching == expected_mode and auto.run_state() == {"batching": expected_mode}
    for k in expected:  # the same path as asking for it: the same bits, not merely close
        assert torch.equal(got[k], expected[k]), k
    other = "vmap" if expected_mode == "loop" else "loop"
    resumed = MAML(copy.deepcopy(model), inner_steps=2, inner_lr=0.5, batching=other)
    with pytest.raises(ConfigError, match=f"resume with --batching {expected_mode}"):
        resumed.load_run_state(auto.run_state())
