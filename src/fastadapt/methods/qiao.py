"""Parameter prediction from activations (Qiao, Liu, Shen & Yuille, "Few-Shot Image Recognition by
Predicting Parameters from Activations", CVPR 2018).

Two stages in one run, driven by the step counter (so checkpoints and resume are exact):

1. Steps ``1..pretrain_steps``: the feature extractor is pre-trained as an ordinary cosine
   classifier of all training (base) classes (:mod:`.classifier`), one weight row ``w_c`` per class.
2. Steps ``pretrain_steps+1..steps``: a category-agnostic predictor ``phi`` is meta-trained to map
   the mean activation of a class's support examples to that class's classifier weights. In each
   episode (classes ``c_1..c_N`` of the training split, with their split-level ids) the classifier
   is the full base classifier in which the row of each episode class is, with probability
   ``mix_prob`` (the paper's ``p_t``), the predicted weight ``phi(mean activation)``, else its base
   row ``w_c`` (Sec. 3.2); queries are classified among *all* base classes with cross-entropy.
   The extractor and base weights stay frozen unless ``finetune_extractor`` (its BatchNorm keeps the
   pre-training statistics either way, so each image's activation depends on that image alone).

At test time the weights of the novel classes are predicted from their support activations and
classify the queries (``joint``: among the novel *and* the base classes, the paper's joint setting;
the novel classes come first, so the accuracy is that of novel queries among base + novel).

Normalisation (Sec. 3.3): activations ``a`` and weights are L2-normalised and the logits scaled
by a temperature ``s`` (learned by default)::

    a_bar_k = mean_{i: y_i = k} a_i / |a_i|          (support activations of class k)
    w_k     = phi(a_bar_k)                            (unit norm: phi ends with a normalisation)
    logit_k(x) = s * <a(x) / |a(x)|, w_k>

``phi`` (``predictor``): ``mlp`` is normalise, Linear, ReLU, Linear, normalise, both linear layers
initialised to the identity (the authors' released miniImageNet code), ``linear`` a single
identity-initialised linear map between the normalisations. At initialisation ``phi`` is the
identity, so an untrained predictor is the cosine nearest-mean classifier of the normalised
activations.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import METHODS
from ..tasks.episode import Episode, EpisodeWithClasses, LabelledBatch
from .base import accuracy
from .classifier import PretrainedClassifier, base_classes_of, cosine_logits
from .protonet import prototypes

PREDICTORS = ("mlp", "linear")


def _identity_linear(dim: int) -> nn.Linear:
    layer = nn.Linear(dim, dim)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(dim))
        layer.bias.zero_()
    return layer


class WeightPredictor(nn.Module):
    """``phi``: ``[K, D]`` mean activations -> ``[K, D]`` unit-norm classifier weights."""

    def __init__(self, dim: int, kind: str = "mlp") -> None:
        super().__init__()
        if kind not in PREDICTORS:
            raise ConfigError(f"--predictor must be one of {', '.join(PREDICTORS)}, got '{kind}'")
        self.kind = kind
        layers: list[nn.Module] = [_identity_linear(dim)]
        if kind == "mlp":
            layers += [nn.ReLU(), _identity_linear(dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, mean_activations: Tensor) -> Tensor:
        return F.normalize(self.net(F.normalize(mean_activations, dim=-1)), dim=-1)


def training_mix(base_rows: Tensor, predicted: Tensor, mix_prob: float,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The paper's training mix for the ``K`` classes of an episode: row ``k`` is ``predicted[k]``
    with probability ``mix_prob``, else ``base_rows[k]``. Returns the rows ``[K, D]`` and the mask
    ``[K]`` of rows that are predicted (drawn from ``generator``, default the global one)."""
    draw = torch.rand(predicted.shape[0], generator=generator, device="cpu" if generator is not None else None)
    use = (draw < mix_prob).to(predicted.device)
    return torch.where(use[:, None], predicted, base_rows), use


