"""Where a GPU training step's time goes: ProtoNet 60-way episodes and MAML 5w1s meta-batches.

For each method and each variant, ``--steps`` training steps are timed (after ``--warmup``) and
split into drawing the batch on the CPU, copying it to the GPU and the training step itself
(``train_step`` reads the loss back, so the GPU has finished when it returns). Variants, all
measured in one run on the same machine so that their ratios compare:

- ``base``: what ``fastadapt train --device cuda`` does: Conv-4 channels-last, the pool of
  images kept on the GPU (the host draws indices only) and the step replayed as a CUDA graph
  (:mod:`fastadapt.engine.graphs`; ProtoNet, and MAML in its vmap batching);
- ``eager``: the step run op by op instead of replayed as a CUDA graph;
- ``host_pool``: each batch gathered on the host and copied to the GPU;
- ``before``: both (``eager`` and ``host_pool``), the step as it was before either existed;
- ``threads1``: one CPU thread for PyTorch's host-side work (sampling, the Python loop);
- ``cudnn_benchmark``: ``torch.backends.cudnn.benchmark = True``;
- ``nchw``: the Conv-4 backbone kept in the default (NCHW) memory format instead of channels-last;
- ``prefetch``: ``host_pool`` with the next batch drawn and copied (from pinned memory) in a
  background thread while the GPU runs the current step;
- ``grouped`` / ``grouped32`` (MAML only): ``--batching grouped`` (grouped convolutions and
  PyTorch's batch-norm kernel instead of vmap's batching rules; run eagerly, no CUDA graph) in
  groups of 8 tasks, or the whole meta-batch of 32 as one group.

A ``torch.profiler`` table of the ``base`` variant (top operations by self CPU and by CUDA time),
taken over 20 further steps after the timed ones, is printed and saved with the figures.

    python benchmarks/gpu_step_profile.py --device cuda --data-dir ../shared/data/omniglot
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import require_clean_tree, save, task_data_config  # noqa: E402

from fastadapt.config import resolve  # noqa: E402
from fastadapt.engine.graphs import GraphedStep  # noqa: E402
from fastadapt.engine.graphs import usable as graphs_usable  # noqa: E402
from fastadapt.data import build_task_source  # noqa: E402
from fastadapt.measure.stats import median  # noqa: E402
from fastadapt.models.conv4 import apply_memory_format  # noqa: E402
from fastadapt.registry import METHODS  # noqa: E402
from fastadapt.tasks.sampler import on_device  # noqa: E402

RUNS = {
    "protonet": ({"ways": 60, "shots": 5, "queries": 15}, 1, {}),
    "maml": ({"ways": 5, "shots": 1, "queries": 15}, 32, {"inner_lr": 0.4, "inner_steps": 1}),
}
VARIANTS = ("base", "eager", "host_pool", "before", "threads1", "cudnn_benchmark", "nchw", "prefetch", "grouped",
            "grouped32")
GROUPED = {"grouped": 8, "grouped32": 32}  # MAML's --batching grouped, tasks per group


def _pinned(batch: Any) -> Any:
    return type(batch)(*(t.pin_memory() for t in (getattr(batch, f) for f in batch.__dataclass_fields__)))


def measure(method: str, data: dict[str, Any], device: torch.device, variant: str, steps: int, warmup: int,
            threads: int, profile: bool) -> dict[str, Any]:
    sizes, meta_batch, options = RUNS[method]
    on = {variant}
    graphs = not on & {"eager", "before"}
    device_pool = not on & {"host_pool", "before", "prefetch"}
    torch.set_num_threads(1 if "threads1" in on else threads)
    torch.backends.cudnn.benchmark = "cudnn_benchmark" in on
    if variant in GROUPED:
        options = {**options, "batching": "grouped"}
    cfg = resolve(method, {}, {**data, **sizes, **options})
    source = build_task_source({**cfg, "progress": False}, "train", sizes["ways"], sizes["shots"], sizes["queries"])
    torch.manual_seed(0)
    learner = METHODS.get(method).from_config(cfg, source.in_shape)
    if variant in GROUPED:
        learner.group_size = GROUPED[variant]
    learner.decide_run_options(device)
    apply_memory_format(learner, "nchw" if "nchw" in on else "auto", device)  # base: what `fastadapt train` does
    learner.to(device).train()
    if device_pool:
        source = on_device(source, device)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3, fused=device.type == "cuda" or None)  # as the trainer
    if graphs and graphs_usable(learner, device, 1, True):
        train_step = GraphedStep(learner, opt, contextlib.nullcontext)
    else:
        def train_step(batch: Any, step: int) -> dict[str, float]:
            return learner.train_step(batch, opt, step)
    gen = torch.Generator().manual_seed(0)
    prefetch = "prefetch" in on

    def draw(step: int) -> tuple[Any, float]:
        t0 = time.perf_counter()
        b = learner.draw_batch(source, gen, meta_batch, step)
        if prefetch and device.type == "cuda":
            b = _pinned(b).to(device, non_blocking=True)
        return b, time.perf_counter() - t0

    draw_s, copy_s, step_s, total_s = [], [], [], []
    pending: dict[str, Any] = {}

    def background(step: int) -> None:
        pending["out"] = draw(step)

    worker = None
    if prefetch:
        worker = threading.Thread(target=background, args=(1,))
        worker.start()
    prof = None
    profiled = min(steps, 20) if profile else 0
    for i in range(warmup + steps + profiled):
        if i == warmup + steps:  # the profiled steps come after the timed ones and are not timed
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                          + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []))
            prof.__enter__()
        t0 = time.perf_counter()
        if prefetch:
            worker.join()
            batch, d = pending.pop("out")
            worker = threading.Thread(target=background, args=(i + 2,))
            worker.start()
        else:
            batch, d = draw(i + 1)
        t1 = time.perf_counter()
        batch = batch.to(device, non_blocking=True)
        t2 = time.perf_counter()
        train_step(batch, i + 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t3 = time.perf_counter()
        if warmup <= i < warmup + steps:
            draw_s.append(d)
            copy_s.append(t2 - t1)
            step_s.append(t3 - t2)
            total_s.append(t3 - t0)
        if prof is not None and i == warmup + steps + profiled - 1:
            prof.__exit__(None, None, None)
    if worker is not None:
        worker.join()
    out = {"steps": steps, "threads": torch.get_num_threads(),
           "draw_ms": 1e3 * median(draw_s), "copy_ms": 1e3 * median(copy_s),
           "train_step_ms": 1e3 * median(step_s), "total_ms": 1e3 * median(total_s)}
    out["steps_per_s"] = 1e3 / out["total_ms"]
    print(f"{method:8s} {variant:16s} total {out['total_ms']:7.2f} ms ({out['steps_per_s']:6.1f} steps/s): draw "
          f"{out['draw_ms']:6.2f}{' (overlapped)' if prefetch else ''}, copy {out['copy_ms']:5.2f}, train_step "
          f"{out['train_step_ms']:6.2f}", flush=True)
    if prof is not None and prof.profiler is not None:
        tables = {}
        for key in ("self_cpu_time_total",) + (("self_device_time_total",) if device.type == "cuda" else ()):
            tables[key] = prof.key_averages().table(sort_by=key, row_limit=15)
            print(tables[key], flush=True)
        out["profile"] = tables
    torch.backends.cudnn.benchmark = False
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--methods", default="protonet,maml")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--name", default="gpu_step_profile")
    args = ap.parse_args(argv)
    require_clean_tree()
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    data = task_data_config(args.data_dir)
    results: dict[str, Any] = {}
    for method in args.methods.split(","):
        results[method] = {v: measure(method, data, device, v, args.steps, args.warmup, threads, v == "base")
                           for v in args.variants.split(",") if method == "maml" or v not in GROUPED}
    out = {"device": str(device), "default_threads": threads, "results": results}
    save(args.name, out)
    return out


if __name__ == "__main__":
    main()
