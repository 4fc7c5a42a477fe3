"""Few-shot evaluation: accuracy (or MSE) with a 95% confidence interval, and its costs."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..errors import ConfigError
from ..methods.base import MetaLearner
from ..precision import autocast
from ..progress import progress_bar
from ..tasks.image_function import KIND as IMAGE_FUNCTION
from ..tasks.image_function import psnr
from ..tasks.sampler import on_device
from ..measure.memory import PeakMemory
from ..measure.stats import mean_ci95, median


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(
    learner: MetaLearner,
    source: Any,
    episodes: int = 1000,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "eval",
    keep_scores: bool = False,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Adapt to ``episodes`` tasks drawn from ``source`` and score each on its query set.

    Returns ``accuracy`` and ``ci95`` in percent for classification (``mse`` and ``ci95`` for
    regression; for image functions ``psnr`` and ``ci95`` in dB, the mean over images of the
    per-image PSNR ``10 log10(1 / MSE)`` over all its pixels, and ``mean_mse``), ``episodes``,
    ``adapt_ms`` (median wall time of :meth:`MetaLearner.adapt` per episode), ``predict_ms``,
    ``peak_mem_mb`` and ``peak_mem_kind``. The episodes are a pure function of ``seed``.
    ``keep_scores`` adds ``scores``, the score of every episode in order (for paired comparisons
    of learners evaluated with the same seed). ``precision`` ``bf16`` runs adaptation and prediction
    under bfloat16 autocast (:mod:`fastadapt.precision`).
    """
    if episodes < 1:
        raise ConfigError(f"--episodes must be at least 1, got {episodes}")
    device = torch.device(device)
    source = on_device(source, device)
    kind = getattr(source, "kind", "classification")
    regression = kind == "regression"
    image_function = kind == IMAGE_FUNCTION
    mses: list[float] = []
    gen = torch.Generator().manual_seed(seed)
    was_training = learner.training
    learner.eval()
    scores: list[float] = []
    adapt_ms: list[float] = []
    predict_ms: list[float] = []
    try:
        with PeakMemory(device) as pm:
            for _ in progress_bar(range(episodes), enabled=progress, desc=desc, unit="episode"):
                ep = source.sample(gen).to(device)
                _sync(device)
                t0 = time.perf_counter()
                with torch.set_grad_enabled(learner.adapt_requires_grad), autocast(device, precision):
                    adapted = learner.adapt(ep.support_x, ep.support_y)
                _sync(device)
                t1 = time.perf_counter()
                with torch.no_grad(), autocast(device, precision):
                    out = learner.predict(adapted, ep.query_x).float()
                _sync(device)
                t2 = time.perf_counter()
                adapt_ms.append(1e3 * (t1 - t0))
                predict_ms.append(1e3 * (t2 - t1))
                if image_function:
                    mse = torch.mean((out.double() - ep.query_y.double()) ** 2)
                    mses.append(float(mse))
                    scores.append(float(psnr(mse)))
                elif regression:
                    scores.append(float(torch.mean((out - ep.query_y) ** 2)))
                else:
                    scores.append(100.0 * float((out.argmax(-1) == ep.query_y).float().mean()))
    finally:
        learner.train(was_training)
    mean, ci = mean_ci95(scores)
    if image_function:
        result: dict[str, Any] = {"psnr": mean, "ci95": ci, "mean_mse": sum(mses) / len(mses), "episodes": episodes}
    else:
        result = {"mse" if regression else "accuracy": mean, "ci95": ci, "episodes": episodes}
    result.update(
        adapt_ms=median(adapt_ms),
        predict_ms=median(predict_ms),
        peak_mem_mb=pm.peak_mb,
        peak_mem_kind=pm.kind,
        device=str(device),
    )
    if keep_scores:
        result["scores"] = scores
    return result


def format_result(result: dict[str, Any]) -> str:
    """The one-line summary the CLI prints."""
    if "accuracy" in result:
        head = f"accuracy: {result['accuracy']:.2f} ± {result['ci95']:.2f} %"
    elif "psnr" in result:
        head = f"psnr: {result['psnr']:.2f} ± {result['ci95']:.2f} dB"
    else:
        head = f"mse: {result['mse']:.4f} ± {result['ci95']:.4f}"
    return (
        f"{head}  ({result['episodes']} {'images' if 'psnr' in result else 'episodes'}; "
        f"adapt {result['adapt_ms']:.2f} ms/{'image' if 'psnr' in result else 'episode'}, "
        f"peak memory {result['peak_mem_mb']:.0f} MB)"
    )
