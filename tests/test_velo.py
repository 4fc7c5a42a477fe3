"""The VeLO-style rule, the evolution-strategies meta-gradients and the mixed family of small tasks."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from fastadapt.optim import Layout, LearnedOptimizer, LearnedRule, Trajectory, build_rule, load_rule, save_rule, unroll
from fastadapt.optim.es import es_gradient, pes_gradient
from fastadapt.optim.unroll import META_GRADIENTS, truncated_gradient
from fastadapt.optim.velo import VeLORule, progress_features, segment_apply, segment_mean_square
from fastadapt.registry import LEARNED_RULES, OPTIMIZEES
from fastadapt.tasks.optimizee import make_problem, quadratic

SHAPES = [(5, 3), (3,), (2, 2, 2, 2), (1,), (7, 1, 3)]


def _flat(shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(s, generator=g) for s in shapes]
    layout = Layout.of(tensors)
    return layout, layout.flatten(tensors), torch.randn(layout.numel, generator=g) * 0.1


def _trained_like(rule: VeLORule, seed: int = 1) -> VeLORule:
    """Random (non-zero) weights everywhere, so every path of the rule matters in a comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rule.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return rule


def test_registered_with_the_learned_rules():
    assert "velo" in LEARNED_RULES and isinstance(build_rule("velo"), VeLORule)
    assert {"es", "pes"} <= set(META_GRADIENTS)


def test_segment_reductions_equal_a_loop_over_tensors():
    layout, flat, _ = _flat()
    rows = torch.stack([flat, flat * 2 - 1, flat.abs()])
    sq = segment_mean_square(rows, layout.sizes)
    values = torch.randn(3, layout.num_tensors)
    scaled = segment_apply("mul", rows.clone(), values, layout.sizes)
    shifted = segment_apply("add", rows.clone(), values, layout.sizes)
    for t, part in enumerate(torch.split(rows, layout.sizes, dim=1)):
        torch.testing.assert_close(sq[:, t], part.pow(2).mean(1))
        torch.testing.assert_close(scaled[:, sum(layout.sizes[:t]):sum(layout.sizes[:t + 1])], part * values[:, t:t + 1])
        torch.testing.assert_close(shifted[:, sum(layout.sizes[:t]):sum(layout.sizes[:t + 1])], part + values[:, t:t + 1])


def _reference_update(rule: VeLORule, grad, params, state, layout, progress):
    """The rule written tensor by tensor with a Python loop (statistics per tensor, then its MLP)."""
    grad = grad.clamp(-1000, 1000)
    betas = torch.tensor(rule.momenta)[:, None]
    m = betas * state["m"] + (1 - betas) * grad
    v = rule.rms_beta * state["v"] + (1 - rule.rms_beta) * grad ** 2
    feats, stats = [], []
    for t, (g, p, mt, vt) in enumerate(zip(*(x.split(layout.sizes, dim=-1) for x in (grad, params, m, v)))):
        r = (vt + 1e-12).rsqrt()
        x = torch.stack([p, g, g.clamp(-0.1, 0.1), *mt, vt, *(mt * r), r, g * r])
        ms = x.pow(2).mean(1)
        rank = F.one_hot(torch.tensor(min(len(layout.shapes[t]), 4)), 5).float()
        stats.append(torch.cat([progress_features(progress), (0.1 * torch.log(ms + 1e-30)).clamp(-5, 5),
                                torch.tensor([0.1 * math.log(layout.sizes[t])]), rank]))
        feats.append((x, ms))
    lr_log, gain_log, bias, h, c = rule.tensor_controls(torch.stack(stats), state["h"], state["c"])
    updates = []
    for t, (x, ms) in enumerate(feats):
        xn = x * ((ms + 1e-12).rsqrt() * gain_log[t].exp())[:, None]
        a = rule.w1 @ xn
        hid = torch.relu(a[:rule.hidden] + (rule.b1 + bias[t])[:, None])
        out = rule.w2 @ hid + a[rule.hidden:] + rule.b2[:, None]
        updates.append(-rule.step_mult * lr_log[t].exp() * out[0] * torch.exp(rule.exp_mult * out[1]))
    return torch.cat(updates), {"m": m, "v": v, "h": h, "c": c}


