"""Evaluation of test-time adaptation on corrupted CIFAR-10: error with a 95% CI, and its cost.

The test stream is the CIFAR-10 test set (optionally a seeded subset) in a fixed seeded random
order, corrupted once (:func:`fastadapt.tta.corruptions.corrupt_dataset`), and fed in batches;
every method starts from the source model afresh for every corruption, as in the TENT and TTT
papers. Error is the mean of per-image 0/1 errors. Its 95% interval depends on whether the
predictions are independent (:data:`CI_KIND`): for ``source`` and standard ``ttt`` (reset before
every image) each image is an independent trial and the per-image normal interval
(``1.96 sd / sqrt(n)``) is right; ``bn``, ``tent`` and ``ttt-online`` predict an image with
statistics or weights that depend on the other images of its batch (and, online, on the stream so
far), so the interval comes from the errors of the batches, as independent-ish blocks
(:func:`fastadapt.measure.stats.batch_mean_ci95`, ``t(0.975, B - 1) sd / sqrt(B)`` over ``B``
batches). Each result records the method used (``ci_method``) and the per-image outcomes
(``wrong_bits``) for paired comparisons. Cost is wall time per batch and per image (adaptation
and prediction together, as they are one pass for TENT and inseparable for TTT) and the peak
memory of the whole stream, recorded with what they depend on (``cost_context``: PyTorch's thread
count, the number of cores, and the load average at the start and the end of the stream).
"""

from __future__ import annotations

import time
from copy import deepcopy
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from ..data.cifar10 import load_cifar10
from ..errors import ConfigError
from ..progress import progress_bar
from .corruptions import corrupt_dataset, frost_photographs
from .train_source import load_source_model
from .augment import to_float
from .bn import BNAdapt
from .tent import setup_tent
from .ttt import TTT
from ..measure.memory import PeakMemory
from ..measure.stats import batch_mean_ci95, mean_ci95, median
from ..measure.threads import cost_context, load_average

TTA_METHODS = ("source", "bn", "tent", "ttt", "ttt-online")
CLEAN = "clean"
# How the 95% CI of each method's error is formed: "image" (predictions independent per image) or
# "batch" (batch means: the predictions within a batch, and online across batches, are dependent).
CI_KIND = {"source": "image", "ttt": "image", "bn": "batch", "tent": "batch", "ttt-online": "batch"}


