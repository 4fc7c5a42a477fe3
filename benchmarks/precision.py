"""bf16 autocast and torch.compile against float32: speed, meta-gradient error, accuracy.

For ProtoNet (60-way 5-shot 5-query training episodes) and MAML (5-way 1-shot 15 queries,
meta-batch 32, one inner step, second order) on Omniglot (or the built-in glyphs without it):

1. seconds per training step in fp32 and bf16 in the method's CPU default layout of Conv-4
   (``--memory-format auto``: channels-last for ProtoNet, whose training runs in fused blocks, NCHW
   for MAML), bf16 in the other layout (for MAML channels-last, whose BatchNorm inexactness is
   small beside bf16's own) and, where it applies, compiled fp32 (steps alternate between the
   settings so machine noise hits all alike; medians);
2. the relative L2 error of the bf16 (and compiled) meta-gradient against fp32 on the same batch;
3. accuracy after the same short training (``--train-steps``) from the same initial weights in
   fp32, bf16 and bf16 in the other layout, each evaluated on the same test episodes (mean ± 95% CI).

For MAML it also times two bounds, not implementations: fp32 and bf16 steps with every Conv-4
BatchNorm, ReLU and max-pool replaced by a strided view (``conv4_layers_free`` in
``_common.py``): fp32 / "bf16 bound" is the most bf16 could gain over fp32 if those layers cost
nothing in bf16 (and stayed as they are in fp32).

It also measures the machine's matrix-multiply ceiling in fp32 and bf16 so the speed-up can be
read against what the hardware allows.

    python benchmarks/precision.py [--reps 5] [--train-steps 300] [--threads 2] [--methods protonet,maml]
                                   [--name precision]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import conv4_layers_free, matmul_ceiling, require_clean_tree, save  # noqa: E402

from fastadapt.config import resolve  # noqa: E402
from fastadapt.data import build_task_source  # noqa: E402
from fastadapt.engine.evaluate import evaluate  # noqa: E402
from fastadapt.errors import ConfigError  # noqa: E402
from fastadapt.measure.stats import median  # noqa: E402
from fastadapt.models.conv4 import apply_memory_format, use_memory_format  # noqa: E402
from fastadapt.precision import autocast  # noqa: E402
from fastadapt.registry import METHODS  # noqa: E402

SETTINGS = {
    "protonet": {"ways": 60, "shots": 5, "queries": 5, "meta_batch": 1, "lr": 1e-3},
    "maml": {"ways": 5, "shots": 1, "queries": 15, "meta_batch": 32, "lr": 1e-3},
}


def build(method: str, data: dict) -> tuple:
    s = SETTINGS[method]
    cfg = resolve(method, {}, {**data, "ways": s["ways"], "shots": s["shots"], "queries": s["queries"]})
    source = build_task_source({**cfg, "progress": False}, "train", s["ways"], s["shots"], s["queries"])
    test = build_task_source({**cfg, "progress": False}, "test", 5, 1, 15)
    torch.manual_seed(0)
    learner = METHODS.get(method).from_config(cfg, source.in_shape)
    learner.decide_run_options("cpu")
    return learner, source, test, apply_memory_format(learner, "auto", "cpu")


def flat_grad(learner) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in learner.parameters() if p.grad is not None])


def step(learner, batch, precision: str) -> torch.Tensor:
    learner.zero_grad(set_to_none=True)
    with autocast("cpu", precision):
        loss, _ = learner.meta_loss(batch)
    loss.backward()
    return flat_grad(learner)


def train_then_eval(learner, source, test, precision: str, steps: int, lr: float, meta_batch: int,
                    episodes: int) -> dict:
    opt = torch.optim.Adam(learner.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for i in range(steps):
        batch = learner.draw_batch(source, gen, meta_batch, i + 1)
        with autocast("cpu", precision):
            learner.train_step(batch, opt, i + 1)
    seconds = time.perf_counter() - t0
    res = evaluate(learner, test, episodes, seed=0, progress=False, precision=precision)
    return {"accuracy": res["accuracy"], "ci95": res["ci95"], "train_seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--episodes", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="protonet,maml")
    ap.add_argument("--name", default="precision", help="the results file: benchmarks/results/NAME.json")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled setting (compiling takes minutes)")
    args = ap.parse_args()
    require_clean_tree()
    torch.set_num_threads(args.threads)
    data = ({"dataset": "omniglot", "data_dir": args.data_dir, "download": False}
            if Path(args.data_dir, "images_background").is_dir() else {"dataset": "builtin"})
    ceiling = {"fp32_gflops": matmul_ceiling(torch.float32), "bf16_gflops": matmul_ceiling(torch.bfloat16)}
    print(f"matmul ceiling: fp32 {ceiling['fp32_gflops']:.0f} GFLOP/s, bf16 {ceiling['bf16_gflops']:.0f} GFLOP/s")
    out = {"ceiling": ceiling, "dataset": data["dataset"], "threads": args.threads, "methods": {}}
    for method in args.methods.split(","):
        s = SETTINGS[method]
        learner, source, test, layout = build(method, data)
        other = "nchw" if layout == "channels_last" else "channels_last"
        other_name = f"bf16 {other.replace('_', '-')}"
        batch = source.sample_batch(torch.Generator().manual_seed(0), s["meta_batch"])
        in_other = copy.deepcopy(learner)
        use_memory_format(in_other, other)
        variants = {"fp32": (learner, "fp32"), "bf16": (learner, "bf16"), other_name: (in_other, "bf16")}
        if not args.no_compile:
            compiled = copy.deepcopy(learner)
            try:
                compiled.compile_networks()
                variants["compiled fp32"] = (compiled, "fp32")
            except ConfigError as exc:
                print(f"{method}: compile skipped ({exc})")
        grads = {name: step(m, batch, p) for name, (m, p) in variants.items()}  # also warms up / compiles
        bounds = {f"{p} bound": (learner, p) for p in ("fp32", "bf16")} if method == "maml" else {}
        for m, p in bounds.values():  # warm-up; timed only, their gradients are wrong on purpose
            with conv4_layers_free():
                step(m, batch, p)
        times: dict[str, list[float]] = {name: [] for name in [*variants, *bounds]}
        for _ in range(args.reps):
            for name, (m, p) in [*variants.items(), *bounds.items()]:
                t = time.perf_counter()
                with conv4_layers_free() if name in bounds else contextlib.nullcontext():
                    step(m, batch, p)
                times[name].append(time.perf_counter() - t)
        ref = grads["fp32"]
        row = {"seconds_per_step": {k: median(v) for k, v in times.items()},
               "grad_rel_error": {k: float((g - ref).norm() / ref.norm()) for k, g in grads.items() if k != "fp32"}}
        row["speedup_vs_fp32"] = {k: row["seconds_per_step"]["fp32"] / v for k, v in row["seconds_per_step"].items()}
        trained = {}
        for name, precision, memory_format in (("fp32", "fp32", layout), ("bf16", "bf16", layout),
                                               (other_name, "bf16", other)):
            fresh, source, test, _ = build(method, data)
            use_memory_format(fresh, memory_format)
            trained[name] = train_then_eval(fresh, source, test, precision, args.train_steps, s["lr"],
                                            s["meta_batch"], args.episodes)
        row["after_training"] = {"steps": args.train_steps, "eval": "5-way 1-shot, 15 queries", **trained}
        out["methods"][method] = {"setting": s, "default_layout": layout, **row}
        print(f"{method}: s/step {row['seconds_per_step']}, speed-up {row['speedup_vs_fp32']}, "
              f"grad error {row['grad_rel_error']}, after {args.train_steps} steps {trained}")
    save(args.name, out)


if __name__ == "__main__":
    main()
