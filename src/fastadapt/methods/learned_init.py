"""Gradient-based fitting of implicit neural representations: a learned and a random initialisation.

* ``learned-init`` Tancik, Mildenhall, Wang, Schmidt, Srinivasan, Barron & Ng, "Learned
  Initializations for Optimizing Coordinate-Based Neural Representations", CVPR 2021: the INR's
  initial weights are meta-learned with MAML (Finn et al. 2017) so that ``inner_steps`` SGD steps
  of size ``inner_lr`` on an image's observed pixels reconstruct the whole image well. The authors'
  image-regression demo uses 2 inner steps of SGD 0.01, 3 images per meta-batch and Adam 1e-5 for
  the outer loop (with a SIREN; here the INR is Trans-INR's Fourier-feature ReLU MLP, so that every
  method fits the same network).
* ``random-init`` the same INR from its random initialisation, fitted by the same inner loop (no
  meta-training): what the meta-learned methods are measured against.

Both run on :class:`~fastadapt.methods.maml.MAML`'s machinery, hence on the one functional inner
loop of :mod:`fastadapt.methods.inner` (second order by default, ``first_order`` to cut the
inner gradients, ``grad_checkpoint`` to recompute inner steps in the backward pass, tasks of a
meta-batch in a loop or under ``vmap``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..models.inr import INR_OPTIONS, INR_OPTION_HELP, build_inr
from ..registry import METHODS
from ..tasks.episode import Episode
from ..tasks.image_function import KIND, psnr
from .inner import BATCHING_MODES, InnerAdam, InnerSGD
from .maml import LOOP_OR_VMAP_HELP, MAML, task_kind_of

IMAGE_FUNCTION_DATASETS = "builtin-images, omniglot-images, mnist-images, cifar10-images, imagefolder-images"


def check_image_function(method: str, cfg: dict[str, Any]) -> None:
    """Image-function methods need an image-function dataset; say which ones exist otherwise."""
    kind = task_kind_of(cfg)
    if kind != KIND:
        raise ConfigError(f"{method} fits images as functions and needs an image-function dataset "
                          f"(--dataset {IMAGE_FUNCTION_DATASETS}), not the {kind} dataset "
                          f"'{cfg.get('dataset')}'")


def image_metrics(loss: Tensor, mse: Tensor) -> dict[str, float]:
    """Logged metrics of a batch of images: ``loss``, mean ``mse`` and mean per-image ``psnr`` (dB)."""
    mse = mse.detach().reshape(-1)
    return {"loss": float(loss.detach()), "mse": float(mse.mean()), "psnr": float(psnr(mse).mean())}


@METHODS.register("learned-init")
class LearnedInit(MAML):
    """Learned Init (Tancik et al., CVPR 2021): a MAML-learned initialisation of the INR, refined by
    inner SGD steps on each image's observed pixels.

    ``model`` is an :class:`~fastadapt.models.inr.INR` (or any module mapping coordinates
    ``[N, 2]`` to values ``[N, C]``); the other arguments are :class:`~fastadapt.methods.maml.MAML`'s.
    A task's support set is the observed pixels (coordinates, values), its query set every pixel;
    the loss is the mean squared error, the score the PSNR.

    Options: the INR's ``inr_depth`` (linear layers: hidden layers + output), ``inr_width``,
    ``pe_dim`` and ``pe_sigma`` (as for trans-inr); ``inner_steps`` and ``inner_lr`` of the inner
    SGD; ``first_order`` (no second-order meta-gradient); ``grad_checkpoint``; ``batching``;
    ``support_fraction``, the observed fraction of each image's pixels.
    """

    name = "learned-init"
    option_help = {**MAML.option_help, **INR_OPTION_HELP, "batching": LOOP_OR_VMAP_HELP}
    batching_modes = BATCHING_MODES
    options = {
        "dataset": "builtin-images",  # without --dataset: the built-in glyphs as images
        **INR_OPTIONS,
        "inner_steps": 2,
        "inner_lr": 0.3,
        "first_order": False,
        "grad_checkpoint": False,
        "batching": "auto",
        "support_fraction": 1.0,
        # CPU-sized defaults, picked by a short sweep on CIFAR-10 at 32 px (2-minute budgets); an
        # inner rate of 1.0 did as well there but diverges from a random start on one-channel images.
        "meta_batch": 4,
        "lr": 1e-3,
        "lr_decay_every": 0,
    }
    task_kind = KIND
    task_kinds = (KIND,)
    #: Whether meta-training changes the learner (the random baseline has nothing to learn).
    meta_trained = True

    def __init__(self, model: torch.nn.Module, inner_steps: int = 2, inner_lr: float = 0.3,
                 first_order: bool = False, grad_checkpoint: bool = False, batching: str = "auto",
                 task_kind: str = KIND) -> None:
        super().__init__(model, inner_steps, inner_lr, first_order, grad_checkpoint, batching, task_kind)
        self._loss_fn = F.mse_loss
        self._score_fn = F.mse_loss

    @classmethod
    def from_config(cls, cfg: dict[str, Any], in_shape: tuple[int, ...]) -> "LearnedInit":
        check_image_function(cls.name, cfg)
        opts = {**cls.options, **cfg}
        return cls(build_inr(opts, in_shape), **cls._init_kwargs(opts), task_kind=KIND)

    def _metrics(self, loss: Tensor, score: Tensor) -> dict[str, float]:
        return image_metrics(loss, score)


@METHODS.register("random-init")
class RandomInit(LearnedInit):
    """Random initialisation: the INR from its random (``nn.Linear``-style) initialisation, fitted
    to each image by the same inner loop as Learned Init; nothing is meta-trained.

    Training it only records the initial weights (its steps change nothing), so that ``fastadapt
    eval`` finds a run. ``inner_optim adam`` fits with Adam (betas 0.9, 0.999) instead of SGD, the
    usual way of fitting an INR from scratch (Tancik et al.'s "standard initialisation" baseline).
    """

    name = "random-init"
    options = {
        "dataset": "builtin-images",  # without --dataset: the built-in glyphs as images
        **INR_OPTIONS,
        "inner_steps": 2,
        "inner_lr": 0.3,
        "inner_optim": "sgd",
        "batching": "auto",
        "support_fraction": 1.0,
        "meta_batch": 4,
    }
    meta_trained = False

    def __init__(self, model: torch.nn.Module, inner_steps: int = 2, inner_lr: float = 0.3,
                 inner_optim: str = "sgd", batching: str = "auto", task_kind: str = KIND) -> None:
        if inner_optim not in ("sgd", "adam"):
            raise ConfigError(f"--inner-optim must be sgd or adam, got {inner_optim!r}")
        self.inner_optim = inner_optim
        super().__init__(model, inner_steps, inner_lr, first_order=True, batching=batching, task_kind=task_kind)

    @classmethod
    def _init_kwargs(cls, opts: dict[str, Any]) -> dict[str, Any]:
        return {k: opts[k] for k in ("inner_steps", "inner_lr", "inner_optim", "batching")}

    def _inner_optimizer(self, ways: int | None = None) -> Any:
        if self.inner_optim == "adam":
            return InnerAdam(self.inner_lr, betas=(0.9, 0.999))
        return InnerSGD(self.inner_lr)

    def train_step(self, batch: Episode, optimizer: torch.optim.Optimizer, step: int = 0) -> dict[str, float]:
        """Scores the batch after fitting and changes nothing: there is nothing to meta-train."""
        b = batch if batch.batched else Episode.stack([batch])
        with torch.no_grad():
            _, metrics = self._meta_loss(b, self._mode(b))
        optimizer.zero_grad(set_to_none=True)
        self.sync_gradients()  # none to combine; keeps step with the other processes
        optimizer.step()  # no gradients: changes nothing, keeps a learning-rate schedule in order
        return metrics
