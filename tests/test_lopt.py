"""Learned optimizers: the LSTM rule, truncated unrolls, LearnedOptimizer and lopt runs."""

import json
import math

import pytest
import torch
from torch import nn

from fastadapt.cli import main
from fastadapt.engine.lopt import LoptSettings, evaluate_optimizers, meta_train_lopt, steps_to_target, train_problem
from fastadapt.errors import ConfigError
from fastadapt.optim import LSTMRule, Layout, LearnedOptimizer, Trajectory, load_rule, preprocess_gradient, unroll
from fastadapt.optim.base import save_rule
from fastadapt.tasks.optimizee import make_problem


def test_preprocessing_is_the_papers_piecewise_formula():
    p = 10.0
    g = torch.tensor([3.0, -0.2, 1e-3, -4.6e-5, 4.5e-5, -1e-7, 0.0, 2e-30], dtype=torch.float64)
    expected = []
    for v in g.tolist():
        if abs(v) >= math.exp(-p):
            expected.append([math.log(abs(v)) / p, math.copysign(1.0, v)])
        else:
            expected.append([-1.0, math.exp(p) * v])
    torch.testing.assert_close(preprocess_gradient(g, p), torch.tensor(expected, dtype=torch.float64))


def test_preprocessing_has_finite_derivatives_at_zero():
    g = torch.tensor([0.0, 1e-3], requires_grad=True)
    preprocess_gradient(g).sum().backward()
    assert torch.isfinite(g.grad).all()


def test_lstm_rule_is_coordinatewise_over_tensors_of_any_shape():
    torch.manual_seed(0)
    rule = LSTMRule()
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 1, 3, 3)]
    grads = [torch.randn_like(t) for t in tensors]
    layout = Layout.of(tensors)
    flat, gflat = layout.flatten(tensors), layout.flatten(grads)
    state = rule.init_state(flat, layout)
    out = []
    with torch.no_grad():
        for _ in range(3):  # several steps, so the hidden states matter
            update, state = rule(gflat, flat, state, layout, 0.0)
            out.append(update)
        # Each tensor alone, with its own state, gives the same updates as the concatenation.
        for t, g, sl in zip(tensors, grads, torch.split(torch.arange(layout.numel), layout.sizes)):
            lay = Layout.of([t])
            st = rule.init_state(t.reshape(-1), lay)
            for k in range(3):
                u, st = rule(g.reshape(-1), t.reshape(-1), st, lay, 0.0)
                torch.testing.assert_close(u, out[k][sl], rtol=1e-5, atol=1e-7)
    assert [s.shape for s in layout.split(out[0])] == [t.shape for t in tensors]


def _quadratic(seed=0):
    g = torch.Generator().manual_seed(seed)
    return make_problem("quadratic", g), g


def test_truncated_unroll_matches_a_hand_written_unroll():
    torch.manual_seed(1)
    rule = LSTMRule()
    problem, g = _quadratic()
    traj = Trajectory.start(rule, problem)
    loss = unroll(rule, traj, 4, 100, g)
    got = torch.autograd.grad(loss, list(rule.parameters()))

    # Reference: the same four steps written out, gradients of the optimizee detached (first order).
    theta = problem.init["theta"].reshape(-1).clone()
    state = rule.init_state(theta, Layout.of([theta]))
    terms = []
    for i in range(4):
        leaf = theta if i > 0 else theta.detach().requires_grad_(True)
        loss_i = problem.loss({"theta": leaf.view(128, 10)}, g)
        (grad,) = torch.autograd.grad(loss_i, leaf, retain_graph=True)
        terms.append(loss_i if i > 0 else loss_i.detach())
        update, state = rule(grad.detach(), leaf, state, Layout.of([theta]), i / 100)
        theta = leaf + update
    terms.append(problem.loss({"theta": theta.view(128, 10)}, g))
    ref = torch.autograd.grad(torch.stack(terms).mean(), list(rule.parameters()))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    assert any(a.abs().sum() > 0 for a in got)


def test_gradients_do_not_flow_beyond_a_truncation():
    torch.manual_seed(2)
    rule = LSTMRule()
    problem, g = _quadratic()
    traj = Trajectory.start(rule, problem)
    unroll(rule, traj, 3, 100, g)
    # The carried parameters and state are cut from the first truncation's graph ...
    assert traj.params.grad_fn is None and all(v.grad_fn is None for v in traj.state.values())
    # ... so the second truncation's meta-gradient equals that of a run started afresh at its start point.
    start = Trajectory(problem, traj.layout, traj.params.clone(), {k: v.clone() for k, v in traj.state.items()},
                       step=traj.step)
    g2 = torch.Generator()
    g2.set_state(g.get_state())
    second = torch.autograd.grad(unroll(rule, traj, 3, 100, g), list(rule.parameters()))
    fresh = torch.autograd.grad(unroll(rule, start, 3, 100, g2), list(rule.parameters()))
    for a, b in zip(second, fresh):
        torch.testing.assert_close(a, b)


