"""MAML 5-way 1-shot, meta-batch 32, Conv-4: seconds per meta-iteration side by side.

Compared in the same process, on the same meta-batch, at the same gradients:

* ``plain``: the usual per-task loop with ``torch.autograd.grad(create_graph=True)`` over a
  hand-written functional Conv-4 (``F.conv2d``, ``F.batch_norm(training=True)``), task losses
  summed and one ``backward`` (the way most MAML code does it);
* ``ours-loop`` / ``ours-vmap``: fastadapt's MAML (one functional inner loop, ``torch.func``),
  tasks run as a loop (backward per task) or under ``vmap``; ``ours-loop-unfused``: the loop with
  Conv-4's fused BatchNorm/ReLU/max-pool blocks switched off (``fastadapt.models.fused.ENABLED``);
  ``ours-loop-torch-fused`` / ``ours-grouped-torch-fused``: the fused blocks computed with PyTorch
  operations instead of the native kernels (``fastadapt.models.native.ENABLED``);
* ``ours-grouped``: ``--batching grouped``, groups of 8 tasks run as one network with grouped
  convolutions (``fastadapt.models.grouped``), a backward pass per group;
* ``ours-loop-bound`` / ``ours-grouped-bound``: timing bounds, not implementations: the loop
  (the grouped batching) with every Conv-4 BatchNorm, ReLU and max-pool (both passes) replaced by
  a strided view (``conv4_layers_free`` in ``_common.py``; their gradients are not checked). No
  implementation of those layers can make the loop (grouped) faster than this; plain / bound is
  the most any of them could gain.

Each worker also counts the meta-iteration's FLOPs (``FlopCounterMode`` on the plain loop), measures
the process's fp32 matrix-multiply ceiling, reports the GFLOP/s each implementation reaches against
it and the FLOP bound (FLOPs / ceiling: the step's convolutions and products alone, at the
ceiling, with nothing else costing time), and profiles one ``ours-loop`` iteration for the share
of its time spent in convolutions (the profiler's attribution: a looser bound on what any change
outside the convolution kernels can gain than the measured ``ours-loop-bound``, which also keeps
the head, inner update and autograd).

Peak memory: each implementation runs one meta-iteration in a fresh process of its own (two
threads, glibc's default allocator), and ``peak_extra_mb`` is that process's peak resident memory
during it above its resident memory after set-up.

Each setting (glibc allocator default or tuned, 1 or 2 torch threads) runs in a fresh process;
also timed there: one ProtoNet 5-way 1-shot episode (forward + backward). Gradients of the
MAML implementations are compared (relative difference of the whole gradient vector;
``maml_grad_accuracy.py`` compares each with a float64 reference). Images are random (speed does not
depend on their content); 5 queries per class (the CLI default).

    python benchmarks/maml_speed.py            # all settings, writes results/maml_speed.json + .png
    python benchmarks/maml_speed.py --reps 3 --threads 1   # shorter
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F

TUNED = {"MALLOC_MMAP_THRESHOLD_": "2147483647", "MALLOC_TRIM_THRESHOLD_": "2147483647"}
#: The implementations (``plain`` and fastadapt's) and the timing bounds, as :func:`implementations` builds them.
IMPLS = ("plain", "ours-loop", "ours-loop-torch-fused", "ours-loop-unfused", "ours-grouped", "ours-grouped-torch-fused",
         "ours-vmap")
BOUNDS = ("ours-loop-bound", "ours-grouped-bound")


def plain_forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Conv-4 + linear head as most MAML code writes it: explicit functional layers."""
    for i in range(4):
        w, b, g, beta = params[4 * i: 4 * i + 4]
        x = F.conv2d(x, w, b, padding=1)
        x = F.batch_norm(x, None, None, g, beta, training=True)
        x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), params[16], params[17])


