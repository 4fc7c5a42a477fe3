"""Episodes per second drawn from an in-memory class pool, on one CPU thread.

    python benchmarks/sampling.py [--data-dir ../shared/data/omniglot]

Uses the Omniglot training split when it is found, else the built-in glyphs. Sampling includes
the uint8 -> float conversion, i.e. everything up to the model's input.
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import save, task_data_config

from fastadapt.data import build_task_source
from fastadapt.engine.stats import median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="../shared/data/omniglot")
    ap.add_argument("--episodes", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = task_data_config(args.data_dir)
    out = {}
    for ways, shots, queries in ((5, 1, 15), (5, 5, 15), (20, 5, 15), (60, 5, 5)):
        source = build_task_source(cfg, "train", ways, shots, queries)
        gen = torch.Generator().manual_seed(0)
        rates = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for _ in range(args.episodes):
                source.sample(gen)
            rates.append(args.episodes / (time.perf_counter() - t))
        key = f"{ways}w{shots}s{queries}q"
        out[key] = {"episodes_per_s_median": round(median(rates), 1), "all": [round(r, 1) for r in rates]}
        print(f"{key}: {median(rates):,.0f} episodes/s (one thread, median of {args.repeats})")
    save("sampling", {"dataset": cfg["dataset"], "threads": 1, "episodes_per_repeat": args.episodes, "results": out})


if __name__ == "__main__":
    main()