@METHODS.register("qiao")
class Qiao(PretrainedClassifier):
    """Parameter prediction from activations (Qiao, Liu, Shen & Yuille, CVPR 2018).

    Pre-trains a cosine classifier of all training classes for ``pretrain_steps`` steps
    (batches of ``pretrain_batch`` images), then meta-trains a predictor ``phi`` from a class's
    mean support activation to its classifier weights (Adam at ``predictor_lr``), mixing predicted
    and base weights with probability ``mix_prob`` (see the module docstring). A new task is fitted
    by predicting the weights of its classes from their support activations (one forward pass);
    ``--joint`` also keeps the base classes in the classifier at test time.
    ``--finetune-extractor`` trains the extractor and base weights together with ``phi`` in the
    second stage.

    Shapes: ``adapt(support_x [S, *in], support_y [S]) -> weights [ways, D]`` (``[ways + C, D]``
    with ``joint``); ``predict(weights, x [Q, *in]) -> logits [Q, ways]`` (``[Q, ways + C]``).
    """

    name = "qiao"
    options = {
        **PretrainedClassifier.options,
        "pretrain_steps": 300,
        "mix_prob": 0.9,
        "predictor": "mlp",
        "predictor_lr": 1e-4,
        "finetune_extractor": False,
        "joint": False,
    }
    option_help = {
        **PretrainedClassifier.option_help,
        "pretrain_steps": "iterations of classifier pre-training before the predictor is meta-trained",
        "mix_prob": "probability that an episode class uses its predicted weight (else its base row)",
        "predictor": "weight predictor from mean activations: mlp or linear",
        "predictor_lr": "Adam rate of the predictor (its own group)",
        "finetune_extractor": "also train the extractor while meta-training the predictor",
        "joint": "classify among base and novel classes at test time (the paper's joint setting)",
    }

    def __init__(self, backbone: nn.Module, base_classes: int, pretrain_steps: int = 300, mix_prob: float = 0.9,
                 predictor: str = "mlp", finetune_extractor: bool = False, joint: bool = False,
                 predictor_lr: float | None = 1e-4, **kwargs: Any) -> None:
        super().__init__(backbone, base_classes, **kwargs)
        self._check_qiao_options(pretrain_steps, mix_prob, predictor_lr)
        self.pretrain_steps, self.mix_prob = int(pretrain_steps), float(mix_prob)
        self.predictor_lr = None if predictor_lr is None else float(predictor_lr)
        self.finetune_extractor, self.joint = bool(finetune_extractor), bool(joint)
        self.predictor = WeightPredictor(self.classifier.shape[1], predictor)

    @staticmethod
    def _check_qiao_options(pretrain_steps: int, mix_prob: float, predictor_lr: float | None) -> None:
        if isinstance(pretrain_steps, bool) or not isinstance(pretrain_steps, int) or pretrain_steps < 0:
            raise ConfigError(f"--pretrain-steps must be a whole number >= 0, got {pretrain_steps!r}")
        if isinstance(mix_prob, bool) or not isinstance(mix_prob, (int, float)) or not 0.0 <= mix_prob <= 1.0:
            raise ConfigError(f"--mix-prob must be a probability in [0, 1], got {mix_prob!r}")
        if predictor_lr is not None and not (isinstance(predictor_lr, (int, float)) and not isinstance(predictor_lr, bool)
                                             and math.isfinite(predictor_lr) and predictor_lr > 0):
            raise ConfigError(f"--predictor-lr must be a positive number, got {predictor_lr!r}")

    @classmethod
    def from_config(cls, cfg: dict[str, Any], in_shape: tuple[int, ...]) -> "Qiao":
        opts = {**cls.options, **cfg}
        steps = cfg.get("steps")
        if steps is not None and opts["pretrain_steps"] >= steps:
            raise ConfigError(f"--pretrain-steps {opts['pretrain_steps']} leaves no meta-training in --steps {steps}; "
                              f"raise --steps above {opts['pretrain_steps']} or lower --pretrain-steps")
        return cls(cls._backbone(opts, in_shape), base_classes_of(cfg), pretrain_steps=opts["pretrain_steps"],
                   mix_prob=opts["mix_prob"], predictor=opts["predictor"], predictor_lr=opts["predictor_lr"],
                   finetune_extractor=opts["finetune_extractor"], joint=opts["joint"], **cls._classifier_kwargs(opts))

    def parameter_groups(self) -> list[dict[str, Any]] | None:
        """The predictor trains at ``predictor_lr`` (``None``: the run's rate), the rest at the run's
        rate. Adam's first steps move every entry by about the rate whatever its gradient; at the
        run's 1e-3 that bends the identity-initialised predictor far from the identity within a few
        steps, before it has learned anything, so it gets a smaller rate of its own."""
        if self.predictor_lr is None:
            return None
        own = {id(p) for p in self.predictor.parameters()}
        return [{"params": [p for p in self.parameters() if id(p) not in own and p.requires_grad]},
                {"params": list(self.predictor.parameters()), "lr": self.predictor_lr}]

    # ---------------------------------------------------------------- the two stages
    def pretraining(self, step: int) -> bool:
        return step <= self.pretrain_steps

    def _draw_meta_batch(self, source: Any, generator: torch.Generator, meta_batch: int) -> Any:
        # Episodes with the split-level ids of their classes, to find their rows of the classifier.
        self._check_source(source, "sample_batch_with_classes")
        return source.sample_batch_with_classes(generator, meta_batch)

    def activations(self, x: Tensor) -> Tensor:
        """Unit-norm activations ``[N, D]`` of the extractor, in eval mode (BatchNorm with the
        pre-training statistics, so each row depends on its own image only), differentiable only
        with ``finetune_extractor``."""
        was = self.backbone.training
        self.backbone.eval()
        try:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.finetune_extractor):
                return F.normalize(self.backbone(x), dim=-1)
        finally:
            self.backbone.train(was)

    def predict_weights(self, support_activations: Tensor, support_y: Tensor, ways: int) -> Tensor:
        """``phi`` of each class's mean unit-norm support activation: ``[ways, D]``, unit norm."""
        return self.predictor(prototypes(support_activations, support_y, ways))

    def base_weights(self) -> Tensor:
        """The unit-norm base classifier ``[C, D]``; a constant unless ``finetune_extractor``."""
        w = F.normalize(self.classifier, dim=-1)
        return w if self.finetune_extractor else w.detach()

    def episode_forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
        """Predicted weights ``[ways, D]`` of an episode's classes and its query activations
        ``[Q, D]``, in one pass of the extractor (eval mode: no image sees another's statistics)."""
        ways = int(support_y.max()) + 1
        n = support_x.shape[0]
        a = self.activations(torch.cat([support_x, query_x]))
        return self.predict_weights(a[:n], support_y, ways), a[n:]

    def _task_loss(self, ep: Episode, classes: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Query loss of one episode, its logits, targets and the mask of predicted rows."""
        predicted, query = self.episode_forward(ep.support_x, ep.support_y, ep.query_x)
        ways = predicted.shape[0]
        if classes is None:  # an episode without class ids: its own classes only, all predicted
            logits = self.scale * (query @ predicted.T)
            all_predicted = torch.ones(ways, dtype=torch.bool, device=logits.device)
            return F.cross_entropy(logits, ep.query_y), logits, ep.query_y, all_predicted
        base = self.base_weights()
        rows, use = training_mix(base[classes], predicted, self.mix_prob)
        weights = base.index_put((classes,), rows)
        logits = self.scale * (query @ weights.T)
        target = classes[ep.query_y]
        return F.cross_entropy(logits, target), logits, target, use

    def _episodic_loss(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        if isinstance(batch, EpisodeWithClasses):
            tasks = batch.tasks()
        elif isinstance(batch, Episode):
            tasks = [(ep, None) for ep in batch.tasks()]
        else:
            raise ConfigError(f"qiao cannot train on a {type(batch).__name__}; draw its batches with draw_batch")
        losses, accs, used = [], [], []
        for ep, classes in tasks:
            loss, logits, target, use = self._task_loss(ep, classes)
            losses.append(loss)
            accs.append(accuracy(logits.detach(), target))
            used.append(use.float().mean())
        loss = torch.stack(losses).mean()
        return loss, {"loss": float(loss.detach()), "accuracy": sum(accs) / len(accs),
                      "predicted_share": float(torch.stack(used).mean())}

    # ---------------------------------------------------------------- test time
    def adapt(self, support_x: Tensor, support_y: Tensor) -> Tensor:
        ways = int(support_y.max()) + 1
        weights = self.predict_weights(self.activations(support_x), support_y, ways)
        if self.joint:
            weights = torch.cat([weights, F.normalize(self.classifier, dim=-1)])
        return weights

    def predict(self, adapted: Tensor, x: Tensor) -> Tensor:
        return cosine_logits(self.activations(x), adapted, self.scale)