def plain_maml_grads(params, batch, inner_lr, steps, first_order=False):
    """Meta-gradient of ``batch`` in ``params[i].grad`` (first order: the inner gradients are
    constants, FOMAML)."""
    total = 0.0
    for i in range(batch.num_tasks):
        fast = params
        for _ in range(steps):
            loss = F.cross_entropy(plain_forward(fast, batch.support_x[i]), batch.support_y[i])
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [p - inner_lr * g for p, g in zip(fast, grads)]
        total = total + F.cross_entropy(plain_forward(fast, batch.query_x[i]), batch.query_y[i])
    (total / batch.num_tasks).backward()
    return [p.grad for p in params]


def implementations(tasks: int, queries: int) -> tuple[dict, Any]:
    """The implementations compared (each fills and returns a meta-gradient), the bound (timed
    only), the meta-batch and fastadapt's learner."""
    from _common import conv4_layers_free
    from fastadapt.methods import MAML
    from fastadapt.models import fused, native
    from fastadapt.tasks import Episode

    torch.manual_seed(0)
    ways, shots = 5, 1
    g = torch.Generator().manual_seed(0)
    batch = Episode(torch.rand(tasks, ways * shots, 1, 28, 28, generator=g),
                    torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1),
                    torch.rand(tasks, ways * queries, 1, 28, 28, generator=g),
                    torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1))
    learner = MAML.from_config({"ways": ways, "inner_steps": 1, "inner_lr": 0.4}, (1, 28, 28))
    # The plain model holds the same weights in plain (NCHW) tensors.
    # (cloned into NCHW explicitly, whatever layout fastadapt runs in: ``.contiguous()`` would keep a
    # channels-last first-convolution weight, whose one input channel makes it contiguous in both)
    plain = [p.detach().clone(memory_format=torch.contiguous_format).requires_grad_() for p in learner.model.parameters()]

    def run_plain():
        for p in plain:
            p.grad = None
        return plain_maml_grads(plain, batch, 0.4, 1)

    def run_ours(mode, fuse=True, kernels=True):
        def f():
            fused.ENABLED, native.ENABLED = fuse, kernels
            try:
                learner._backward(batch, mode, 0)
            finally:
                fused.ENABLED = native.ENABLED = True
            return [p.grad for p in learner.model.parameters()]
        return f

    def run_bound(mode):
        def f():
            with conv4_layers_free():
                learner._backward(batch, mode, 0)
        return f

    impls = {"plain": run_plain, "ours-loop": run_ours("loop"),
             "ours-loop-torch-fused": run_ours("loop", kernels=False),
             "ours-loop-unfused": run_ours("loop", False), "ours-grouped": run_ours("grouped"),
             "ours-grouped-torch-fused": run_ours("grouped", kernels=False), "ours-vmap": run_ours("vmap")}
    bounds = {"ours-loop-bound": run_bound("loop"), "ours-grouped-bound": run_bound("grouped")}
    assert tuple(impls) == IMPLS and tuple(bounds) == BOUNDS
    return impls, bounds, batch, learner


def memory_worker(impl: str, tasks: int, queries: int) -> dict:
    """One meta-iteration of ``impl`` in a fresh process: its peak resident memory above the
    resident memory after set-up (nothing freed earlier is there to be reused)."""
    from _common import rss_mb
    from fastadapt.measure.memory import PeakMemory

    impls, bounds, _, _ = implementations(tasks, queries)
    impls.update(bounds)
    before = rss_mb("VmRSS")
    with PeakMemory() as pm:
        impls[impl]()
    return {"peak_extra_mb": pm.peak_mb - before, "memory_kind": pm.kind}


