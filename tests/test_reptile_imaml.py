"""Reptile's update and iMAML's implicit gradient against closed forms (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadapt.methods import IMAML, Reptile
from fastadapt.methods.imaml import conjugate_gradient, implicit_meta_gradient
from fastadapt.methods.inner import module_forward

from test_maml import DT, class_batch, conv_bn_model, meta_grads, tiny_model


@pytest.mark.parametrize("inner_optim", ["sgd", "adam"])
@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_reptile_update_equals_the_formula(inner_optim, batching):
    model, batch = tiny_model(seed=1), class_batch(tasks=3, seed=5)
    steps, lr, beta = 4, 0.05, 0.7
    learner = Reptile(copy.deepcopy(model), inner_steps=steps, inner_lr=lr, inner_optim=inner_optim,
                      outer_lr=beta, batching=batching)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    mean_w = {n: torch.zeros_like(p) for n, p in theta.items()}
    for ep in batch.tasks():  # W_i with torch.optim on a copy of the model
        m = copy.deepcopy(model)
        opt = (torch.optim.Adam(m.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8) if inner_optim == "adam"
               else torch.optim.SGD(m.parameters(), lr=lr))
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(m(ep.support_x), ep.support_y).backward()
            opt.step()
        for n, p in m.named_parameters():
            mean_w[n] += p.detach() / batch.num_tasks
    learner.train_step(batch, torch.optim.SGD(learner.parameters(), lr=123.0), 1)  # the optimiser is not used
    for n, p in learner.model.named_parameters():
        torch.testing.assert_close(p.detach(), theta[n] + beta * (mean_w[n] - theta[n]), rtol=1e-10, atol=1e-12)


def test_reptile_anneals_the_outer_step_linearly():
    # As the reference code: frac_done = i / n for i = 0..n-1, so the last step is not wasted.
    learner = Reptile(tiny_model(), outer_lr=1.0, anneal=True, anneal_steps=100)
    assert learner.outer_step_size(1) == 1.0
    assert learner.outer_step_size(26) == pytest.approx(0.75)
    assert learner.outer_step_size(100) == pytest.approx(0.01)
    # Past the horizon (a run extended on resume) the step size keeps its last value.
    betas = [learner.outer_step_size(t) for t in range(1, 201)]
    assert all(b1 >= b2 for b1, b2 in zip(betas, betas[1:])) and min(betas) == pytest.approx(0.01)


def test_conjugate_gradient_solves_a_spd_system():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=DT)
    a = a @ a.T + 0.5 * torch.eye(6, dtype=DT)
    b = {"x": torch.randn(4, generator=g, dtype=DT), "y": torch.randn(2, generator=g, dtype=DT)}

    def matvec(v):
        out = a @ torch.cat([v["x"], v["y"]])
        return {"x": out[:4], "y": out[4:]}

    sol = conjugate_gradient(matvec, b, iters=12)
    torch.testing.assert_close(torch.cat([sol["x"], sol["y"]]), torch.linalg.solve(a, torch.cat([b["x"], b["y"]])))


def test_imaml_implicit_gradient_matches_the_exact_closed_form():
    # Linear regression: the proximal inner optimum has a closed form,
    # phi*(theta) = (H + lam I)^-1 (2/n Xs^T ys + lam theta) with H = 2/n Xs^T Xs,
    # so d L_q(phi*(theta)) / d theta is exact by autograd through the solve.
    g = torch.Generator().manual_seed(3)
    d, n, lam = 4, 6, 1.5
    xs, ys = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, 1, generator=g, dtype=DT)
    xq, yq = torch.randn(8, d, generator=g, dtype=DT), torch.randn(8, 1, generator=g, dtype=DT)
    theta = torch.randn(1, d, generator=g, dtype=DT)
    layer = nn.Linear(d, 1, bias=False).to(DT)

    th = theta.clone().requires_grad_()
    h = 2.0 / n * xs.T @ xs
    phi_star = torch.linalg.solve(h + lam * torch.eye(d, dtype=DT), 2.0 / n * xs.T @ ys + lam * th.T).T
    exact = torch.autograd.grad(F.mse_loss(xq @ phi_star.T, yq), th)[0]

    grad, q_loss, inner_losses, _ = implicit_meta_gradient(
        module_forward(layer), F.mse_loss, {"weight": theta}, (xs, ys), (xq, yq),
        lam=lam, steps=400, lr=0.1, cg_steps=d + 2)
    torch.testing.assert_close(grad["weight"], exact, rtol=1e-8, atol=1e-10)
    assert inner_losses.shape == (400,)
    # The implicit gradient is not the first-order one (the test can tell them apart).
    phi = phi_star.detach().requires_grad_()
    first_order = torch.autograd.grad(F.mse_loss(xq @ phi.T, yq), phi)[0]
    assert float((first_order - exact).abs().max()) > 1e-3


def test_imaml_meta_gradient_is_the_mean_implicit_gradient_and_loop_equals_vmap():
    model = conv_bn_model(seed=3)
    batch = class_batch(tasks=3, shape=(1, 8, 8), seed=21)
    kw = dict(inner_steps=4, inner_lr=0.1, lam=2.0, cg_steps=3)
    loop = IMAML(copy.deepcopy(model), batching="loop", **kw)
    vmap = IMAML(copy.deepcopy(model), batching="vmap", **kw)
    g_loop, g_vmap = meta_grads(loop, batch), meta_grads(vmap, batch)
    for k in g_loop:
        torch.testing.assert_close(g_loop[k], g_vmap[k], rtol=1e-10, atol=1e-13)
    expected = {k: torch.zeros_like(v) for k, v in g_loop.items()}
    for ep in batch.tasks():
        grad, *_ = implicit_meta_gradient(module_forward(loop.model), F.cross_entropy, dict(loop.model.named_parameters()),
                                          (ep.support_x, ep.support_y), (ep.query_x, ep.query_y),
                                          lam=2.0, steps=4, lr=0.1, cg_steps=3)
        for k, v in grad.items():
            expected[f"model.{k}"] += v / batch.num_tasks
    for k in expected:
        torch.testing.assert_close(g_loop[k], expected[k], rtol=1e-10, atol=1e-13)


def test_reptile_loop_equals_vmap_with_batchnorm():
    model = conv_bn_model(seed=5)
    batch = class_batch(tasks=3, shape=(1, 8, 8), seed=22)
    results = []
    # SGD: Adam would normalise the rounding noise of the conv biases' zero gradients (BatchNorm
    # removes any bias) into steps of size lr, hiding a real difference behind a fake one.
    for batching in ("loop", "vmap"):
        learner = Reptile(copy.deepcopy(model), inner_steps=3, inner_lr=1e-1, inner_optim="sgd", batching=batching)
        learner.train_step(batch, torch.optim.SGD(learner.parameters(), lr=0.0), 1)
        results.append([p.detach() for p in learner.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
