"""The MAML family's batchings side by side: MAML, FOMAML, ANIL and Meta-SGD, each as a loop over
tasks, grouped (``--batching grouped``, groups of 8) and under vmap.

5-way 1-shot, ``--queries`` per class, meta-batch ``--tasks``, Conv-4 on random 28x28 images,
1 inner step of 0.4, NCHW (the CPU default for these methods); median seconds per meta-iteration
(``_backward``: inner loops, query losses and the meta-gradient), the batchings timed round-robin
in one process, with malloc tuned as ``fastadapt train`` tunes it. Also: each batching's
meta-gradient against the loop's (relative difference of the whole vector).

    python benchmarks/maml_family_speed.py --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

MODES = ("loop", "grouped", "vmap")


def measure(name: str, reps: int, tasks: int, queries: int) -> dict:
    from fastadapt.registry import METHODS
    from fastadapt.tasks import Episode

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batch = Episode(torch.rand(tasks, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(tasks, 1),
                    torch.rand(tasks, 5 * queries, 1, 28, 28, generator=g),
                    torch.arange(5).repeat_interleave(queries).repeat(tasks, 1))
    learner = METHODS.get(name).from_config({"ways": 5, "inner_steps": 1, "inner_lr": 0.4}, (1, 28, 28))

    def step(mode: str) -> list[torch.Tensor]:
        learner._backward(batch, mode, 0)
        return [p.grad.detach().clone() for p in learner.parameters() if p.grad is not None]

    grads = {m: step(m) for m in MODES}  # also the warm-up
    ref = grads["loop"]
    norm = sum(float((y.double() ** 2).sum()) for y in ref) ** 0.5
    diff = {m: sum(float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(grads[m], ref)) ** 0.5 / norm
            for m in MODES if m != "loop"}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(reps):
        for m in MODES:
            t0 = time.perf_counter()
            step(m)
            times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    out = {"seconds_per_meta_iteration": med, "all_seconds": times, "grad_rel_diff_vs_loop": diff,
           "grouped_speedup_vs_loop": med["loop"] / med["grouped"]}
    print(f"{name:8s} loop {med['loop']:.3f} s, grouped {med['grouped']:.3f} s "
          f"({out['grouped_speedup_vs_loop']:.2f}x), vmap {med['vmap']:.3f} s; gradients vs loop "
          f"{', '.join(f'{m} {d:.1e}' for m, d in diff.items())}", flush=True)
    return out


def main() -> None:
    from _common import require_clean_tree, save
    from fastadapt.engine.allocator import tune_malloc

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--methods", default="maml,fomaml,anil,metasgd")
    args = ap.parse_args()
    require_clean_tree()
    tuned = tune_malloc()
    results = {m: measure(m, args.reps, args.tasks, args.queries) for m in args.methods.split(",")}
    save("maml_family_speed", {"budget": f"{args.reps} timed meta-iterations per method and batching (medians)",
                               "setup": {"ways": 5, "shots": 1, "queries_per_class": args.queries,
                                         "meta_batch": args.tasks, "inner_steps": 1, "inner_lr": 0.4,
                                         "backbone": "conv4 28x28, NCHW", "malloc_tuned": tuned},
                               "results": results})


if __name__ == "__main__":
    main()