def test_second_order_keeps_the_optimizee_curvature():
    torch.manual_seed(3)
    rule = LSTMRule()
    grads = {}
    for second in (False, True):
        problem, g = _quadratic()
        traj = Trajectory.start(rule, problem)
        grads[second] = torch.autograd.grad(unroll(rule, traj, 3, 100, g, second_order=second),
                                            list(rule.parameters()))
    assert not all(torch.allclose(a, b) for a, b in zip(grads[False], grads[True]))


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)


def _train_steps(model, opt, steps, clip=None):
    x, y = _batch()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss.item())
    return losses


def test_learned_optimizer_state_dict_round_trip_reproduces_the_next_step(tmp_path):
    torch.manual_seed(4)
    save_rule(LSTMRule(), tmp_path / "lopt.pt", {"horizon": 50})
    model = _small_model()
    opt = LearnedOptimizer(model.parameters(), tmp_path / "lopt.pt")
    assert opt.param_groups[0]["horizon"] == 50  # the meta-training horizon saved with the rule
    _train_steps(model, opt, 3)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")

    model2 = _small_model()
    opt2 = LearnedOptimizer(model2.parameters(), tmp_path / "lopt.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    _train_steps(model, opt, 1)
    _train_steps(model2, opt2, 1)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt.state_dict()["state"][0]["step"] == 4


def test_learned_optimizer_works_with_schedulers_clipping_and_missing_gradients(tmp_path):
    torch.manual_seed(4)
    rule = LSTMRule()
    # lr is a scale of the rule's update, so a scheduler scales the steps.
    moved = []
    for scale in (1.0, 0.5, 0.0):
        model = _small_model()
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        opt = LearnedOptimizer(model.parameters(), rule, lr=1.0)
        torch.optim.lr_scheduler.LambdaLR(opt, lambda step, s=scale: s)
        _train_steps(model, opt, 1)
        moved.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before)
    torch.testing.assert_close(moved[1], 0.5 * moved[0])
    assert moved[0].abs().sum() > 0 and torch.count_nonzero(moved[2]) == 0

    # Clipping changes what the rule reads, hence the step.
    outs = []
    for clip in (None, 1e-3):
        m = _small_model()
        o = LearnedOptimizer(m.parameters(), rule)
        _train_steps(m, o, 2, clip)
        outs.append(torch.cat([p.detach().reshape(-1) for p in m.parameters()]))
    assert not torch.equal(outs[0], outs[1])

    # A tensor without a gradient keeps its value, as with the built-in optimizers.
    m = _small_model()
    o = LearnedOptimizer(m.parameters(), rule)
    m[4].weight.requires_grad_(False)
    w = m[4].weight.detach().clone()
    _train_steps(m, o, 2)
    assert torch.equal(m[4].weight, w)


@pytest.fixture(scope="module")
def trained_quadratic_rule(tmp_path_factory):
    """An LSTM rule meta-trained briefly on the quadratic family (fixed seed)."""
    out = tmp_path_factory.mktemp("lopt-quadratic")
    torch.set_num_threads(1)
    s = LoptSettings(optimizer="lstm", optimizee="quadratic", trajectories=40, horizon=100, unroll=20,
                     val_every=0, seed=0, progress=False)
    meta_train_lopt(s, out)
    return out


def test_a_briefly_meta_trained_lstm_beats_plain_sgd_on_quadratics(trained_quadratic_rule):
    rule = load_rule(trained_quadratic_rule)
    finals = {"lstm": [], "sgd": []}
    for seed in range(3):
        for name, make in (("lstm", lambda p: LearnedOptimizer(p, rule)), ("sgd", lambda p: torch.optim.SGD(p, lr=0.1))):
            problem, g = _quadratic(100 + seed)
            finals[name].append(train_problem(problem, make, 100, g)["losses"][-1])
    assert sum(finals["lstm"]) < 0.8 * sum(finals["sgd"]), finals


