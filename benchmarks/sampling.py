"""Episodes per second drawn from a class pool, on one CPU thread.

    python benchmarks/sampling.py [--data-dir ../shared/data/omniglot]
    python benchmarks/sampling.py --mmap     # the same pools in memory and memory-mapped, side by side

Uses the Omniglot training split when it is found, else the built-in glyphs. Sampling includes
the uint8 -> float conversion, i.e. everything up to the model's input.

With ``--mmap`` each pool (the dataset's training split, and a synthetic miniImageNet-shaped pool
of 84x84 RGB images) is also written to a cache file (fastadapt.data.pool_cache, in a temporary
folder of the user cache, deleted afterwards) and mapped read-only, as image folders are. The page
cache is warm (every page read once before timing); repeats alternate between the two pools, and
the JSON (benchmarks/results/sampling_mmap.json) reports the ratio of their median rates.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import save, task_data_config

from fastadapt.data import build_task_source
from fastadapt.data.cache import cache_dir
from fastadapt.data.pool_cache import CacheContent, write_cache
from fastadapt.measure.stats import median
from fastadapt.tasks.sampler import ClassPool, EpisodeSampler

SHAPES = ((5, 1, 15), (5, 5, 15), (20, 5, 15), (60, 5, 5))


def rates(sampler, episodes: int, gen: torch.Generator) -> float:
    t = time.perf_counter()
    for _ in range(episodes):
        sampler.sample(gen)
    return episodes / (time.perf_counter() - t)


def in_memory_only(cfg: dict, args: argparse.Namespace) -> None:
    out = {}
    for ways, shots, queries in SHAPES:
        source = build_task_source(cfg, "train", ways, shots, queries)
        gen = torch.Generator().manual_seed(0)
        all_rates = [rates(source, args.episodes, gen) for _ in range(args.repeats)]
        key = f"{ways}w{shots}s{queries}q"
        out[key] = {"episodes_per_s_median": round(median(all_rates), 1), "all": [round(r, 1) for r in all_rates]}
        print(f"{key}: {median(all_rates):,.0f} episodes/s (one thread, median of {args.repeats})")
    save("sampling", {"dataset": cfg["dataset"], "threads": 1, "episodes_per_repeat": args.episodes, "results": out})


def mapped_copy(pool: ClassPool, folder: Path, name: str) -> ClassPool:
    """``pool`` written to a cache file and mapped read-only, its pages read once (a warm cache)."""
    rows = pool.images.numpy()
    chunks = (rows[i : i + 4096] for i in range(0, len(rows), 4096))
    images, _ = write_cache(folder / name, name, CacheContent(tuple(rows.shape[1:]), len(rows), chunks, {}))
    images.reshape(-1)[::4096].sum()  # touch every page
    return ClassPool(images, pool.offsets, pool.counts, pool.class_names)


def synthetic_rgb84(classes: int, per_class: int) -> ClassPool:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (classes * per_class, 3, 84, 84), dtype=np.uint8))
    return ClassPool.from_grouped(images.reshape(classes, per_class, 3, 84, 84))


def side_by_side(cfg: dict, args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="sampling-bench-", dir=cache_dir()))
    pools = {cfg["dataset"]: (build_task_source(cfg, "train", 5, 1, 1).pool, SHAPES, args.episodes),
             "rgb84": (synthetic_rgb84(args.rgb_classes, args.rgb_per_class), SHAPES[:2], args.rgb_episodes)}
    out = {}
    try:
        for name, (pool, shapes, episodes) in pools.items():
            mapped = mapped_copy(pool, folder, name)
            row_bytes = int(np.prod(pool.image_shape))
            out[name] = {"images": len(pool.images), "image_shape": list(pool.image_shape),
                         "pool_bytes": len(pool.images) * row_bytes, "episodes_per_repeat": episodes}
            for ways, shots, queries in shapes:
                samplers = {"in_memory": EpisodeSampler(pool, ways, shots, queries),
                            "memory_mapped": EpisodeSampler(mapped, ways, shots, queries)}
                gens = {k: torch.Generator().manual_seed(0) for k in samplers}
                got: dict[str, list[float]] = {k: [] for k in samplers}
                for _ in range(args.repeats):  # alternate, so that load changes hit both alike
                    for k, sampler in samplers.items():
                        got[k].append(rates(sampler, episodes, gens[k]))
                med = {k: median(v) for k, v in got.items()}
                ratio = med["memory_mapped"] / med["in_memory"]
                key = f"{ways}w{shots}s{queries}q"
                out[name][key] = {**{f"{k}_episodes_per_s_median": round(v, 1) for k, v in med.items()},
                                  **{f"{k}_all": [round(r, 1) for r in v] for k, v in got.items()},
                                  "mapped_over_in_memory": round(ratio, 3)}
                print(f"{name} {key}: in memory {med['in_memory']:,.0f}, memory-mapped {med['memory_mapped']:,.0f} "
                      f"episodes/s (ratio {ratio:.3f}; one thread, median of {args.repeats})")
            del mapped
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    save("sampling_mmap", {"dataset": cfg["dataset"], "threads": 1, "page_cache": "warm", "results": out})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="--mmap writes benchmarks/results/sampling_mmap.json, else sampling.json")
    ap.add_argument("--data-dir", default="../shared/data/omniglot", help="Omniglot folder (else the built-in glyphs)")
    ap.add_argument("--episodes", type=int, default=2000, help="episodes per timed repeat")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (the median is reported)")
    ap.add_argument("--mmap", action="store_true",
                    help="time each pool in memory and memory-mapped from a cache file, side by side")
    ap.add_argument("--rgb-classes", type=int, default=64, help="--mmap: classes of the synthetic 84x84 RGB pool")
    ap.add_argument("--rgb-per-class", type=int, default=100, help="--mmap: images per class of that pool")
    ap.add_argument("--rgb-episodes", type=int, default=300, help="--mmap: episodes per repeat on that pool")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = task_data_config(args.data_dir)
    (side_by_side if args.mmap else in_memory_only)(cfg, args)


if __name__ == "__main__":
    main()