def worker(reps: int, tasks: int, queries: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from _common import matmul_ceiling
    from fastadapt.methods import ProtoNet
    from fastadapt.models import Conv4
    from fastadapt.tasks import Episode

    impls, bounds, batch, learner = implementations(tasks, queries)
    names = [n for n, _ in learner.model.named_parameters()]
    grads = {k: [t.clone() for t in f()] for k, f in impls.items()}  # also the warm-up
    impls.update(bounds)  # timed only: their gradients are wrong on purpose
    for f in bounds.values():
        f()
    ref = grads["plain"]

    def rel(a, b):  # relative difference of the whole gradient vector
        diff = sum(float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(a, b)) ** 0.5
        return diff / sum(float((y.double() ** 2).sum()) for y in b) ** 0.5

    grad_check = {k: rel(v, ref) for k, v in grads.items() if k != "plain"}
    grad_norm = {k: float(torch.sqrt(sum((t.double() ** 2).sum() for t in v))) for k, v in grads.items()}
    times = {k: [] for k in impls}
    for _ in range(reps):  # round robin, so load drifts hit every implementation alike
        for k, f in impls.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)

    # The work of one meta-iteration (convolutions and matrix products, forward and all backward
    # passes, as counted by torch's FlopCounterMode on the plain loop), the speed each
    # implementation reaches with it, and this process's matrix-multiply ceiling.
    counter = FlopCounterMode(display=False)
    with counter:
        impls["plain"]()
    flops = counter.get_total_flops()
    ceiling = matmul_ceiling(torch.float32)
    # Where fastadapt's loop spends its time: the share of the convolutions (forward, backward and
    # double backward) in one profiled meta-iteration. The step cannot be faster than that part.
    with torch.profiler.profile() as prof:
        impls["ours-loop"]()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)

    proto = ProtoNet(Conv4(1, image_size=28))
    ep = batch.task(0)
    ep = Episode(ep.support_x, ep.support_y, batch.query_x[0], batch.query_y[0])
    proto_times = []
    for i in range(reps * 4 + 2):
        t0 = time.perf_counter()
        loss, _ = proto.meta_loss(Episode.stack([ep]))
        loss.backward()
        if i >= 2:
            proto_times.append(time.perf_counter() - t0)
    medians = {k: statistics.median(v) for k, v in times.items()}
    real = [k for k in medians if k not in bounds]
    return {"seconds_per_meta_iteration": medians,
            "gflop_per_meta_iteration": flops / 1e9, "matmul_ceiling_gflops": ceiling,
            "flop_bound_seconds": flops / 1e9 / ceiling,
            "gflops": {k: flops / 1e9 / medians[k] for k in real},
            "fraction_of_ceiling": {k: flops / 1e9 / medians[k] / ceiling for k in real},
            "convolution_share_ours_loop": conv / total,
            "all_seconds": times, "grad_max_rel_diff_vs_plain": grad_check, "grad_norm": grad_norm,
            "protonet_episode_seconds": statistics.median(proto_times),
            "param_names": names[:2] + ["..."]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--name", default="maml_speed", help="results/NAME.json and .png")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.reps, args.tasks, args.queries)))
        return
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.tasks, args.queries)))
        return
    from _common import save

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {k: v for k, v in os.environ.items() if k not in TUNED}
    env.update(OMP_NUM_THREADS="2", PYTHONPATH=src + os.pathsep + env.get("PYTHONPATH", ""))
    memory = {}
    for impl in IMPLS:
        cmd = [sys.executable, __file__, "--memory-worker", impl, "--tasks", str(args.tasks), "--queries",
               str(args.queries)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        memory[impl] = json.loads(out.strip().splitlines()[-1])
        print(f"{impl}: peak {memory[impl]['peak_extra_mb']:.0f} MB above resident", flush=True)
    settings = []
    for threads in [int(t) for t in args.threads.split(",")]:
        for alloc in ("default", "tuned"):
            env = {k: v for k, v in os.environ.items() if k not in TUNED}
            if alloc == "tuned":
                env.update(TUNED)
            env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=src + os.pathsep + env.get("PYTHONPATH", ""))
            cmd = [sys.executable, __file__, "--worker", "--reps", str(args.reps), "--tasks", str(args.tasks),
                   "--queries", str(args.queries)]
            t0 = time.time()
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            res.update(allocator=alloc, threads=threads, queries=args.queries, tasks=args.tasks,
                       wall_seconds=round(time.time() - t0, 1))
            s = res["seconds_per_meta_iteration"]
            print(f"threads={threads} allocator={alloc}: plain {s['plain']:.3f} s, ours-loop {s['ours-loop']:.3f} s "
                  f"(fused blocks in PyTorch operations {s['ours-loop-torch-fused']:.3f} s, unfused "
                  f"{s['ours-loop-unfused']:.3f} s; with BatchNorm/ReLU/pool free {s['ours-loop-bound']:.3f} s), "
                  f"ours-grouped-torch-fused {s['ours-grouped-torch-fused']:.3f} s, "
                  f"ours-grouped {s['ours-grouped']:.3f} s (layers free {s['ours-grouped-bound']:.3f} s), "
                  f"FLOP bound {res['flop_bound_seconds']:.3f} s, ours-vmap {s['ours-vmap']:.3f} s, protonet episode "
                  f"{res['protonet_episode_seconds'] * 1e3:.1f} ms; grad rel diff {res['grad_max_rel_diff_vs_plain']}; "
                  f"{res['gflop_per_meta_iteration']:.0f} GFLOP per meta-iteration, ours-loop at "
                  f"{res['gflops']['ours-loop']:.0f} GFLOP/s of a {res['matmul_ceiling_gflops']:.0f} GFLOP/s matmul "
                  f"ceiling; convolutions {100 * res['convolution_share_ours_loop']:.0f} % of its profiled time",
                  flush=True)
            settings.append(res)
    for r in settings:
        s = r["seconds_per_meta_iteration"]
        ours = IMPLS[1:]
        r["speedup_vs_plain"] = {k: s["plain"] / s[k] for k in ours}
        r["speedup_best_vs_plain"] = s["plain"] / min(s[k] for k in ours)
        # The fastest the loop could be if everything but its convolutions took no time (profiled share) ...
        r["convolution_bound_speedup_vs_plain"] = s["plain"] / (s["ours-loop"] * r["convolution_share_ours_loop"])
        # ... and, measured, if only its BatchNorm, ReLU and max-pooling took no time (loop, grouped).
        r["layers_free_bound_speedup_vs_plain"] = s["plain"] / s["ours-loop-bound"]
        r["grouped_layers_free_bound_speedup_vs_plain"] = s["plain"] / s["ours-grouped-bound"]
        # The most any implementation could reach: the FLOPs at the matrix-multiply ceiling.
        r["flop_bound_speedup_vs_plain"] = s["plain"] / r["flop_bound_seconds"]
    payload = {"budget": f"{args.reps} timed meta-iterations per implementation and setting (medians)"}
    payload.update(setup={"method": "MAML second order", "ways": 5, "shots": 1, "queries_per_class": args.queries,
                          "meta_batch": args.tasks, "inner_steps": 1, "inner_lr": 0.4, "backbone": "conv4 28x28",
                          "tuned_allocator_env": TUNED},
                   peak_memory_2_threads_default_allocator=memory, settings=settings)
    save(args.name, payload)
    plot(settings, args.name)


