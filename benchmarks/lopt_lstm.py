"""The coordinatewise LSTM optimizer (Andrychowicz et al. 2016) against tuned baselines.

Meta-trains the LSTM rule on the quadratic family and on the paper's MNIST problem (one hidden
layer of 20 sigmoid units, minibatches of 128, 100 steps in truncations of 20), then trains unseen
problems with it (untuned) and with SGD, momentum, RMSprop and Adam, each tuned on an 11-value
learning-rate grid on separate problems: at the meta-training horizon, at twice it, and on the
paper's generalisation problems (40 units, two layers, ReLU) and another dataset (CIFAR-10).

    python benchmarks/lopt_lstm.py --data ../shared/data          # about an hour on 2 CPU cores
    python benchmarks/lopt_lstm.py --quick                        # a few minutes, a check only

Writes benchmarks/results/lopt_lstm.json (table, meta-training seconds and CPU-seconds) and the
curves of every evaluation under benchmarks/results/lopt/ (JSON + PNG).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, require_clean_tree, run_cli, save  # noqa: E402

from fastadapt.data.cache import cache_dir  # noqa: E402

EVALS = [  # (trained on, evaluated on, steps as a multiple of the horizon)
    ("quadratic", "quadratic", 1), ("quadratic", "quadratic", 2),
    ("mnist-mlp", "mnist-mlp", 1), ("mnist-mlp", "mnist-mlp", 2),
    ("mnist-mlp", "mnist-mlp-wide", 1), ("mnist-mlp", "mnist-mlp-deep", 1), ("mnist-mlp", "mnist-mlp-relu", 1),
    ("mnist-mlp", "cifar10-mlp", 1),
]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("FASTADAPT_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")),
                    help="folder with mnist/ and cifar10/ (default $FASTADAPT_DATA, else ../shared/data)")
    ap.add_argument("--runs", default=str(cache_dir() / "lopt-runs"),
                    help="where the meta-training runs go (resumed if present)")
    ap.add_argument("--quadratic-trajectories", type=int, default=300)
    ap.add_argument("--mnist-trajectories", type=int, default=400)
    ap.add_argument("--meta-lr", type=float, default=3e-3,
                    help="Adam rate of the rule's weights (the reference code's 1e-3 needs many more trajectories)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="20 trajectories each, 2 seeds: checks the pipeline only")
    args = ap.parse_args()
    require_clean_tree()
    if args.quick:
        args.quadratic_trajectories = args.mnist_trajectories = 20
        args.seeds = 2
    os.environ["FASTADAPT_DATA"] = args.data
    trajectories = {"quadratic": args.quadratic_trajectories, "mnist-mlp": args.mnist_trajectories}
    tag = "-quick" if args.quick else ""
    training = {}
    for family, n in trajectories.items():
        out = Path(args.runs) / f"lstm-{family}{tag}"
        t0, c0 = time.perf_counter(), cpu_seconds()
        run_cli(["lopt", "train", "--optimizer", "lstm", "--optimizee", family, "--trajectories", str(n),
                 "--lr", str(args.meta_lr), "--out", str(out), "--threads", str(args.threads), "--val-every", "25"])
        cfg_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        training[family] = {"run": str(out), "trajectories": n, "wall_seconds_this_invocation": time.perf_counter() - t0,
                            "cpu_seconds_this_invocation": cpu_seconds() - c0,
                            "train_seconds": cfg_rows[-1]["seconds"] if cfg_rows else None,
                            "best_val_loss": min((r["val_loss"] for r in cfg_rows if "val_loss" in r), default=None)}
    out_dir = RESULTS / "lopt"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for trained, target, mult in EVALS:
        steps = 100 * mult
        name = f"lstm{tag}-{trained}-on-{target}-{steps}"
        run_cli(["lopt", "eval", training[trained]["run"], "--optimizee", target, "--steps", str(steps),
                 "--seeds", str(args.seeds), "--threads", str(args.threads),
                 "--json", str(out_dir / f"{name}.json"), "--plot", str(out_dir / f"{name}.png")])
        summary = json.loads((out_dir / f"{name}.json").read_text())
        summary["eval_command"] = summary.pop("command")  # written again with this run's record
        save(f"lopt/{name}", summary)
        res = summary["results"]
        best = min((b for b in res if b != "learned"), key=lambda b: res[b]["final_loss"])
        rows.append({"trained_on": trained, "evaluated_on": target, "steps": steps,
                     "learned": res["learned"]["final_loss"], "learned_sd": res["learned"]["final_loss_sd"],
                     "adam": res["adam"]["final_loss"], "adam_lr": res["adam"]["lr"],
                     "best_baseline": best, "best_baseline_loss": res[best]["final_loss"],
                     "learned_steps_to_adam": res["learned"]["steps_to_target"],
                     "adam_steps": res["adam"]["steps_to_target"],
                     "learned_ms_per_step": res["learned"]["step_ms"], "adam_ms_per_step": res["adam"]["step_ms"],
                     "curves": str((out_dir / f"{name}.png").relative_to(RESULTS.parent.parent))})
    lines = ["| trained on | evaluated on | steps | LSTM (untuned) | tuned Adam (lr) | best tuned baseline | "
             "steps to Adam's final loss: LSTM / Adam | ms per step: LSTM / Adam |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['trained_on']} | {r['evaluated_on']} | {r['steps']} | {r['learned']:.4g} ± {r['learned_sd']:.2g} "
                     f"| {r['adam']:.4g} ({r['adam_lr']:g}) | {r['best_baseline']} {r['best_baseline_loss']:.4g} | "
                     f"{r['learned_steps_to_adam'] or '-'} / {r['adam_steps'] or '-'} | "
                     f"{r['learned_ms_per_step']:.2f} / {r['adam_ms_per_step']:.2f} |")
    table = "\n".join(lines)
    print(table)
    save(f"lopt_lstm{tag}", {"training": training, "rows": rows, "table": table, "threads": args.threads,
                             "seeds": args.seeds, "meta_lr": args.meta_lr})


if __name__ == "__main__":
    main()
