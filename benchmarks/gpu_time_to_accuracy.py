"""Time to accuracy on one GPU: ProtoNet and MAML on Omniglot, accuracy against training wall time.

- ProtoNet: 60-way 5-shot 15-query training episodes (the paper's), tested 5-way 1-shot.
- MAML: 5-way 1-shot, 15 queries, meta-batch 32, one inner step of 0.4, second order; vmap on the GPU.

Every ``--eval-every`` iterations the model is tested on ``--val-episodes`` 5-way 1-shot test
episodes (not counted in the training time); the curve of (training seconds, accuracy) and the
first time each target accuracy is reached are printed and saved as JSON. The plain references
measured on one H200 were 98.25 % (ProtoNet, 120 s) and 98.37 % (MAML, 170 s); the default
budgets (``--budget``) keep the whole script under 8 minutes on one GPU.

    python benchmarks/gpu_time_to_accuracy.py --device cuda [--precision bf16] [--budget 150]
    python benchmarks/gpu_time_to_accuracy.py --quick --device cpu   # a check: built-in glyphs, seconds
    python benchmarks/gpu_time_to_accuracy.py --plot benchmarks/results/gpu/tta_*.json --name gpu/time_to_accuracy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import require_clean_tree, save, save_figure, task_data_config  # noqa: E402

from fastadapt.config import resolve  # noqa: E402
from fastadapt.data import build_task_source  # noqa: E402
from fastadapt.engine.evaluate import evaluate  # noqa: E402
from fastadapt.engine.trainer import TrainSettings, meta_train  # noqa: E402
from fastadapt.models.conv4 import apply_memory_format  # noqa: E402
from fastadapt.registry import METHODS  # noqa: E402

RUNS = {
    "protonet": {"ways": 60, "shots": 5, "queries": 15, "meta_batch": 1, "lr": 1e-3, "target": 98.25, "reference_s": 120.0,
                 "eval_every": 1000},
    "maml": {"ways": 5, "shots": 1, "queries": 15, "meta_batch": 32, "lr": 1e-3, "target": 98.37, "reference_s": 170.0,
             "eval_every": 200,
             "options": {"inner_lr": 0.4, "inner_steps": 1}},
}


def run(method: str, data: dict[str, Any], device: str, precision: str, budget: float, eval_every: int | None,
        val_episodes: int, test_episodes: int, quick: bool, cuda_graphs: bool = True,
        lr_decay_every: int = 0, iterations: int = 0) -> dict[str, Any]:
    r = RUNS[method]
    eval_every = eval_every or r["eval_every"]
    sizes = {"ways": 5 if quick else r["ways"], "shots": r["shots"], "queries": 5 if quick else r["queries"]}
    cfg = resolve(method, {}, {**data, **sizes, **r.get("options", {})})
    cfg["progress"] = False
    source = build_task_source(cfg, "train", sizes["ways"], sizes["shots"], sizes["queries"])
    test = build_task_source(cfg, "test", 5, 1, 15)
    torch.manual_seed(0)
    learner = METHODS.get(method).from_config(cfg, source.in_shape)
    decided = {"memory_format": apply_memory_format(learner, cfg["memory_format"], device),
               **learner.decide_run_options(device)}
    curve: list[dict[str, float]] = []

    def on_log(row: dict[str, Any]) -> None:
        if "val_accuracy" in row:
            curve.append({"step": row["step"], "train_seconds": row["train_seconds"], "accuracy": row["val_accuracy"]})
            print(f"{method}: {row['train_seconds']:7.1f} s, iteration {row['step']}: {row['val_accuracy']:.2f} %",
                  flush=True)

    settings = TrainSettings(steps=iterations or 10 ** 9, meta_batch=2 if quick else r["meta_batch"], lr=r["lr"], device=device,
                             checkpoint_every=0, log_every=eval_every, val_every=eval_every,
                             val_episodes=val_episodes, max_train_seconds=budget, progress=False, precision=precision,
                             cuda_graphs=cuda_graphs, lr_decay_every=lr_decay_every)
    result = meta_train(learner, source, settings, None, test, on_log=on_log)
    final = evaluate(learner, test, test_episodes, seed=0, device=device, progress=False, precision=precision)
    reached = next((c["train_seconds"] for c in curve if c["accuracy"] >= r["target"]), None)
    print(f"{method}: {final['accuracy']:.2f} ± {final['ci95']:.2f} % after {result.train_seconds:.0f} s "
          f"({result.step} iterations, {result.episodes_per_s:.1f} episodes/s, peak {result.peak_mem_mb:.0f} MB); "
          f"reference {r['target']} % reached at {reached if reached is not None else 'not reached'} s", flush=True)
    return {"setting": {**sizes, "meta_batch": settings.meta_batch, **decided, "cuda_graphs": cuda_graphs,
                        "lr_decay_every": lr_decay_every, "max_iterations": iterations or None},
            "curve": curve,
            "final": {k: final[k] for k in ("accuracy", "ci95", "episodes")}, "iterations": result.step,
            "train_seconds": result.train_seconds, "episodes_per_s": result.episodes_per_s,
            "peak_mem_mb": result.peak_mem_mb, "reference_accuracy": r["target"], "reference_reached_s": reached}


def plot(results: list[Path], name: str) -> Path:
    """Test accuracy against training seconds of saved result files, one panel per method, with
    each method's reference (the plain loop's accuracy and time) marked."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RUNS), figsize=(5.5 * len(RUNS), 4), squeeze=False)
    for ax, method in zip(axes[0], RUNS):
        for path in results:
            data = json.loads(Path(path).read_text())
            r = data["methods"].get(method)
            if r is None:
                continue
            ax.plot([c["train_seconds"] for c in r["curve"]], [c["accuracy"] for c in r["curve"]], marker=".",
                    label=f"{data['precision']}, commit {data['commit'][:7]} ({Path(path).stem})")
        ref_s = RUNS[method]["reference_s"]
        ax.axhline(RUNS[method]["target"], color="gray", ls="--", lw=1)
        ax.plot([ref_s], [RUNS[method]["target"]], "k*", ms=10, label=f"plain loop: {RUNS[method]['target']} % at {ref_s:.0f} s")
        ax.plot([ref_s / 2], [RUNS[method]["target"]], "r*", ms=10, label="goal: the same in half the time")
        ax.set(title=method, xlabel="training seconds (tests excluded)", ylabel="5-way 1-shot test accuracy (%)",
               ylim=(85, 100))
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, name)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"))
    ap.add_argument("--budget", type=float, default=150.0, help="training seconds per method (default 150)")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="iterations between test points (default: ProtoNet 1000, MAML 200, about 4 s of the "
                         "references' training each)")
    ap.add_argument("--val-episodes", type=int, default=200)
    ap.add_argument("--test-episodes", type=int, default=1000)
    ap.add_argument("--methods", default="protonet,maml")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="replay each training step as a CUDA graph where the method offers one (as fastadapt train)")
    ap.add_argument("--lr-decay-every", type=int, default=0,
                    help="halve the Adam rate every N iterations (ProtoNet's paper: 2000); default 0, a constant "
                         "rate, as every recorded row")
    ap.add_argument("--iterations", type=int, default=0,
                    help="also stop after N training iterations (default 0: the time budget alone); for comparing "
                         "schedules at the same number of iterations on a slower device")
    ap.add_argument("--quick", action="store_true", help="a check of seconds: built-in glyphs, 5-way episodes (with --device cpu where no GPU is)")
    ap.add_argument("--name", default=None, help="result file name (default gpu_time_to_accuracy[_quick])")
    ap.add_argument("--plot", nargs="+", metavar="JSON", help="only draw the curves of saved result files "
                                                            "(PNG named by --name)")
    args = ap.parse_args(argv)
    if args.plot:
        plot([Path(p) for p in args.plot], args.name or "gpu_time_to_accuracy")
        return {}
    require_clean_tree()
    if args.quick:
        args.budget, args.eval_every, args.val_episodes, args.test_episodes = min(args.budget, 2.0), 2, 10, 20
        data: dict[str, Any] = {"dataset": "builtin"}
    else:
        data = task_data_config(args.data_dir)
        if data["dataset"] == "builtin":
            data = {"dataset": "omniglot"}  # downloaded into the cache
    out = {"device": args.device, "precision": args.precision, "budget_s": args.budget, "dataset": data["dataset"],
           "methods": {m: run(m, data, args.device, args.precision, args.budget, args.eval_every, args.val_episodes,
                              args.test_episodes, args.quick, args.cuda_graphs, args.lr_decay_every, args.iterations)
                       for m in args.methods.split(",")}}
    name = args.name or ("gpu_time_to_accuracy_quick" if args.quick else "gpu_time_to_accuracy")
    path = save(name, out)
    plot([path], name)
    return out


if __name__ == "__main__":
    main()