def test_velo_update_equals_a_per_tensor_loop_reference():
    layout, flat, grad = _flat()
    rule = _trained_like(VeLORule(hidden=6, lstm_hidden=8))
    state = rule.init_state(flat, layout)
    for step in range(3):  # a few steps, so the moments and the LSTM state are non-trivial
        with torch.no_grad():
            update, new = rule(grad * (step + 1), flat, state, layout, step / 10)
            ref, ref_state = _reference_update(rule, grad * (step + 1), flat, state, layout, step / 10)
        torch.testing.assert_close(update, ref, rtol=1e-4, atol=1e-7)
        for k in ref_state:
            torch.testing.assert_close(new[k], ref_state[k], rtol=1e-4, atol=1e-6)
        state, flat = new, flat + update
    # the same with autograd on (the meta-training path: out-of-place segment ops)
    params = flat.clone().requires_grad_(True)
    update, _ = rule(grad, params, state, layout, 0.5)
    with torch.no_grad():
        ref, _ = _reference_update(rule, grad, flat, state, layout, 0.5)
    torch.testing.assert_close(update.detach(), ref, rtol=1e-4, atol=1e-7)
    update.sum().backward()
    assert torch.isfinite(params.grad).all() and all(torch.isfinite(p.grad).all() for p in rule.parameters())


class _CountCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _calls(rule, shapes):
    layout, flat, grad = _flat(shapes)
    state = rule.init_state(flat, layout)
    with torch.no_grad(), _CountCalls() as mode:
        rule(grad, flat, state, layout, 0.3)
    return mode.calls


def test_forward_does_not_loop_over_tensors():
    """The number of torch calls of a step does not grow with the number of tensors."""
    counts = [_calls(VeLORule(), shapes) for shapes in ([(40,)], [(4,)] * 10, [(2, 3), (7,)] * 20)]
    assert counts[0] == counts[1] == counts[2]


def test_untrained_rule_makes_small_adam_like_steps_and_does_not_blow_up_a_quadratic():
    rule = build_rule("velo")
    g = torch.Generator().manual_seed(0)
    traj = Trajectory.start(rule, make_problem("quadratic", g))
    unroll(rule, traj, 100, 100, g, meta_grad=False)
    assert all(math.isfinite(x) for x in traj.losses)
    assert max(traj.losses) <= traj.losses[0] * 1.01 and traj.losses[-1] < 0.25 * traj.losses[0]
    # the first step is the normalised sign-like Adam direction times step_mult
    layout, flat, grad = _flat()
    update, _ = rule(grad, flat, rule.init_state(flat, layout), layout, 0.0)
    assert (torch.sign(update) == -torch.sign(grad)).all()
    assert update.abs().max() < 10 * rule.step_mult


def test_learned_optimizer_trains_a_module_and_its_state_dict_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    rule = _trained_like(VeLORule(hidden=4, lstm_hidden=8), seed=3)
    with torch.no_grad():  # keep it a sane optimizer: the Adam-like skip path dominates
        rule.w2.mul_(0.01)
        rule.controls.weight.mul_(0.01)
        rule.controls.bias.zero_()
        rule.w1[rule.hidden:].zero_()
        rule.w1[rule.hidden, rule.adam_feature] = 1.0
    save_rule(rule, tmp_path / "lopt.pt", {"horizon": 50})
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 2, (16,))
    opt = LearnedOptimizer(model.parameters(), tmp_path / "lopt.pt", horizon=50)

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    losses = [step() for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0]
    saved_opt, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    step()
    after = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(saved_model)
    opt2 = LearnedOptimizer(model.parameters(), load_rule(tmp_path / "lopt.pt"), horizon=50)
    opt2.load_state_dict(saved_opt)
    opt = opt2
    step()
    for a, b in zip(after, model.parameters()):
        assert torch.equal(a, b)


