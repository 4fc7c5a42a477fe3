"""Test-Time Training with rotation prediction.

Sun, Wang, Liu, Miller, Efros and Hardt, "Test-Time Training with Self-Supervision for
Generalization under Distribution Shifts", ICML 2020. The source model is Y-shaped: a shared
trunk (stem + first two residual groups) feeds the classification head and a head that predicts
which of four rotations (0, 90, 180, 270 degrees) was applied to the image. At test time, for each
test image, a batch of augmented copies (random crop + flip) is rotated at random and the
auxiliary branch (trunk + rotation head) takes SGD steps on the rotation loss; then the adapted
trunk and the untouched classification head classify the original image.

* standard (``online=False``): the auxiliary branch is reset to the source weights before every
  image; the paper takes 10 steps per image.
* online (``online=True``): the weights carry over from one test image to the next (the test
  stream is assumed to come from one shifted distribution); one step per image.

Defaults follow the authors' code (``ttt_cifar_release``, ``test_calls/test_adapt.py``): plain SGD
(no momentum, no weight decay) at the last training learning rate, 1e-3, on 32 copies per step,
over the parameters of the whole auxiliary branch, trunk *and* rotation head (``head="train"``),
with the branch in train mode during the steps. ``head="frozen"`` trains the trunk only and keeps
the rotation head in eval mode (their ``--fix_ssh``). ``bn="frozen"`` keeps the whole branch in
eval mode, so BatchNorm normalises with the source statistics during the steps (their
``--fix_bn``). GroupNorm (the paper's choice) behaves the same in train and eval mode. With
BatchNorm in train mode (``bn="train"``) the running statistics of the trained modules move towards
those of the test image's copies (momentum 0.1) before the prediction; they are part of the
branch's state, so the standard version resets them per image with the weights.
"""

from __future__ import annotations

from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .augment import random_crop_flip, random_rotation_labels, rotate_batch

MODES = ("train", "frozen")


def _check_rotation_model(model: nn.Module) -> None:
    if getattr(model, "rot_head", None) is None or not hasattr(model, "trunk"):
        raise ConfigError("TTT needs a model trained with a rotation head (fastadapt tta train-source --rotation-head)")


def rotation_loss(model: nn.Module, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Cross-entropy of the rotation head on ``x`` rotated by random multiples of 90 degrees."""
    labels = random_rotation_labels(len(x), generator, x.device)
    return F.cross_entropy(model.forward_rotation(rotate_batch(x, labels)), labels)


class TTT(nn.Module):
    """Test-Time Training (Sun et al., ICML 2020) around a :class:`ResNetCifar` with a rotation head.

    ``ttt(x [B, 3, 32, 32] in [0, 1]) -> logits [B, classes]`` adapts on each image in turn (the
    order of ``x`` is the stream order). ``head``: ``"train"`` (default, the authors' code: trunk and
    rotation head are trained) or ``"frozen"`` (trunk only). ``bn``: ``"train"`` (default) or
    ``"frozen"`` BatchNorm statistics during the steps. :meth:`reset` restores the source weights
    (and statistics) of the adapted modules and the optimizer.
    """

    def __init__(
        self,
        model: nn.Module,
        online: bool = False,
        steps: int | None = None,
        copies: int = 32,
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        seed: int = 0,
        bn: str = "train",
        head: str = "train",
    ) -> None:
        super().__init__()
        _check_rotation_model(model)
        if bn not in MODES:
            raise ConfigError(f"TTT's BatchNorm mode must be 'train' or 'frozen', got '{bn}'")
        if head not in MODES:
            raise ConfigError(f"TTT's rotation-head mode must be 'train' or 'frozen', got '{head}'")
        self.bn = bn
        self.head_mode = head
        steps = (1 if online else 10) if steps is None else steps
        if steps < 1 or copies < 1:
            raise ConfigError(f"TTT needs steps >= 1 and copies >= 1, got steps={steps}, copies={copies}")
        self.model = model.eval()
        self.online = online
        self.steps = steps
        self.copies = copies
        model.requires_grad_(False)
        params = []
        for module in self._adapted():
            module.requires_grad_(True)
            params += list(module.parameters())
        self.optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.source_state = deepcopy([module.state_dict() for module in self._adapted()])
        self.optimizer_state = deepcopy(self.optimizer.state_dict())
        self.generator = torch.Generator().manual_seed(seed)

    def _adapted(self) -> list[nn.Module]:
        """The modules whose weights (and BatchNorm statistics) the steps change."""
        if self.head_mode == "train":
            return [self.model.trunk, self.model.rot_head]
        return [self.model.trunk]

    def reset(self) -> None:
        for module, state in zip(self._adapted(), self.source_state):
            module.load_state_dict(state)
        self.optimizer.load_state_dict(self.optimizer_state)

    @torch.enable_grad()
    def adapt(self, image: Tensor) -> float:
        """Steps on the rotation loss of augmented copies of one ``image [3, H, W]``; returns the last loss."""
        batch = image.unsqueeze(0).expand(self.copies, *image.shape)
        if self.bn == "train":  # the authors' ssh.train() (or ext.train() with the head fixed)
            for module in self._adapted():
                module.train()
        try:
            for _ in range(self.steps):
                copies = random_crop_flip(batch, self.generator)
                loss = rotation_loss(self.model, copies, self.generator)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        finally:
            self.model.eval()
        return float(loss.detach())

    def forward(self, x: Tensor) -> Tensor:
        outputs = []
        for image in x:
            if not self.online:
                self.reset()
            self.adapt(image)
            with torch.no_grad():
                outputs.append(self.model(image.unsqueeze(0)))
        return torch.cat(outputs)
