"""The nearest-class-mean baseline on a pre-trained classifier's features.

Every training step pre-trains the backbone as an ordinary (cosine) classifier of all training
classes (:mod:`.classifier`); nothing is meta-learned. A new task is fitted by the mean feature of
each class's support examples, and a query goes to the nearest mean (cosine distance by default,
or squared Euclidean). This is the "pre-train, then nearest mean" baseline against which
parameter prediction (``qiao``) and Prototypical Networks are compared: the same backbone and
budget, no episodic training (Mensink et al., TPAMI 2013; Chen et al., "A Closer Look at
Few-shot Classification", ICLR 2019).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import METHODS
from .classifier import PretrainedClassifier, base_classes_of
from .protonet import DISTANCES, prototypes


@METHODS.register("ncm")
class NCM(PretrainedClassifier):
    """Nearest class mean on pre-trained classifier features (Mensink et al. 2013; Chen et al. 2019).

    Training: cross-entropy of a cosine classifier over all training classes, on batches of
    ``pretrain_batch`` labelled images (``--meta-batch``, ``--ways``, ``--shots`` do not apply).
    Adaptation: ``means[k] = mean of f(x) over the support examples of class k``; prediction:
    ``logits = -d(f(x), means)`` with ``d`` the cosine distance (``--distance euclidean``: squared
    Euclidean). Shapes: ``adapt(support_x [S, *in], support_y [S]) -> means [ways, D]``.
    """

    name = "ncm"
    options = {**PretrainedClassifier.options, "distance": "cosine"}
    option_help = {**PretrainedClassifier.option_help, "distance": "nearest class mean by cosine or euclidean"}

    def __init__(self, backbone: nn.Module, base_classes: int, distance: str = "cosine", **kwargs: Any) -> None:
        super().__init__(backbone, base_classes, **kwargs)
        if distance not in DISTANCES:
            raise ConfigError(f"--distance must be one of {', '.join(DISTANCES)}, got '{distance}'")
        self.distance = distance
        self._dist = DISTANCES[distance]

    @classmethod
    def from_config(cls, cfg: dict[str, Any], in_shape: tuple[int, ...]) -> "NCM":
        opts = {**cls.options, **cfg}
        return cls(cls._backbone(opts, in_shape), base_classes_of(cfg), opts["distance"],
                   **cls._classifier_kwargs(opts))

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Tensor:
        ways = int(support_y.max()) + 1
        return prototypes(self.backbone(support_x), support_y, ways)

    def predict(self, adapted: Tensor, x: Tensor) -> Tensor:
        return -self._dist(self.backbone(x), adapted)