def test_meta_training_resumes_exactly(tmp_path):
    torch.set_num_threads(1)
    base = dict(optimizer="lstm", optimizee="quadratic", horizon=20, unroll=10, val_every=2, val_problems=1,
                progress=False)
    meta_train_lopt(LoptSettings(trajectories=4, **base), tmp_path / "straight")
    meta_train_lopt(LoptSettings(trajectories=2, **base), tmp_path / "resumed")
    meta_train_lopt(LoptSettings(trajectories=4, **base), tmp_path / "resumed")
    for name in ("checkpoint.pt", "lopt.pt"):
        a = torch.load(tmp_path / "straight" / name, weights_only=True)
        b = torch.load(tmp_path / "resumed" / name, weights_only=True)
        key = "rule" if name == "checkpoint.pt" else None
        sa, sb = (a[key] if key else a)["state_dict"], (b[key] if key else b)["state_dict"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_steps_to_target_uses_a_moving_mean():
    assert steps_to_target([5, 4, 3, 2, 1, 1, 1], 2.0, window=3) == 5  # mean of 3, 2, 1
    assert steps_to_target([5, 4], 1.0, window=1) is None


def test_lopt_cli_train_eval_and_errors(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["lopt", "train", "--optimizee", "quadratic", "--trajectories", "2", "--horizon", "10", "--unroll", "5",
            "--val-every", "1", "--val-problems", "1", "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(args) == 0
    for name in ("config.yaml", "checkpoint.pt", "metrics.jsonl", "learning_curve.png", "lopt.pt"):
        assert (out / name).is_file(), name
    # Same folder, other settings: refused with the differing keys named.
    assert main([a if a != "10" else "20" for a in args]) == 2  # --horizon 20
    assert "horizon" in capsys.readouterr().err
    assert main(["lopt", "eval", str(out), "--seeds", "2", "--tune-seeds", "1", "--baselines", "sgd,adam",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| learned | 1 (untuned)" in printed and "| adam |" in printed
    summary = json.loads((out / "eval-quadratic-10.json").read_text())
    assert set(summary["results"]) == {"learned", "sgd", "adam"}
    assert len(summary["results"]["adam"]["curve"]["mean"]) == 10
    assert (out / "eval-quadratic-10.png").is_file()
    # Bad input: one-line errors.
    assert main(["lopt", "train", "--horizon", "30", "--unroll", "20", "--out", str(tmp_path / "x")]) == 2
    assert "multiple of --unroll" in capsys.readouterr().err
    assert main(["lopt", "train", "--optimizee", "nope", "--out", str(tmp_path / "y")]) == 2
    assert "unknown optimizee" in capsys.readouterr().err
    assert main(["lopt", "train", "--optimizee", "mnist-mlp", "--data-dir", str(tmp_path / "none"),
                 "--out", str(tmp_path / "z")]) == 2
    assert "MNIST" in capsys.readouterr().err
    assert main(["lopt", "eval", str(tmp_path)]) == 2
    assert "no learned optimizer" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("x", "y", "z"))


def test_evaluation_gives_every_optimizer_the_same_problems():
    summary = evaluate_optimizers(None, "quadratic", 5, seeds=2, baselines=("sgd", "adam"), tune_seeds=1,
                                  progress=False)
    # Same initial parameters: the first loss of every optimizer is the same on each seed.
    firsts = {name: [r["curve"]["mean"][0]] for name, r in summary["results"].items()}
    assert firsts["sgd"] == firsts["adam"]
    with pytest.raises(ConfigError):
        evaluate_optimizers(None, "quadratic", 5, baselines=("lbfgs",), progress=False)


@pytest.mark.shared_data
def test_mnist_optimizee_is_the_papers_mlp(shared_data):
    g = torch.Generator().manual_seed(0)
    problem = make_problem("mnist-mlp", g, data_dir=str(shared_data / "mnist"))
    assert {k: tuple(v.shape) for k, v in problem.init.items()} == {"w0": (20, 784), "b0": (20,), "w1": (10, 20),
                                                                    "b1": (10,)}
    assert abs(problem.init["w0"].std().item() - 0.01) < 1e-3
    loss = problem.loss(problem.fresh_params(), g)
    assert abs(loss.item() - math.log(10)) < 0.05  # near-zero weights: uniform predictions


@pytest.mark.parametrize("name", __import__("fastadapt.registry", fromlist=["LEARNED_RULES"]).LEARNED_RULES.names())
def test_every_learned_rule_meta_trains_saves_loads_and_steps(name, tmp_path):
    """The shared smoke test of registered learned optimizers."""
    torch.set_num_threads(1)
    s = LoptSettings(optimizer=name, optimizee="quadratic", trajectories=1, horizon=10, unroll=5, val_every=1,
                     val_problems=1, progress=False)
    result = meta_train_lopt(s, tmp_path)
    assert result.trajectories == 1
    rule = load_rule(tmp_path)
    assert rule.name == name
    model = _small_model()
    opt = LearnedOptimizer(model.parameters(), tmp_path / "lopt.pt")
    model[4].bias.requires_grad_(False)  # a tensor without a gradient keeps its value
    bias = model[4].bias.detach().clone()
    losses = _train_steps(model, opt, 3)
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model[4].bias, bias)


def test_second_order_meta_gradient_backpropagates():
    torch.manual_seed(3)
    rule = LSTMRule()
    problem, g = _quadratic()
    traj = Trajectory.start(rule, problem)
    unroll(rule, traj, 3, 100, g, second_order=True).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in rule.parameters())