def plot(settings: list[dict], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['threads']} thr\n{r['allocator']} malloc" for r in settings]
    impls = [*IMPLS, *BOUNDS]
    bound_labels = {"ours-loop-bound": "bound: loop, BatchNorm/ReLU/pool free",
                    "ours-grouped-bound": "bound: grouped, BatchNorm/ReLU/pool free"}
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.09
    for j, k in enumerate(impls):
        ax.bar([i + (j - 4) * width for i in range(len(settings))],
               [r["seconds_per_meta_iteration"][k] for r in settings if k in r["seconds_per_meta_iteration"]], width,
               label=bound_labels.get(k, k), hatch="//" if k in bound_labels else None)
    for i, r in enumerate(settings):  # the FLOPs at the matrix-multiply ceiling
        ax.hlines(r["flop_bound_seconds"], i - 4.5 * width, i + 4.5 * width, colors="k", linestyles=":",
                  label="FLOP bound (FLOPs / matmul ceiling)" if i == 0 else None)
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels(labels)
    ax.set_ylabel("seconds per meta-iteration")
    ax.set_title(f"MAML 5w1s, {settings[0].get('queries', '?')} queries per class, "
                 f"meta-batch {settings[0].get('tasks', 32)}, Conv-4 (CPU)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    from _common import save_figure

    save_figure(fig, name)


if __name__ == "__main__":
    main()