class _Source(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _check_method(method: str) -> None:
    if method not in TTA_METHODS:
        raise ConfigError(f"unknown test-time method '{method}'; choose one of {', '.join(TTA_METHODS)}")


def build_adapter(method: str, model: nn.Module, options: dict[str, Any] | None = None) -> nn.Module:
    """A fresh adapter around a deep copy of ``model`` (the source model is never modified).

    ``options``: ``lr``, ``steps``, ``episodic`` for TENT; ``lr``, ``steps``, ``copies``, ``seed``,
    ``ttt_bn`` and ``ttt_head`` ("train", the default, or "frozen") for TTT.
    """
    _check_method(method)
    opts = dict(options or {})
    model = deepcopy(model)
    if method == "source":
        return _Source(model)
    if method == "bn":
        return BNAdapt(model)
    if method == "tent":
        return setup_tent(model, lr=float(opts.get("lr") or 1e-3), steps=int(opts.get("steps") or 1),
                          episodic=bool(opts.get("episodic", False)))
    return TTT(model, online=method == "ttt-online", steps=opts.get("steps") or None,
               copies=int(opts.get("copies") or 32), lr=float(opts.get("lr") or 1e-3), seed=int(opts.get("seed") or 0),
               bn=str(opts.get("ttt_bn") or "train"), head=str(opts.get("ttt_head") or "train"))


def pack_wrong(wrong: list[bool] | Tensor) -> str:
    """Per-image outcomes (true: wrong) as a hex string, 8 images a byte, first image in the top bit."""
    bits = [bool(w) for w in (wrong.tolist() if isinstance(wrong, Tensor) else wrong)]
    out = bytearray()
    for i in range(0, len(bits), 8):
        chunk = bits[i : i + 8] + [False] * (8 - len(bits[i : i + 8]))
        out.append(sum(int(b) << (7 - k) for k, b in enumerate(chunk)))
    return out.hex()


def unpack_wrong(text: str, n: int) -> list[int]:
    """The ``n`` per-image outcomes (1: wrong) of :func:`pack_wrong`."""
    data = bytes.fromhex(text)
    if len(data) != (n + 7) // 8:
        raise ConfigError(f"{len(data)} bytes of outcomes cannot hold exactly {n} images")
    return [(data[i // 8] >> (7 - i % 8)) & 1 for i in range(n)]


def error_ci95(wrong_percent: list[float], kind: str, batch_size: int) -> tuple[float, float | None, str]:
    """Mean error, 95% CI half-width and a description of how it was formed (see :data:`CI_KIND`)."""
    if kind == "image":
        err, ci = mean_ci95(wrong_percent)
        return err, ci, f"per-image normal approximation, 1.96 sd / sqrt(n) over {len(wrong_percent)} images"
    if kind == "batch":
        err, ci = batch_mean_ci95(wrong_percent, batch_size)
        b = -(-len(wrong_percent) // batch_size)
        how = (f"batch means: t(0.975, {b - 1}) sd / sqrt({b}) over the errors of {b} batches of "
               f"{batch_size} (predictions within a batch are not independent)")
        return err, ci, how if ci is not None else "none: a single batch gives no batch-level estimate"
    raise ConfigError(f"CI kind must be 'image' or 'batch', got '{kind}'")


def paired_difference(method: dict[str, Any] | list[dict[str, Any]], source: dict[str, Any] | list[dict[str, Any]],
                      kind: str) -> dict[str, Any]:
    """Error of ``method`` minus error of ``source`` on the same images, with its 95% CI.

    Both are results of :func:`run_stream` on the same stream (same images, order and batch size),
    or equally long lists of such pairs (say, one per corruption, all on the same images): then the
    difference is that of the means over the list, each image's differences averaged first, since
    the same image under different corruptions gives correlated outcomes. The difference is paired
    per image; the CI is formed over the per-image differences for ``kind="image"`` and over the
    per-batch differences for ``kind="batch"``, as :func:`error_ci95`. ``significant`` is whether
    the interval excludes 0 (``None`` where there is none).
    """
    methods = method if isinstance(method, list) else [method]
    sources = source if isinstance(source, list) else [source]
    if not methods or len(methods) != len(sources):
        raise ConfigError("a paired difference needs as many source results as method results")
    n = int(methods[0]["images"])
    batch = int(methods[0]["batch_size"])
    diff = [0.0] * n
    for m, src in zip(methods, sources):
        if any(int(r["images"]) != n or "wrong_bits" not in r for r in (m, src)):
            raise ConfigError("a paired difference needs the per-image outcomes of both on the same images")
        for i, (x, y) in enumerate(zip(unpack_wrong(m["wrong_bits"], n), unpack_wrong(src["wrong_bits"], n))):
            diff[i] += 100.0 * (x - y) / len(methods)
    mean, half, how = error_ci95(diff, kind, batch)
    return {"difference": mean, "ci95": half, "ci_method": "paired, " + how, "images": n, "results": len(methods),
            "significant": None if half is None else abs(mean) > half}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_stream(
    adapter: Callable[[Tensor], Tensor],
    images: Tensor,
    labels: Tensor,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "tta",
    ci: str = "image",
) -> dict[str, Any]:
    """Feed uint8 ``images`` to ``adapter`` in order, ``batch_size`` at a time; score and time it.

    ``ci``: ``"image"`` when the predictions are independent per image, ``"batch"`` when they
    depend on the rest of their batch or on the stream (:data:`CI_KIND` gives each method's)."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if ci not in ("image", "batch"):
        raise ConfigError(f"CI kind must be 'image' or 'batch', got '{ci}'")
    device = torch.device(device)
    wrong: list[float] = []
    batch_ms: list[float] = []
    total = 0.0
    load_before = load_average()
    with PeakMemory(device) as pm:
        for i in progress_bar(range(0, len(images), batch_size), enabled=progress, desc=desc):
            x = to_float(images[i : i + batch_size].to(device))
            y = labels[i : i + batch_size].to(device)
            _sync(device)
            t0 = time.perf_counter()
            logits = adapter(x)
            _sync(device)
            dt = time.perf_counter() - t0
            total += dt
            batch_ms.append(1e3 * dt)
            wrong += (logits.argmax(1) != y).float().mul(100.0).tolist()
    err, half, how = error_ci95(wrong, ci, batch_size)
    return {
        "error": err,
        "ci95": half,
        "ci_method": how,
        "images": len(wrong),
        "wrong_bits": pack_wrong([w > 0 for w in wrong]),
        "batch_size": min(batch_size, len(wrong)),
        "ms_per_batch": median(batch_ms),
        "ms_per_image": 1e3 * total / len(wrong),
        "peak_mem_mb": pm.peak_mb,
        "peak_mem_kind": pm.kind,
        "device": str(device),
        "cost_context": {**cost_context(), "load_avg_at_start": load_before},
    }


def stream_order(n: int, seed: int, max_images: int = 0) -> Tensor:
    """The fixed order (and subset) of the test stream: a seeded permutation, first ``max_images``."""
    if max_images < 0:
        raise ConfigError(f"--max-images must be 0 (all) or positive, got {max_images}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:max_images] if max_images else order


def format_tta_result(r: dict[str, Any]) -> str:
    ci = f"{r['ci95']:.2f}" if r.get("ci95") is not None else "n/a"
    return (f"{r['method']:<10} {r['corruption']:<18} s{r['severity']}  error {r['error']:6.2f} ± {ci} %"
            f"  ({r['images']} images; {r['ms_per_batch']:.1f} ms/batch of {r['batch_size']}, "
            f"{r['ms_per_image']:.2f} ms/image, peak {r['peak_mem_mb']:.0f} MB)")


def evaluate_run(
    run_dir: str | Path,
    method: str,
    corruptions: list[str],
    severity: int,
    data_dir: str | None = None,
    batch_size: int = 128,
    max_images: int = 0,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    frost_dir: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    on_result=None,
) -> list[dict[str, Any]]:
    """Evaluate ``method`` on each corruption in turn, each from the source model afresh.

    ``on_result(result)`` is called as each corruption completes. Frost's photographs are looked
    for before any work, so a missing one fails at once (``DataError``), not after the others.
    """
    _check_method(method)
    if "frost" in corruptions:
        frost_photographs(frost_dir)
    model, cfg = load_source_model(run_dir, device)
    images, labels = load_cifar10("test", data_dir if data_dir is not None else cfg.get("data_dir"), progress=progress)
    order = stream_order(len(labels), seed, max_images)
    results = []
    for name in corruptions:
        shifted = images if name == CLEAN else corrupt_dataset(images, name, severity, seed, frost_dir, progress=progress)
        adapter = build_adapter(method, model, {**(options or {}), "seed": seed})
        r = run_stream(adapter, shifted[order], labels[order], batch_size, device, progress, desc=f"{method} {name}",
                       ci=CI_KIND[method])
        r.update(method=method, corruption=name, severity=severity, arch=cfg["arch"], seed=seed,
                 subset=f"seeded random {len(order)} of {len(labels)}" if max_images else "all")
        results.append(r)
        if on_result is not None:
            on_result(r)
    return results