# --- evolution strategies --------------------------------------------------------------------

class ToyRule(LearnedRule):
    """Momentum SGD with a learned log step size and momentum logit: few weights, so ES converges."""

    name = "toy"

    def __init__(self):
        super().__init__()
        self.log_lr = nn.Parameter(torch.tensor(-3.0))
        self.logit = nn.Parameter(torch.tensor(0.5))

    def init_state(self, params, layout):
        return {"m": torch.zeros_like(params)}

    def forward(self, grad, params, state, layout, progress):
        m = torch.sigmoid(self.logit) * state["m"] + grad
        return -self.log_lr.exp() * m, {"m": m}


def _quadratic(seed=0):
    g = torch.Generator().manual_seed(seed)
    return quadratic(g, dims=4, batch=8)


def _grad_vector(rule):
    return torch.cat([p.grad.reshape(-1) for p in rule.parameters()])


def _full_trajectory_gradient(rule, problem, truncations, length):
    """d/dtheta of the sum of the truncations' meta-losses, through the whole trajectory (no truncation)."""
    layout = Layout.of(list(problem.init.values()))
    flat = layout.flatten(list(problem.init.values())).detach().requires_grad_(True)
    state = rule.init_state(flat, layout)
    total, points, steps = 0.0, [], truncations * length
    for step in range(steps + 1):
        points.append(problem.loss(dict(zip(problem.init, layout.split(flat))), torch.Generator()))
        if step < steps:  # ES sees the rule as a black box: the gradient input's dependence counts too
            (g,) = torch.autograd.grad(points[-1], flat, create_graph=True)
            update, state = rule(g, flat, state, layout, step / steps)
            flat = flat + update
    for k in range(truncations):
        total = total + torch.stack(points[k * length:(k + 1) * length + 1]).mean()
    rule.zero_grad()
    total.backward()
    return _grad_vector(rule)


def test_es_estimate_correlates_with_the_true_truncation_gradient():
    rule, problem = ToyRule(), _quadratic()
    true = _full_trajectory_gradient(rule, problem, 1, 5)
    traj = Trajectory.start(rule, problem)
    rule.zero_grad()
    loss = es_gradient(rule, traj, 5, 30, torch.Generator().manual_seed(1), pairs=64, sigma=0.01)
    est = _grad_vector(rule)
    assert math.isfinite(loss) and traj.step == 5 and len(traj.losses) == 5
    assert F.cosine_similarity(est, true, dim=0) > 0.9
    assert 0.5 < est.norm() / true.norm() < 2.0
    assert torch.equal(rule.log_lr.detach(), torch.tensor(-3.0))  # the weights are restored


@pytest.mark.slow  # ~15 s: thousands of tiny unroll steps
def test_pes_is_unbiased_for_the_whole_trajectory_where_truncated_es_is_not():
    rule, problem = ToyRule(), _quadratic(seed=2)
    with torch.no_grad():
        rule.log_lr.fill_(-2.5)
        rule.logit.fill_(2.0)  # strong momentum: the rule's effect outlives a truncation
    truncations, length, repeats = 4, 4, 4
    true = _full_trajectory_gradient(rule, problem, truncations, length)
    sums = {"pes": torch.zeros(2), "es": torch.zeros(2)}
    for name, estimator in (("pes", pes_gradient), ("es", es_gradient)):
        gen = torch.Generator().manual_seed(5)
        for _repeat in range(repeats):
            traj = Trajectory.start(rule, problem)
            for _ in range(truncations):
                rule.zero_grad()
                estimator(rule, traj, length, truncations * length, gen, pairs=64, sigma=0.01)
                sums[name] += _grad_vector(rule)
    pes, es = sums["pes"] / repeats, sums["es"] / repeats
    assert F.cosine_similarity(pes, true, dim=0) > 0.9
    assert 0.7 < pes.norm() / true.norm() < 1.4
    assert (pes - true).norm() < (es - true).norm()


