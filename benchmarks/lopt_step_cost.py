"""Cost of a learned optimizer's step against ``torch.optim.Adam(foreach=True)`` on a ~1M-parameter MLP.

The model is a 784-1024-256-10 ReLU MLP (1,068,810 parameters, six tensors) on a random batch of
128. Timed in one process, each optimizer on a fresh copy of the model:

* ``optimizer.step()`` alone (median over ``--repeats`` calls, after warm-up), the gradients left
  in place from one backward pass;
* a whole training step: ``zero_grad``, forward, cross-entropy, backward, ``step``.

Optimizers: Adam (foreach), :class:`~fastadapt.optim.LearnedOptimizer` with an untrained ``velo``
rule (the cost does not depend on the weights) and with an untrained ``lstm`` rule (fewer repeats:
it is ~1000x Adam's work). FLOPs per coordinate are counted analytically from each rule's sizes
(multiply-adds as two FLOPs; exp, rsqrt, sigmoid and tanh as one), giving GFLOP/s beside the
times. The JSON (``results/lopt/step_cost.json``) records the command, commit, threads and load.

    python benchmarks/lopt_step_cost.py                       # 2 threads
    python benchmarks/lopt_step_cost.py --threads 1 --repeats 10 --lstm-repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from torch import nn

from _common import RESULTS, require_clean_tree, save
from fastadapt.optim import LearnedOptimizer, build_rule

SIZES = (784, 1024, 256, 10)


def adam_flops() -> float:
    """Per coordinate: two moment updates (3 + 4), bias corrections folded into scalars, sqrt, add eps,
    divide, scale and add (5)."""
    return 12.0


def lstm_flops(hidden: int = 20, layers: int = 2, **_: object) -> float:
    """Per coordinate: gradient preprocessing (~6), per layer the gate matmul ``4H x (in + H)`` and
    ~10H elementwise (three sigmoids, two tanh, the cell update), and the ``H -> 1`` output."""
    total = 6.0
    for i in range(layers):
        inp = 2 if i == 0 else hidden
        total += 2 * 4 * hidden * (inp + hidden) + 4 * hidden + 10 * hidden
    return total + 2 * hidden + 1


def velo_flops(hidden: int = 8, momenta=(0.5, 0.9, 0.99), **_: object) -> float:
    """Per coordinate: moments (3 per momentum, 4 for v), features (~2 each), their per-tensor mean
    square and scaling (3 each), the first layer ``(H + 2) x F``, bias and ReLU (2H), the output layer
    ``2 x H`` with the skip and bias (4), and the step ``d * exp(s) * scale`` (5)."""
    k = len(momenta)
    f = 6 + 2 * k
    return 3 * k + 4 + 2 * f + 3 * f + 2 * f * (hidden + 2) + 2 * hidden + 4 * hidden + 4 + 5


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(SIZES[:-1], SIZES[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(name: str, make_opt: Callable[[list[torch.Tensor]], torch.optim.Optimizer], repeats: int,
            warmup: int, batch: int) -> dict[str, float]:
    model = make_model()
    opt = make_opt(list(model.parameters()))
    x, y = torch.randn(batch, SIZES[0]), torch.randint(0, SIZES[-1], (batch,))

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    whole = median_ms(train_step, repeats, warmup)
    step = median_ms(opt.step, repeats, 1)  # gradients of the last backward stay in place
    print(f"{name:>6}: step {step:9.2f} ms   whole training step {whole:9.2f} ms", flush=True)
    return {"step_ms": step, "train_step_ms": whole}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lstm-repeats", type=int, default=3, help="repeats for the LSTM rule (0: skip it)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--name", default="lopt/step_cost", help="results file (under benchmarks/results)")
    args = ap.parse_args(argv)
    require_clean_tree()
    torch.set_num_threads(args.threads)
    numel = sum(p.numel() for p in make_model().parameters())
    print(f"{'-'.join(map(str, SIZES))} MLP: {numel:,} parameters; {args.threads} thread(s); batch {args.batch}")
    velo, lstm = build_rule("velo"), build_rule("lstm")
    runs = {"adam": (lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True), args.repeats, adam_flops()),
            "velo": (lambda p: LearnedOptimizer(p, velo, horizon=1000), args.repeats, velo_flops(**velo.hparams))}
    if args.lstm_repeats:
        runs["lstm"] = (lambda p: LearnedOptimizer(p, lstm, horizon=1000), args.lstm_repeats, lstm_flops(**lstm.hparams))
    results = {}
    for name, (make, repeats, flops) in runs.items():
        r = measure(name, make, repeats, min(args.warmup, repeats), args.batch)
        r["flops_per_coordinate"] = flops
        r["gflop_per_s"] = flops * numel / (r["step_ms"] * 1e6)
        results[name] = r
    for name, r in results.items():
        r["step_ratio_to_adam"] = r["step_ms"] / results["adam"]["step_ms"]
        r["train_step_ratio_to_adam"] = r["train_step_ms"] / results["adam"]["train_step_ms"]
        print(f"{name:>6}: {r['step_ratio_to_adam']:7.2f}x Adam's step, {r['train_step_ratio_to_adam']:6.2f}x its "
              f"training step; {r['flops_per_coordinate']:.0f} FLOP/coordinate, {r['gflop_per_s']:.2f} GFLOP/s")
    (RESULTS / Path(args.name).parent).mkdir(parents=True, exist_ok=True)
    save(args.name, {"model": {"sizes": list(SIZES), "parameters": numel, "batch": args.batch},
                     "threads": args.threads, "repeats": args.repeats, "lstm_repeats": args.lstm_repeats,
                     "rules": {"velo": velo.hparams, "lstm": lstm.hparams}, "results": results})


if __name__ == "__main__":
    main()
