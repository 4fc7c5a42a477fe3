"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

Each class is represented by the mean of its support embeddings (its prototype); a query is
classified by a softmax over negative squared Euclidean distances to the prototypes. The
meta-knowledge is the embedding network; adapting to a task is a single forward pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.conv4 import build_backbone
from ..models.fused import fused_blocks
from ..registry import METHODS
from ..tasks.episode import Episode
from ..precision import full_precision
from .base import MetaLearner, hit_rate


@full_precision
def prototypes(embeddings: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Class means ``[ways, D]`` of ``embeddings [N, D]`` with labels in ``0..ways-1``.

    Summed by a product with the one-hot labels: the same bits from run to run on a GPU (an
    ``index_add_`` adds with atomics, in a varying order), and no host read (``bincount`` reads
    its largest label), so a CUDA graph can hold it."""
    onehot = F.one_hot(labels, ways).to(embeddings.dtype)
    return (onehot.T @ embeddings) / onehot.sum(0)[:, None]


@full_precision
def squared_euclidean(x: Tensor, protos: Tensor) -> Tensor:
    """``[N, D] x [K, D] -> [N, K]`` squared Euclidean distances, by the expanded form
    ``|x|^2 - 2 x.p + |p|^2`` (one matrix product instead of an ``N x K x D`` tensor)."""
    d = (x * x).sum(-1, keepdim=True) - 2.0 * x @ protos.T + (protos * protos).sum(-1)[None, :]
    return d.clamp_min_(0.0)


@full_precision
def cosine_distance(x: Tensor, protos: Tensor) -> Tensor:
    return 1.0 - F.normalize(x, dim=-1) @ F.normalize(protos, dim=-1).T


DISTANCES = {"euclidean": squared_euclidean, "cosine": cosine_distance}


@METHODS.register("protonet")
class ProtoNet(MetaLearner):
    """Prototypical Networks (Snell et al., 2017): logits are ``-d(f(x), c_k)`` with
    prototypes ``c_k`` the mean support embedding of class ``k`` and ``d`` the squared
    Euclidean distance (or cosine, as an option).

    Support and query images of an episode go through the backbone in one batched forward
    pass, so BatchNorm sees the whole episode (as in the reference implementation).
    """

    name = "protonet"
    fused_training = True  # meta_loss runs the backbone inside fused_blocks
    # Snell et al. halve the Adam rate every 2000 episodes (the only method here with a schedule).
    options = {"backbone": "conv4", "distance": "euclidean", "lr_decay_every": 2000}
    option_help = {"backbone": "embedding network (conv4)", "distance": "euclidean (squared, the paper's) or cosine"}

    def __init__(self, backbone: nn.Module, distance: str = "euclidean") -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ConfigError(f"unknown distance '{distance}'; known: {', '.join(DISTANCES)}")
        self.backbone = backbone
        self.distance = distance
        self._dist = DISTANCES[distance]

    @classmethod
    def from_config(cls, cfg: dict[str, Any], in_shape: tuple[int, ...]) -> "ProtoNet":
        return cls(build_backbone(cfg.get("backbone", "conv4"), in_shape), cfg.get("distance", "euclidean"))

    def logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, ways: int | None = None) -> Tensor:
        n_support = support_x.shape[0]
        z = self.backbone(torch.cat([support_x, query_x], 0))
        ways = int(support_y.max()) + 1 if ways is None else ways
        protos = prototypes(z[:n_support], support_y, ways)
        return -self._dist(z[n_support:], protos)

    @staticmethod
    def _class_counts(batch: Episode) -> Tensor:
        """Each task's class count (its largest support label + 1), on the batch's device."""
        return torch.stack([ep.support_y.max() for ep in batch.tasks()]) + 1

    def _losses(self, tasks: list[Episode], ways: list[int]) -> tuple[Tensor, Tensor]:
        """The mean episode loss and query hit rate over ``tasks`` (with ``ways`` classes each),
        as tensors."""
        losses, hits = [], []
        with fused_blocks():  # the episode loss is differentiated once
            for ep, w in zip(tasks, ways):
                logits = self.logits(ep.support_x, ep.support_y, ep.query_x, w)
                losses.append(F.cross_entropy(logits, ep.query_y))
                hits.append(hit_rate(logits.detach(), ep.query_y))
        return torch.stack(losses).mean(), torch.stack(hits).mean()

    def meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, float]]:
        # Every task's class count in one read from the device, before any work is queued.
        loss, acc = self._losses(batch.tasks(), self._class_counts(batch).tolist())
        value, acc = torch.stack([loss.detach(), acc]).tolist()  # one read for both
        return loss, {"loss": value, "accuracy": 100.0 * acc}

    def graphable_loss(self, batch: Episode):
        # The class counts are read once, here; a batch with others is flagged, not mis-scored.
        ways = self._class_counts(batch)
        fixed = ways.tolist()

        def loss_fn(b: Episode) -> tuple[Tensor, dict[str, Tensor], Tensor]:
            # Labels are clamped into each task's classes (an index out of range would stop the
            # GPU); a batch whose labels needed it is flagged, like one with other class counts.
            tasks, safe = b.tasks(), []
            valid = (self._class_counts(b) == ways).all()
            for ep, w in zip(tasks, fixed):
                sy, qy = ep.support_y.clamp(0, w - 1), ep.query_y.clamp(0, w - 1)
                valid = valid & (sy == ep.support_y).all() & (qy == ep.query_y).all()
                safe.append(Episode(ep.support_x, sy, ep.query_x, qy))
            loss, acc = self._losses(safe, fixed)
            return loss, {"loss": loss.detach(), "accuracy": 100.0 * acc}, valid

        return loss_fn

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Tensor:
        ways = int(support_y.max()) + 1
        return prototypes(self.backbone(support_x), support_y, ways)

    def predict(self, adapted: Tensor, x: Tensor) -> Tensor:
        return -self._dist(self.backbone(x), adapted)