def test_pes_keeps_particles_per_trajectory_and_restarts_them_with_a_new_one():
    rule, problem = ToyRule(), _quadratic()
    traj = Trajectory.start(rule, problem)
    gen = torch.Generator().manual_seed(0)
    pes_gradient(rule, traj, 3, 9, gen, pairs=2)
    memory = traj.extra["pes"]
    assert len(memory["particles"]) == 2 and memory["xi"].shape == (2, 2)
    plus, minus = memory["particles"][0]
    assert plus.step == minus.step == traj.step == 3 and not torch.equal(plus.params, minus.params)
    assert "pes" not in Trajectory.start(rule, problem).extra


def test_es_options_are_checked():
    from fastadapt.errors import ConfigError

    rule, problem = ToyRule(), _quadratic()
    with pytest.raises(ConfigError, match="pairs"):
        es_gradient(rule, Trajectory.start(rule, problem), 2, 4, torch.Generator(), pairs=0)
    with pytest.raises(ConfigError, match="sigma"):
        pes_gradient(rule, Trajectory.start(rule, problem), 2, 4, torch.Generator(), sigma=0)


def test_velo_meta_trains_with_every_estimator_through_the_engine(tmp_path):
    from fastadapt.engine.lopt import LoptSettings, meta_train_lopt

    for estimator in ("truncated", "es", "pes"):
        s = LoptSettings(optimizer="velo", optimizee="quadratic", trajectories=2, horizon=4, unroll=2,
                         meta_gradient=estimator, meta_options={} if estimator == "truncated" else {"pairs": 2},
                         rule_options={"hidden": 4, "lstm_hidden": 8}, val_every=2, val_problems=1, progress=False)
        result = meta_train_lopt(s, tmp_path / estimator)
        assert result.trajectories == 2 and math.isfinite(result.best_val_loss)
        rule = load_rule(tmp_path / estimator)
        assert isinstance(rule, VeLORule) and rule.hparams["hidden"] == 4


# --- the family of small tasks ---------------------------------------------------------------

@pytest.fixture
def tiny_glyphs(monkeypatch):
    """A small stand-in for the built-in glyph dataset (its full rendering takes a while)."""
    from fastadapt.data import glyphs
    from fastadapt.tasks import ClassPool

    g = torch.Generator().manual_seed(0)
    pools = {split: ClassPool.from_grouped(torch.randint(0, 256, (12, 5, 1, 28, 28), generator=g, dtype=torch.uint8))
             for split in ("train", "test")}
    monkeypatch.setattr(glyphs, "glyph_pools", lambda *a, **k: pools)
    return pools


def test_mixed_glyph_family_draws_varied_trainable_problems(tiny_glyphs):
    assert {"mixed", "mixed-glyphs"} <= set(OPTIMIZEES)
    g = torch.Generator().manual_seed(0)
    problems = [make_problem("mixed-glyphs", g) for _ in range(12)]
    assert {p.info["arch"] for p in problems} == {"mlp", "conv"}
    assert len({p.num_params for p in problems}) > 6
    for p in problems[:4]:
        params = p.fresh_params()
        loss = p.loss(params, g)
        loss.backward()
        assert math.isfinite(float(loss.detach())) and all(v.grad is not None for v in params.values())
    # the same seed draws the same problem
    a, b = (make_problem("mixed-glyphs", torch.Generator().manual_seed(7)) for _ in range(2))
    assert a.info == b.info and all(torch.equal(a.init[k], b.init[k]) for k in a.init)


@pytest.mark.slow  # decodes the CIFAR-10 test JPEGs into the test session's empty cache
def test_mixed_family_covers_the_real_datasets(shared_data, tiny_glyphs):
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(12):
        p = make_problem("mixed", g, split="test", data_dir=str(shared_data))
        seen.add(p.info["dataset"])
        assert math.isfinite(float(p.loss(p.init, g)))
    assert seen == {"mnist", "cifar10", "glyphs"}
