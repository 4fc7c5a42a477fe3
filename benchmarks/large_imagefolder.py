"""Peak memory of a short training on a large image folder, cache build included.

    python benchmarks/large_imagefolder.py --images 60000 --size 84            # miniImageNet-sized
    python benchmarks/large_imagefolder.py --images 1000000 --size 84 --raw    # 21 GB of pixels, quickly

(a) Writes a synthetic image folder of ``--images`` images (``train/``, ``val/``, ``test/`` with
64 / 16 / 20 % of the classes, ``--per-class`` images each; smooth random colour fields, JPEG or
PNG, ``--file-size`` pixels square) into ``--scratch`` (default: a folder in the user cache, never
the repository). A folder written before with the same settings is reused.

(b) Runs ``fastadapt train protonet --dataset imagefolder --image-size SIZE --steps N`` twice in a
subprocess: first with an empty dataset cache (decoding and writing the cache included), then again
reading the cache. A third run, the reference, trains the same way on a folder of 15 small classes:
what the training needs whatever the data (Python, torch, the model's activations), so that the
peak minus the reference's peak is the memory the data costs. For each run it records the peak resident set size (``ru_maxrss`` of the child,
from ``wait4``) and the peaks of its private (``RssAnon``) and file-backed (``RssFile``, here the
memory-mapped pool and the shared libraries: page cache, shared and reclaimable) parts, sampled
from /proc every 0.2 s. It
reports each peak over the pixel bytes (images x 3 x SIZE x SIZE).

``--raw`` skips decoding for sizes where writing and decoding image files would take hours: every
image file is a 1x1 placeholder and the cache file is written directly, through the library's own
cache writer, with random-ish pixels (so only the second, cached run happens). It checks that a
pool larger than what fits comfortably in memory trains with a small resident set.

``--src DIR`` runs the training with the package sources in DIR (e.g. another checkout's src/,
to compare with an earlier version). The JSON goes to
benchmarks/results/large_imagefolder_<images>x<size>[_raw][_<tag>].json. ``--clean`` deletes the scratch
folder at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from _common import require_clean_tree, save

REPO = Path(__file__).resolve().parents[1]
SPLITS = (("train", 0.64), ("val", 0.16), ("test", 0.20))


def class_counts(images: int, per_class: int) -> dict[str, int]:
    """Classes per split: 64 / 16 / 20 % of ``images // per_class`` classes (at least 5 each)."""
    classes = max(15, images // per_class)
    val = max(5, round(classes * 0.16))
    test = max(5, round(classes * 0.20))
    return {"train": classes - val - test, "val": val, "test": test}


def write_class(folder: Path, seed: int, count: int, file_size: int, fmt: str, raw: bool) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colour = rng.integers(30, 226, 3)
    if raw:  # one 1x1 PNG, encoded once, in every file of the class
        buf = io.BytesIO()
        Image.new("RGB", (1, 1), tuple(int(c) for c in colour)).save(buf, "PNG")
        for i in range(count):
            (folder / f"{i:05d}.png").write_bytes(buf.getvalue())
        return
    for i in range(count):
        path = folder / f"{i:05d}.{fmt}"
        block = np.clip(colour + rng.normal(0, 50, (6, 6, 3)), 0, 255).astype(np.uint8)
        im = Image.fromarray(block).resize((file_size, file_size), Image.Resampling.BILINEAR)
        im.save(path, quality=90) if fmt == "jpg" else im.save(path)


def generate(root: Path, counts: dict[str, int], per_class: int, file_size: int, fmt: str, raw: bool) -> float:
    """Write the folder (unless a complete one with these settings is there); seconds taken."""
    settings = {"classes": counts, "per_class": per_class, "file_size": file_size, "format": fmt, "raw": raw}
    marker = root / "complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        print(f"reusing {root}")
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    jobs, seed = [], 0
    for split, n in counts.items():
        for c in range(n):
            jobs.append((root / split / f"n{seed:05d}", seed, per_class, file_size, fmt, raw))
            seed += 1
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for done, _ in enumerate(pool.map(lambda j: write_class(*j), jobs), 1):
            if done % max(1, len(jobs) // 10) == 0:
                print(f"  wrote {done}/{len(jobs)} classes", flush=True)
    marker.write_text(json.dumps(settings))
    return time.perf_counter() - t


def write_raw_cache(root: Path, size: int, chunk_images: int = 2048) -> float:
    """Write the decoded cache of ``root`` directly with synthetic pixels; seconds taken."""
    from fastadapt.data.imagefolder import imagefolder_cache_plan
    from fastadapt.data.pool_cache import CacheContent, load_cache, write_cache

    stem, source, layout = imagefolder_cache_plan(str(root), size)
    if load_cache(stem, source) is not None:
        print(f"reusing the cache {stem}.u8")
        return 0.0
    rows = sum(sum(part["counts"]) for part in layout["splits"].values())
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (chunk_images, 3, size, size), dtype=np.uint8)

    def chunks():
        for k, start in enumerate(range(0, rows, chunk_images)):
            n = min(chunk_images, rows - start)
            yield np.roll(base[:n], k, axis=0) + np.uint8(k % 251)  # cheap, and no two chunks alike
            if k % 50 == 0:
                print(f"  cache: {start + n}/{rows} images", flush=True)

    t = time.perf_counter()
    write_cache(stem, source, CacheContent((3, size, size), rows, chunks(), layout))
    return time.perf_counter() - t


def status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def run_training(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; its exit code, seconds, ru_maxrss and polled peaks (bytes)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    peaks: dict[str, int] = {}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            for key, value in status_kib(proc.pid).items():
                peaks[key] = max(peaks.get(key, 0), value)
            stop.wait(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    stop.set()
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    return {"exit_code": proc.returncode, "seconds": round(time.perf_counter() - t, 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024,
            **{f"polled_peak_{k}_bytes": v * 1024 for k, v in sorted(peaks.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=60000, help="number of images (default 60000, miniImageNet)")
    ap.add_argument("--size", type=int, default=84, help="--image-size of the training (default 84)")
    ap.add_argument("--per-class", type=int, default=600, help="images per class (default 600)")
    ap.add_argument("--file-size", type=int, default=None, help="pixels of the image files (default --size)")
    ap.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image file format (default jpg)")
    ap.add_argument("--raw", action="store_true",
                    help="1x1 placeholder files and the cache written directly (no decoding; for very large sizes)")
    ap.add_argument("--scratch", type=Path, default=None,
                    help="folder for the images, the dataset cache and the runs "
                         "(default <user cache>/bench-imagefolder-<images>x<size>[-raw])")
    ap.add_argument("--steps", type=int, default=30, help="training iterations per run (default 30)")
    ap.add_argument("--shots", type=int, default=5, help="training shots of the 5-way episodes (default 5)")
    ap.add_argument("--queries", type=int, default=15, help="training queries per class (default 15)")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference run on a small folder")
    ap.add_argument("--eval-episodes", type=int, default=20, help="final test episodes per run (default 20)")
    ap.add_argument("--threads", type=int, default=2, help="--threads of the training (default 2)")
    ap.add_argument("--src", type=Path, default=REPO / "src", help="package sources the training runs (default ./src)")
    ap.add_argument("--tag", default="", help="suffix of the result's name (e.g. 'main' with --src of a main checkout)")
    ap.add_argument("--clean", action="store_true", help="delete the scratch folder at the end")
    args = ap.parse_args()
    require_clean_tree()

    sys.path.insert(0, str(args.src))
    from fastadapt.data.cache import cache_dir

    name = f"{args.images}x{args.size}" + ("-raw" if args.raw else "")
    scratch = (args.scratch or cache_dir() / f"bench-imagefolder-{name}").resolve()
    if REPO in scratch.parents or scratch == REPO:
        sys.exit(f"--scratch {scratch} is inside the repository; choose a folder outside it")
    data, cache, runs = scratch / "images", scratch / "cache", scratch / "runs"
    os.environ["FASTADAPT_CACHE"] = str(cache)  # this process (--raw) and the training runs alike
    counts = class_counts(args.images, args.per_class)
    images = sum(counts.values()) * args.per_class
    pixel_bytes = images * 3 * args.size * args.size
    print(f"{images} images in {sum(counts.values())} classes ({counts}); {pixel_bytes / 2**30:.2f} GiB of pixels "
          f"at {args.size} px; scratch {scratch}")
    gen_s = generate(data, counts, args.per_class, args.file_size or args.size, args.format, args.raw)
    raw_cache_s = write_raw_cache(data, args.size) if args.raw else None
    if not args.raw:
        shutil.rmtree(cache, ignore_errors=True)  # the first run decodes and writes the cache

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.src.resolve()), os.environ.get("PYTHONPATH", "")])}
    phases = {"cold_cache": data, "cached": data}
    if args.raw:
        del phases["cold_cache"]
    if not args.no_reference:
        reference = scratch / "reference"
        generate(reference, {"train": 5, "val": 5, "test": 5}, args.shots + args.queries + 5,
                 args.file_size or args.size, args.format, False)
        phases["reference"] = reference
    results = {}
    for phase, folder in phases.items():
        shutil.rmtree(runs / phase, ignore_errors=True)  # a fresh run, not a resumed one
        cmd = [sys.executable, "-m", "fastadapt", "train", "protonet", "--dataset", "imagefolder",
               "--data-dir", str(folder), "--image-size", str(args.size), "--steps", str(args.steps),
               "--ways", "5", "--shots", str(args.shots), "--queries", str(args.queries),
               "--eval-episodes", str(args.eval_episodes),
               "--threads", str(args.threads), "--checkpoint-every", "0", "--out", str(runs / phase), "--no-progress"]
        print(f"{phase}: {' '.join(cmd)}", flush=True)
        r = run_training(cmd, env)
        r["command"] = " ".join(cmd[1:])
        if phase != "reference":  # its pixels are not those of the folder
            r["peak_rss_over_pixel_bytes"] = round(r["peak_rss_bytes"] / pixel_bytes, 3)
            for key in ("RssAnon", "RssFile"):
                if f"polled_peak_{key}_bytes" in r:
                    r[f"polled_peak_{key}_over_pixel_bytes"] = round(r[f"polled_peak_{key}_bytes"] / pixel_bytes, 3)
        results[phase] = r
        print(f"{phase}: exit {r['exit_code']}, {r['seconds']} s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB "
              f"= {r.get('peak_rss_over_pixel_bytes', '-')}x the pixels "
              f"(private {r.get('polled_peak_RssAnon_bytes', 0) / 2**30:.2f} GiB, "
              f"file-backed {r.get('polled_peak_RssFile_bytes', 0) / 2**30:.2f} GiB, sampled)", flush=True)
    if "reference" in results:
        ref = results["reference"]["peak_rss_bytes"]
        for phase in ("cold_cache", "cached"):
            if phase in results:
                extra = results[phase]["peak_rss_bytes"] - ref
                results[phase]["peak_rss_minus_reference_bytes"] = extra
                results[phase]["peak_rss_minus_reference_over_pixel_bytes"] = round(extra / pixel_bytes, 3)
                print(f"{phase}: the data cost {extra / 2**30:.2f} GiB above the reference run "
                      f"= {extra / pixel_bytes:.3f}x the pixels")
    cache_bytes = sum(p.stat().st_size for p in cache.glob("*.u8")) if cache.is_dir() else 0
    save(f"large_imagefolder_{name.replace('-', '_')}" + (f"_{args.tag}" if args.tag else ""), {
        "images": images, "classes": counts, "per_class": args.per_class, "image_size": args.size,
        "file_size": args.file_size or args.size, "format": "1x1 png placeholders" if args.raw else args.format,
        "raw": args.raw, "episodes": f"5-way {args.shots}-shot {args.queries} queries", "pixel_bytes": pixel_bytes, "pixel_gib": round(pixel_bytes / 2**30, 3),
        "cache_file_bytes": cache_bytes, "src": str(args.src.resolve()),
        "generate_seconds": round(gen_s, 1),
        "raw_cache_write_seconds": None if raw_cache_s is None else round(raw_cache_s, 1),
        "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "runs": results})
    if args.clean:
        shutil.rmtree(scratch, ignore_errors=True)
        print(f"deleted {scratch}")
    if any(r["exit_code"] != 0 for r in results.values()):
        sys.exit("a training run failed")


if __name__ == "__main__":
    main()
