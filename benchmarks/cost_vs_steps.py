"""Cost of a meta-iteration against the number of inner steps, per method.

Seconds per meta-iteration (median of the timed iterations) and the peak resident memory it
adds, for 1, 2, 5, 10 and 20 inner steps, for MAML, MAML with gradient checkpointing across
inner steps, first-order MAML, iMAML (CG 5 steps) and Reptile (SGD inner loop). 5-way 1-shot, 5
queries per class, Conv-4 on 28x28 inputs, tasks run as a loop. Each point runs in a fresh
process (one thread, tuned glibc allocator) so that its peak is its own: ``peak_rss_mb`` is the
process's high-water mark, ``added_mb`` that minus the resident size before the first
meta-iteration.

    python benchmarks/cost_vs_steps.py --meta-batch 4 --iters 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from _common import rss_mb

METHODS = {
    "maml": ("maml", {}),
    "maml+checkpoint": ("maml", {"grad_checkpoint": True}),
    "fomaml": ("fomaml", {}),
    "imaml": ("imaml", {"cg_steps": 5, "inner_lr": 0.1, "lam": 2.0}),
    "reptile": ("reptile", {"inner_optim": "sgd", "inner_lr": 0.1}),
}
STEPS = (1, 2, 5, 10, 20)


def worker(label: str, steps: int, tasks: int, iters: int) -> dict:
    import fastadapt.methods  # noqa: F401
    from fastadapt.registry import METHODS as REG
    from fastadapt.tasks import Episode

    name, extra = METHODS[label]
    cfg = {"ways": 5, "inner_steps": steps, "inner_lr": 0.4, "batching": "loop", **extra}
    torch.manual_seed(0)
    learner = REG.get(name).from_config(cfg, (1, 28, 28))
    g = torch.Generator().manual_seed(0)
    batch = Episode(torch.rand(tasks, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(tasks, 1),
                    torch.rand(tasks, 25, 1, 28, 28, generator=g), torch.arange(5).repeat_interleave(5).repeat(tasks, 1))
    opt = torch.optim.SGD(learner.parameters(), lr=0.0)
    before = rss_mb("VmRSS")
    times = []
    for _ in range(iters + 1):
        t0 = time.perf_counter()
        learner.train_step(batch, opt, 1)
        times.append(time.perf_counter() - t0)
    peak = rss_mb("VmHWM")
    return {"method": label, "inner_steps": steps, "seconds_per_meta_iteration": statistics.median(times[1:]),
            "all_seconds": times, "peak_rss_mb": peak, "added_mb": peak - before}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--meta-batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=2, help="timed meta-iterations per point (after one warm-up)")
    ap.add_argument("--steps", default=",".join(map(str, STEPS)))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.meta_batch, args.iters)))
        return
    from _common import save

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "2147483647",
           "MALLOC_TRIM_THRESHOLD_": "2147483647", "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = []
    for label in args.methods.split(","):
        for steps in [int(s) for s in args.steps.split(",")]:
            cmd = [sys.executable, __file__, "--worker", label, str(steps), "--meta-batch", str(args.meta_batch),
                   "--iters", str(args.iters)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"{label:16s} {steps:3d} steps: {row['seconds_per_meta_iteration']:.3f} s/it, "
                  f"peak {row['peak_rss_mb']:.0f} MB (+{row['added_mb']:.0f} MB)", flush=True)
            rows.append(row)
    payload = {"budget": f"CPU, {args.iters} timed meta-iterations per point after one warm-up (medians)"}
    payload.update(setup={"ways": 5, "shots": 1, "queries_per_class": 5, "meta_batch": args.meta_batch,
                          "backbone": "conv4 28x28", "batching": "loop", "threads": 1,
                          "allocator": "MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=2147483647",
                          "options": {k: v[1] for k, v in METHODS.items()}},
                   rows=rows)
    save("cost_vs_steps", payload)
    plot(rows)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == label]
        x = [r["inner_steps"] for r in rs]
        a.plot(x, [r["seconds_per_meta_iteration"] for r in rs], "o-", label=label)
        b.plot(x, [r["added_mb"] for r in rs], "o-", label=label)
    a.set_ylabel("seconds per meta-iteration")
    b.set_ylabel("peak memory added (MB)")
    for ax in (a, b):
        ax.set_xlabel("inner steps")
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 5, 10, 20])
        ax.set_xticklabels(["1", "2", "5", "10", "20"])
        ax.grid(alpha=0.3)
    a.legend()
    fig.suptitle("cost vs inner steps (CPU, 5w1s, Conv-4)")
    fig.tight_layout()
    from _common import save_figure

    save_figure(fig, "cost_vs_steps")


if __name__ == "__main__":
    main()
