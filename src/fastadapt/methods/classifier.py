"""A feature extractor pre-trained as an ordinary classifier of all training (base) classes.

The first stage of parameter prediction from activations (``qiao``) and the whole of the
nearest-class-mean baseline (``ncm``): a backbone and one weight row per training class, trained
with cross-entropy on batches of labelled images drawn from the whole training split. The
classifier is cosine-style (Qiao et al. 2018, Sec. 3.3; also Gidaris & Komodakis 2018):
activations and weights are L2-normalised and the logits are their dot products times a
temperature ``scale`` (learned by default)::

    logits[i, c] = scale * <a_i / |a_i|, w_c / |w_c|>

Pre-training is driven by the step counter like the rest of a run: :meth:`draw_batch` hands the
trainer a :class:`~fastadapt.tasks.LabelledBatch` from the task source's generator, so the batches,
the checkpoints and a resumed run are exact, as for episodic training.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.conv4 import build_backbone
from ..registry import DATASETS
from ..tasks.episode import LabelledBatch
from .base import MetaLearner, accuracy


def cosine_logits(features: Tensor, weights: Tensor, scale: Tensor | float) -> Tensor:
    """``scale * normalize(features) @ normalize(weights).T``: ``[N, D] x [C, D] -> [N, C]``."""
    return scale * (F.normalize(features, dim=-1) @ F.normalize(weights, dim=-1).T)


def base_classes_of(cfg: dict[str, Any]) -> int:
    """The number of classes of the run's training split: ``cfg['base_classes']`` when a saved
    run recorded it, else what the dataset declares (``num_classes(cfg, 'train')``) without
    reading its images."""
    saved = cfg.get("base_classes")
    if saved:
        return int(saved)
    name = cfg.get("dataset") or "builtin"
    declared = getattr(DATASETS.get(name), "num_classes", None)
    if declared is None:
        raise ConfigError(f"{cfg.get('method')} trains a classifier of the training classes, but the {name} "
                          "dataset does not say how many it has; use an image dataset (--dataset builtin, omniglot "
                          "or imagefolder)")
    return int(declared(cfg, "train"))


class PretrainedClassifier(MetaLearner):
    """A backbone and a cosine classifier of ``base_classes`` training classes, trained on labelled
    batches of ``pretrain_batch`` images (not registered itself: ``ncm`` and ``qiao`` build on it).

    Shapes: ``backbone: [B, *in_shape] -> [B, D]``; ``classifier [base_classes, D]``.
    """

    options = {"backbone": "conv4", "pretrain_batch": 128, "scale": 10.0, "learn_scale": True}
    option_help = {
        "backbone": "feature extractor: conv4, resnet12 or resnet12-dropblock",
        "pretrain_batch": "labelled images per pre-training step (all training classes)",
        "scale": "temperature of the cosine classifier's logits",
        "learn_scale": "learn the temperature",
    }

    def __init__(self, backbone: nn.Module, base_classes: int, scale: float = 10.0, learn_scale: bool = True,
                 pretrain_batch: int = 128) -> None:
        super().__init__()
        self._check_classifier_options(base_classes, scale, pretrain_batch)
        dim = getattr(backbone, "out_features", None)
        if not isinstance(dim, int):
            raise ConfigError(f"{self.name} needs a backbone with an int attribute out_features (its feature size)")
        self.backbone = backbone
        self.base_classes, self.pretrain_batch = int(base_classes), int(pretrain_batch)
        self.classifier = nn.Parameter(torch.empty(self.base_classes, dim))
        nn.init.kaiming_uniform_(self.classifier, a=math.sqrt(5))  # as nn.Linear
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)))

    @staticmethod
    def _check_classifier_options(base_classes: int, scale: float, pretrain_batch: int) -> None:
        if isinstance(base_classes, bool) or not isinstance(base_classes, int) or base_classes < 2:
            raise ConfigError(f"a classifier of the training classes needs at least 2 of them, got {base_classes!r}")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ConfigError(f"--scale must be a positive number, got {scale!r}")
        if isinstance(pretrain_batch, bool) or not isinstance(pretrain_batch, int) or pretrain_batch < 1:
            raise ConfigError(f"--pretrain-batch must be a whole number >= 1, got {pretrain_batch!r}")

    @staticmethod
    def _classifier_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
        return {"scale": opts["scale"], "learn_scale": opts["learn_scale"], "pretrain_batch": opts["pretrain_batch"]}

    @staticmethod
    def _backbone(opts: dict[str, Any], in_shape: tuple[int, ...]) -> nn.Module:
        return build_backbone(opts.get("backbone", "conv4"), in_shape)

    def decide_run_options(self, device: torch.device | str) -> dict[str, Any]:
        # Saved in config.yaml, so the run can be rebuilt without reading its dataset.
        return {"base_classes": self.base_classes}

    # ---------------------------------------------------------------- pre-training
    def pretraining(self, step: int) -> bool:
        """Whether meta-iteration ``step`` (1-based) trains the classifier."""
        return True

    def _check_source(self, source: Any, needs: str) -> None:
        if not hasattr(source, needs):
            raise ConfigError(f"{self.name} trains a classifier of the training classes, but this task source "
                              f"({type(source).__name__}) gives no class labels; use an image dataset")
        count = getattr(source, "num_classes", None)
        if count is not None and count != self.base_classes:
            raise ConfigError(f"the training split has {count} classes but the {self.name} classifier was built for "
                              f"{self.base_classes}; train it on the split it was built for (--train-split, --data-dir)")

    def draw_batch(self, source: Any, generator: torch.Generator, meta_batch: int, step: int) -> Any:
        if self.pretraining(step):
            self._check_source(source, "sample_labelled")
            return source.sample_labelled(generator, self.pretrain_batch)
        return self._draw_meta_batch(source, generator, meta_batch)

    def _draw_meta_batch(self, source: Any, generator: torch.Generator, meta_batch: int) -> Any:
        return source.sample_batch(generator, meta_batch)

    def pretrain_loss(self, batch: LabelledBatch) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy of the cosine classifier over all training classes."""
        logits = cosine_logits(self.backbone(batch.x), self.classifier, self.scale)
        loss = F.cross_entropy(logits, batch.y)
        return loss, {"loss": float(loss.detach()), "accuracy": accuracy(logits.detach(), batch.y)}

    def meta_loss(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        if isinstance(batch, LabelledBatch):
            return self.pretrain_loss(batch)
        return self._episodic_loss(batch)

    def _episodic_loss(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        raise ConfigError(f"{self.name} trains on labelled batches of the training classes; draw its batches with "
                          "learner.draw_batch(source, generator, meta_batch, step)")
