"""TENT: fully test-time adaptation by entropy minimisation.

Wang, Shelhamer, Liu, Olshausen and Darrell, "Tent: Fully Test-Time Adaptation by Entropy
Minimization", ICLR 2021. On each unlabeled test batch the model predicts, then takes a gradient
step on the mean Shannon entropy of its own predictions. Only the affine parameters (scale and
shift) of BatchNorm layers are trained, and BatchNorm normalises with the statistics of the test
batch instead of the source running averages. Setup is split as in the reference implementation:
:func:`configure_model` switches the model into that mode, :func:`collect_params` returns the
parameters to give an optimizer, and :class:`Tent` wraps both with an explicit :meth:`Tent.reset`.

Works with any ``nn.Module`` that has BatchNorm layers (``torch.nn`` BatchNorm1d/2d/3d or
SyncBatchNorm, as in torchvision and timm models); a model without any raises a ``ConfigError``.
"""

from __future__ import annotations

from copy import deepcopy

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ConfigError


def _bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def _check_has_batchnorm(model: nn.Module, what: str) -> None:
    if not _bn_layers(model):
        raise ConfigError(f"{what} needs a model with BatchNorm layers and {type(model).__name__} has none "
                          "(GroupNorm/LayerNorm models: use the source model or TTT instead)")


def softmax_entropy(logits: Tensor) -> Tensor:
    """Entropy ``-sum_c p_c log p_c`` of ``softmax(logits)`` per row, in nats."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Make every BatchNorm layer normalise with the current batch's mean and variance.

    The running averages are dropped (``track_running_stats=False``), so the layer uses batch
    statistics even when the rest of the model is in eval mode.
    """
    _check_has_batchnorm(model, "test-time normalisation")
    for _, m in _bn_layers(model):
        m.train()
        m.track_running_stats = False
        m.running_mean = None
        m.running_var = None
        m.num_batches_tracked = None
    return model


def configure_model(model: nn.Module) -> nn.Module:
    """Prepare ``model`` (in place) for TENT: only BatchNorm affine parameters require grad,
    and BatchNorm uses test-batch statistics."""
    _check_has_batchnorm(model, "TENT")
    model.train()  # as the reference: train mode so BatchNorm uses batch statistics
    model.requires_grad_(False)
    use_batch_statistics(model)
    for _, m in _bn_layers(model):
        if m.affine:
            m.requires_grad_(True)
    return model


def collect_params(model: nn.Module) -> tuple[list[nn.Parameter], list[str]]:
    """The BatchNorm affine parameters of ``model`` and their names, for the optimizer."""
    _check_has_batchnorm(model, "TENT")
    params, names = [], []
    for prefix, m in _bn_layers(model):
        for pname, p in m.named_parameters(recurse=False):
            if pname in ("weight", "bias"):
                params.append(p)
                names.append(f"{prefix}.{pname}")
    if not params:
        raise ConfigError("TENT trains BatchNorm scale and shift, but every BatchNorm layer has affine=False")
    return params, names


def check_model(model: nn.Module) -> None:
    """Raise ``ConfigError`` unless ``model`` went through :func:`configure_model`."""
    _check_has_batchnorm(model, "TENT")
    if not model.training:
        raise ConfigError("TENT needs the model in train mode: call tent.configure_model(model) first")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("TENT found no trainable parameters: call tent.configure_model(model) first")
    bn_names = set(collect_params(model)[1])
    extra = [n for n in trainable if n not in bn_names]
    if extra:
        raise ConfigError(f"TENT trains BatchNorm affine parameters only, but {extra[0]} requires grad: "
                          "call tent.configure_model(model)")


class Tent(nn.Module):
    """TENT (Wang et al., ICLR 2021): adapt a model by entropy minimisation once per forward.

    ``Tent(model, optimizer, steps=1, episodic=False)`` where ``model`` went through
    :func:`configure_model` and ``optimizer`` holds :func:`collect_params` (the paper: Adam,
    lr 1e-3, batches of 128 on CIFAR-10-C). Each call ``tent(x)`` takes ``steps`` gradient steps on
    ``x`` and returns the logits of the last forward (computed before its update, as the
    reference does, so prediction and adaptation share one pass). ``episodic=True`` restores the
    initial weights and optimizer state before every batch; :meth:`reset` does it on demand.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 1, episodic: bool = False):
        super().__init__()
        if steps < 1:
            raise ConfigError(f"TENT needs steps >= 1, got {steps}")
        check_model(model)
        self.model = model
        self.optimizer = optimizer
        self.steps = steps
        self.episodic = episodic
        # Deep copies, so that reset() is exact however the optimizer mutates its state.
        self.model_state = deepcopy(model.state_dict())
        self.optimizer_state = deepcopy(optimizer.state_dict())

    def forward(self, x: Tensor) -> Tensor:
        if self.episodic:
            self.reset()
        for _ in range(self.steps):
            outputs = forward_and_adapt(x, self.model, self.optimizer)
        return outputs

    def reset(self) -> None:
        self.model.load_state_dict(self.model_state, strict=True)
        self.optimizer.load_state_dict(self.optimizer_state)


@torch.enable_grad()  # adaptation needs gradients even inside an inference loop under no_grad
def forward_and_adapt(x: Tensor, model: nn.Module, optimizer: torch.optim.Optimizer) -> Tensor:
    """Predict ``x``, then one optimizer step on the mean prediction entropy."""
    outputs = model(x)
    loss = softmax_entropy(outputs).mean(0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return outputs.detach()


def setup_tent(model: nn.Module, lr: float = 1e-3, steps: int = 1, episodic: bool = False,
               betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0) -> Tent:
    """The paper's CIFAR setting in one call: configure, collect, Adam(lr), wrap."""
    model = configure_model(model)
    params, _ = collect_params(model)
    return Tent(model, torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay), steps, episodic)
