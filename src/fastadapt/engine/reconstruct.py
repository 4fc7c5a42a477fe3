"""Reconstruction grids of image-function learners: ground truth beside each method's output.

:func:`reconstruct` adapts a learner to the first ``count`` test images of an evaluation (the same
seed gives the same images as :func:`fastadapt.engine.evaluate.evaluate`) and returns the images
and reconstructions as ``[count, C, H, W]`` tensors; :func:`save_grid` writes one row per image and
one column per entry (``ground truth | observed | method ...``) as a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..methods.base import MetaLearner
from ..tasks.image_function import scatter_to_image


def show_image(ax: Any, img: Tensor) -> None:
    """Draw one image ``[C, H, W]`` in [0, 1] (gray for one channel) on a matplotlib axis."""
    img = img.detach().float().clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")


def reconstruct(learner: MetaLearner, source: Any, count: int = 8, seed: int = 0,
                device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """``{"ground truth", "observed", "reconstruction"}`` images ``[count, C, H, W]`` of the first
    ``count`` episodes drawn with ``seed`` (``observed``: the support pixels, zero elsewhere)."""
    shape = tuple(source.in_shape)
    gen = torch.Generator().manual_seed(seed)
    was_training = learner.training
    learner.eval()
    gt, seen, rec = [], [], []
    try:
        for _ in range(count):
            ep = source.sample(gen).to(device)
            with torch.set_grad_enabled(learner.adapt_requires_grad):
                adapted = learner.adapt(ep.support_x, ep.support_y)
            with torch.no_grad():
                out = learner.predict(adapted, ep.query_x)
            gt.append(scatter_to_image(ep.query_x, ep.query_y, shape).cpu())
            seen.append(scatter_to_image(ep.support_x, ep.support_y, shape).cpu())
            rec.append(scatter_to_image(ep.query_x, out.detach(), shape).cpu())
    finally:
        learner.train(was_training)
    return {"ground truth": torch.stack(gt), "observed": torch.stack(seen), "reconstruction": torch.stack(rec)}


def save_grid(columns: Mapping[str, Tensor], path: str | Path, title: str | None = None,
              cell_inches: float = 1.1, dpi: int = 80) -> Path:
    """One row per image, one column per entry of ``columns`` (``[n, C, H, W]`` in ``[0, 1]``,
    clamped); gray for one channel. Written atomically as a PNG (a few hundred kB at most)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    n = min(len(v) for v in columns.values())
    head = 0.45 if title else 0.2  # inches above the first row: the title and the column names
    height = cell_inches * n + head
    fig, axes = plt.subplots(n, len(names), figsize=(max(cell_inches * len(names), 2.5), height), squeeze=False)
    for j, name in enumerate(names):
        for i in range(n):
            ax = axes[i][j]
            show_image(ax, columns[name][i])
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8, y=1 - 0.05 / height)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 1 - (head - 0.2) / height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path
