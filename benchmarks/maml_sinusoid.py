"""Sinusoid regression (Finn et al. 2017, Sec. 5.1): MAML against a pre-trained model.

Both use the MLP 1-40-40-1, K support points, meta-batch 25 and Adam (1e-3); MAML meta-learns
with 1 inner SGD step of 0.01; the baseline is trained on the pooled points of all tasks. Both
are then fine-tuned on a test task's K points by the same inner loop (SGD, 0.01) and scored by
MSE on 100 points of the same curve after 1, 5 and 10 steps, over the same 600 test tasks (drawn
from the test split's own stream: never training tasks). The settings are the package defaults
for ``--task sinusoid`` (``fastadapt.config.resolve``), with K set per run.
Paper (K = 5, 70,000 meta-iterations): MAML 0.67 / 0.38 / 0.35, pre-trained 2.41 / 2.23 / 2.19
(read from its Fig. 3; the K = 5 MAML curve).

Also timed, side by side on the same meta-batches: seconds per meta-iteration of MAML with the
tasks as a loop and under vmap (the ``--batching auto`` rule picks vmap for this MLP).

    python benchmarks/maml_sinusoid.py --steps 70000 --shots 5
    python benchmarks/maml_sinusoid.py --steps 70000 --shots 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from fastadapt.config import resolve
from fastadapt.engine.evaluate import evaluate
from fastadapt.engine.trainer import TrainSettings, meta_train
from fastadapt.methods import MAML, Pretrained
from fastadapt.tasks import SinusoidTasks

PAPER_K5 = {"maml": {1: 0.67, 5: 0.38, 10: 0.35}, "pretrain": {1: 2.41, 5: 2.23, 10: 2.19}}


def main() -> None:
    from _common import require_clean_tree, save

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=70000, help="meta-iterations of each model (paper: 70,000)")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--time-iters", type=int, default=100, help="meta-iterations timed per batching mode")
    args = ap.parse_args()
    require_clean_tree()
    torch.manual_seed(0)
    train = SinusoidTasks(args.shots, args.shots, split="train")  # K query points while training, as the paper
    test = SinusoidTasks(args.shots, 100, split="test")
    cfg = {**resolve("maml", {}, {"dataset": "sinusoid", "shots": args.shots}), "steps": args.steps}
    timing = time_batching(cfg, train, args.time_iters)
    learners = {"maml": MAML.from_config(cfg, (1,)), "pretrain": Pretrained.from_config(cfg, (1,))}
    for learner in learners.values():
        learner.decide_run_options("cpu")
    results: dict = {}
    for name, learner in learners.items():
        t0 = time.time()
        tr = meta_train(learner, train, TrainSettings(steps=args.steps, meta_batch=cfg["meta_batch"], lr=cfg["lr"],
                                                      lr_decay_every=0, progress=True,
                                                      log_every=max(1, args.steps // 10)))
        results[name] = {"train_seconds": round(time.time() - t0, 1), "final_train_metrics": tr.last_metrics,
                         "mse_after_steps": {}}
        for steps in (1, 5, 10):
            learner.inner_steps = steps
            res = evaluate(learner, test, args.episodes, seed=123, progress=False)
            results[name]["mse_after_steps"][steps] = {"mse": res["mse"], "ci95": res["ci95"],
                                                       "adapt_ms": res["adapt_ms"]}
            print(f"{name}: {steps} steps: mse {res['mse']:.3f} ± {res['ci95']:.3f}", flush=True)
        learner.inner_steps = 1
    payload = {"budget": f"CPU, {args.steps} meta-iterations per model (the paper: 70,000)"}
    payload.update(setup={"shots": args.shots, "query_points": 100, "test_tasks": args.episodes,
                          "meta_batch": cfg["meta_batch"], "inner_lr": cfg["inner_lr"], "train_inner_steps": 1,
                          "meta_lr": cfg["lr"], "model": "MLP 1-40-40-1", "batching": learners["maml"].batching,
                          "threads": torch.get_num_threads()},
                   batching_seconds_per_meta_iteration=timing,
                   results=results, paper_k5=PAPER_K5 if args.shots == 5 else None)
    save(f"maml_sinusoid_k{args.shots}", payload)
    plot(learners, test, args.shots)


def time_batching(cfg: dict, train: SinusoidTasks, iters: int) -> dict:
    """Median seconds per MAML meta-iteration with the tasks as a loop and under vmap, the two
    alternating on the same meta-batches."""
    import statistics

    learners = {m: MAML.from_config({**cfg, "batching": m}, (1,)) for m in ("loop", "vmap")}
    opts = {m: torch.optim.Adam(learner.parameters(), lr=cfg["lr"]) for m, learner in learners.items()}
    gen = torch.Generator().manual_seed(1)
    times: dict = {m: [] for m in learners}
    for i in range(iters + 3):
        batch = train.sample_batch(gen, cfg["meta_batch"])
        for m, learner in learners.items():
            t0 = time.perf_counter()
            learner.train_step(batch, opts[m], i + 1)
            if i >= 3:  # warm-up
                times[m].append(time.perf_counter() - t0)
    out = {m: statistics.median(v) for m, v in times.items()}
    out["vmap_speedup"] = out["loop"] / out["vmap"]
    print(f"seconds per meta-iteration: loop {out['loop'] * 1e3:.2f} ms, vmap {out['vmap'] * 1e3:.2f} ms "
          f"({out['vmap_speedup']:.1f}x)", flush=True)
    return out


def plot(learners: dict, source: SinusoidTasks, shots: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = torch.Generator().manual_seed(7)
    amp, phase = source.draw_functions(gen, 1)
    sx = -5 + 10 * torch.rand(1, shots, 1, generator=gen)
    sy = source.curve(amp, phase, sx)[0]
    grid = torch.linspace(-5, 5, 200).reshape(1, -1, 1)
    truth = source.curve(amp, phase, grid)[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, (name, learner) in zip(axes, learners.items()):
        ax.plot(grid[0, :, 0], truth[:, 0], "k-", lw=2, label="ground truth")
        for steps, style in ((0, ":"), (1, "--"), (10, "-")):
            if steps == 0:
                params = {k: v.detach() for k, v in learner._adapted().items()}
            else:
                learner.inner_steps = steps
                params = learner.adapt(sx[0], sy)
            with torch.no_grad():
                pred = learner.predict(params, grid[0])
            ax.plot(grid[0, :, 0], pred[:, 0], style, label=f"{steps} steps" if steps else "before adapting")
        learner.inner_steps = 1
        ax.plot(sx[0, :, 0], sy[:, 0], "r^", ms=8, label=f"{shots} support points")
        ax.set_title("MAML" if name == "maml" else "pre-trained")
        ax.set_xlabel("x")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(__file__).resolve().parent / "results" / f"maml_sinusoid_k{shots}.png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
