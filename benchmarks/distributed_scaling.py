"""Meta-training throughput with 1 and 2 processes (one CPU thread each), MAML and ProtoNet.

    python benchmarks/distributed_scaling.py [--steps 20] [--repeats 2]

Each configuration is a real ``fastadapt train`` run on the built-in glyphs: one process as a
plain ``python -m fastadapt``, two under ``torchrun --nproc-per-node 2`` (gloo), sharing each
meta-batch of 8 tasks. The figure is what ``results.json`` records: episodes per second of the
whole meta-batch over the training loop, measured by rank 0 (start-up, data loading and the
final test are not included). Runs alternate between 1 and 2 processes so that machine noise
hits both alike; medians are reported with the load average, since on a CPU shared with other
work two processes cannot show more than what is left of the second core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import require_clean_tree, save

from fastadapt.measure.stats import median

SRC = Path(__file__).resolve().parents[1] / "src"
# 5-way 1-shot 15-query episodes, 8 per meta-iteration; Conv-4 on 28 x 28 glyphs.
SETTINGS = ["--dataset", "builtin", "--ways", "5", "--shots", "1", "--queries", "15", "--meta-batch", "8",
            "--eval-ways", "5", "--eval-episodes", "10", "--checkpoint-every", "0", "--log-every", "10",
            "--no-progress", "--threads", "1"]
METHODS = {"maml": ["--inner-steps", "1"], "protonet": []}


def train(method: str, processes: int, steps: int, out: Path) -> dict:
    args = ["-m", "fastadapt", "train", method, *SETTINGS, *METHODS[method], "--steps", str(steps), "--out", str(out)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads((out / "results.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="meta-iterations per run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per configuration (alternating)")
    args = ap.parse_args()
    require_clean_tree()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            rates: dict[int, list[float]] = {1: [], 2: []}
            for r in range(args.repeats):
                for procs in ((1, 2) if r % 2 == 0 else (2, 1)):
                    res = train(method, procs, args.steps, Path(tmp) / f"{method}-{procs}-{r}")
                    rates[procs].append(res["train_episodes_per_s"])
                    print(f"{method}, {procs} process{'es' if procs > 1 else ''}: "
                          f"{res['train_episodes_per_s']:.2f} episodes/s (load {res['load_avg']})", flush=True)
            one, two = median(rates[1]), median(rates[2])
            results[method] = {"episodes_per_s": {"1": round(one, 2), "2": round(two, 2)},
                               "speedup_2_over_1": round(two / one, 2),
                               "all": {str(k): [round(v, 2) for v in vs] for k, vs in rates.items()}}
            print(f"{method}: 1 process {one:.2f}, 2 processes {two:.2f} episodes/s (x{two / one:.2f})", flush=True)
    save("distributed_scaling", {"dataset": "builtin", "threads_per_process": 1, "steps": args.steps,
                                 "meta_batch": 8, "setting": "5-way 1-shot, 15 queries", "backend": "gloo",
                                 "methods": {m: " ".join(a) for m, a in METHODS.items()}, "results": results})


if __name__ == "__main__":
    main()
