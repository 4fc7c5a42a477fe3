"""Trans-INR: a Transformer that predicts the weights of an implicit neural representation.

Chen & Wang, "Transformers as Meta-Learners for Implicit Neural Representations", ECCV 2022
(code: github.com/yinboc/trans-inr). The image is read as patch tokens; learnable *weight tokens*
are appended and the Transformer encoder's outputs at the weight tokens become the INR's weights:

* each layer ``i`` of the INR has a learnable base weight ``W_i [in, out]`` and bias ``b_i [out]``
  (initialised as ``nn.Linear``) and ``g_i = min(n_groups, out)`` weight tokens (``out`` must be a
  multiple of ``g_i``);
* the output at a weight token goes through ``LayerNorm -> Linear(dim, in)``: a vector ``v_k``
  of the layer's input size. Column ``j`` of the predicted weight is ``W_i[:, j] * v_{j mod g_i}``,
  normalised to unit L2 norm over its ``in`` entries (weight grouping: ``out / g_i`` columns share
  one token); the bias is the base bias, shared by all images;
* the INR with these weights is evaluated at every pixel coordinate, and the whole model is trained
  end to end across images on the mean squared error (Adam 1e-4, 16 images per batch in the paper).

Adapting to an image is one forward pass. ``tto_steps > 0`` adds the paper's test-time
optimisation: that many Adam steps (rate ``tto_lr``; the authors use 1e-4) on the predicted weights,
fitting the observed pixels, through the shared functional inner loop.

Observations. The tokenizer reads the observed pixels on the image grid plus a mask channel (1 where
a pixel is observed, 0 elsewhere, where the values are 0 too). With every pixel observed (the
paper's image regression) the mask is constant, so its weights only add a constant to each patch
embedding: the model is the paper's, with one more bias-like term. With ``support_fraction < 1``
the same network reconstructs images from a random subset of their pixels, and a model trained on
full images can be evaluated on sparse ones (and back) without changing its shape.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.inr import INR_OPTIONS, INR_OPTION_HELP, fourier_frequencies, init_linear, inr_apply, inr_param_shapes
from ..models.transformer import PatchTokenizer, TransformerEncoder
from ..registry import METHODS
from ..tasks.episode import Episode
from ..tasks.image_function import KIND, scatter_to_image
from .base import MetaLearner
from .inner import InnerAdam, Params, check_inner_losses, check_positive, inner_loop
from .learned_init import check_image_function, image_metrics


class WeightTokens(nn.Module):
    """Learnable weight tokens, base weights and the per-layer token heads of Trans-INR.

    ``forward(outputs [B, n_tokens, dim]) -> {"w{i}": [B, in, out], "b{i}": [B, out]}``.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], dim: int, n_groups: int) -> None:
        super().__init__()
        if not (isinstance(n_groups, int) and n_groups >= 1):
            raise ConfigError(f"--n-groups must be a whole number >= 1, got {n_groups!r}")
        self.depth = sum(1 for k in shapes if k.startswith("w"))
        self.base = nn.ParameterDict()
        self.heads = nn.ModuleDict()
        self.ranges: dict[int, tuple[int, int]] = {}
        count = 0
        for i in range(self.depth):
            fan_in, fan_out = shapes[f"w{i}"]
            g = min(n_groups, fan_out)
            if fan_out % g:
                raise ConfigError(f"--n-groups {n_groups} must divide the width of every INR layer; layer {i} has "
                                  f"{fan_out} outputs (choose --n-groups dividing --inr-width, or >= it)")
            w, b = init_linear(fan_in, fan_out)
            self.base[f"w{i}"] = nn.Parameter(w)
            self.base[f"b{i}"] = nn.Parameter(b)
            self.heads[str(i)] = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, fan_in))
            self.ranges[i] = (count, count + g)
            count += g
        self.tokens = nn.Parameter(torch.randn(count, dim))

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    def forward(self, out: Tensor) -> Params:
        b = out.shape[0]
        params: Params = {}
        for i in range(self.depth):
            lo, hi = self.ranges[i]
            v = self.heads[str(i)](out[:, lo:hi]).transpose(1, 2)  # [B, in, g]
            w = self.base[f"w{i}"]
            v = v.repeat(1, 1, w.shape[1] // v.shape[2])  # column j uses token j mod g
            params[f"w{i}"] = F.normalize(w * v, dim=1)
            params[f"b{i}"] = self.base[f"b{i}"].expand(b, -1)
        return params


@METHODS.register("trans-inr")
class TransINR(MetaLearner):
    """Trans-INR (Chen & Wang, ECCV 2022): a Transformer reads the image's patches and learnable
    weight tokens and outputs the weights of a Fourier-feature MLP that represents the image.

    Shapes: ``adapt(support_x [P, 2], support_y [P, C])`` (observed pixel coordinates and values)
    returns the INR's weights; ``predict(weights, x [N, 2]) -> [N, C]``. A batch of episodes is
    predicted in one pass (``[B, ...]`` on every tensor).

    Options: the INR's ``inr_depth`` (linear layers: hidden layers + output), ``inr_width``,
    ``pe_dim`` (Fourier features per coordinate) and ``pe_sigma`` (highest frequency); the
    Transformer's ``patch_size``, ``trans_dim``, ``trans_depth``, ``heads``, ``head_dim``,
    ``ff_dim``; ``n_groups`` weight tokens per layer (at most one per column); ``tto_steps`` and
    ``tto_lr``, the test-time Adam steps on the predicted weights (0: none); ``support_fraction``,
    the observed fraction of each image's pixels.
    """

    name = "trans-inr"
    options = {
        "dataset": "builtin-images",  # without --dataset: the built-in glyphs as images
        **INR_OPTIONS,
        "patch_size": 4,
        "trans_dim": 64,
        "trans_depth": 2,
        "heads": 4,
        "head_dim": 16,
        "ff_dim": 128,
        "n_groups": 16,
        "tto_steps": 0,
        "tto_lr": 1e-4,
        "support_fraction": 1.0,
        # CPU-sized defaults, picked by a short sweep on CIFAR-10 at 32 px (2-minute budgets): the
        # paper's Transformer (768 wide, 6 layers, Adam 1e-4, 16 images per batch) is in
        # configs/trans_inr_celeba178.yaml.
        "meta_batch": 8,
        "lr": 3e-3,
        "lr_decay_every": 0,
    }
    option_help = {
        **INR_OPTION_HELP,
        "patch_size": "side of the image patches read as tokens",
        "trans_dim": "width of the Transformer",
        "trans_depth": "Transformer layers",
        "heads": "attention heads",
        "head_dim": "width of each attention head",
        "ff_dim": "hidden width of the Transformer's feed-forward blocks",
        "n_groups": "column groups per predicted weight matrix (one weight token each)",
        "tto_steps": "Adam steps on the predicted weights at test time (the paper's refinement)",
        "tto_lr": "learning rate of those steps",
    }
    task_kind = KIND

    def __init__(self, image_shape: tuple[int, int, int], inr_depth: int = 4, inr_width: int = 64, pe_dim: int = 32,
                 pe_sigma: float = 16.0, out_bias: float = 0.5, patch_size: int = 4, trans_dim: int = 64,
                 trans_depth: int = 2, heads: int = 4, head_dim: int = 16, ff_dim: int = 128, n_groups: int = 16,
                 tto_steps: int = 0, tto_lr: float = 1e-4) -> None:
        super().__init__()
        c, h, w = image_shape
        self.image_shape = (int(c), int(h), int(w))
        if not (isinstance(tto_steps, int) and tto_steps >= 0):
            raise ConfigError(f"--tto-steps must be a whole number >= 0, got {tto_steps!r}")
        self.tto_steps, self.tto_lr = tto_steps, tto_lr
        if tto_steps:
            check_positive("tto_lr", tto_lr)
        self.shapes = inr_param_shapes(inr_depth, inr_width, c, 2, pe_dim)
        if not pe_sigma >= 1:
            raise ConfigError(f"--pe-sigma must be a number >= 1 (the highest frequency), got {pe_sigma!r}")
        self.out_bias = float(out_bias)
        self.register_buffer("freqs", fourier_frequencies(pe_dim, pe_sigma), persistent=False)
        self.tokenizer = PatchTokenizer(c + 1, h, w, patch_size, trans_dim)  # values and the observation mask
        self.encoder = TransformerEncoder(trans_dim, trans_depth, heads, head_dim, ff_dim)
        self.weights = WeightTokens(self.shapes, trans_dim, n_groups)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], in_shape: tuple[int, ...]) -> "TransINR":
        check_image_function(cls.name, cfg)
        o = {**cls.options, **cfg}
        keys = [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "image_shape")]
        return cls(tuple(in_shape), **{k: o[k] for k in keys})

    # ------------------------------------------------------------------ the forward computation
    def observed_image(self, support_x: Tensor, support_y: Tensor) -> Tensor:
        """The observed pixels on the image grid and the observation mask: ``[..., C + 1, H, W]``."""
        return scatter_to_image(support_x, support_y, self.image_shape, with_mask=True)

    def predict_weights(self, support_x: Tensor, support_y: Tensor) -> Params:
        """The INR weights of a batch of images: ``support_x [B, P, 2]``, ``support_y [B, P, C]`` ->
        ``{"w{i}": [B, in, out], "b{i}": [B, out]}``."""
        data = self.tokenizer(self.observed_image(support_x, support_y))
        tokens = self.weights.tokens.expand(data.shape[0], -1, -1)
        out = self.encoder(torch.cat([data, tokens], dim=1))
        return self.weights(out[:, data.shape[1]:])

    def render(self, params: Params, x: Tensor) -> Tensor:
        """The INR with ``params`` (batched or not) at coordinates ``x``."""
        return inr_apply(params, x, self.freqs.to(x.dtype), self.out_bias)

    def meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, float]]:
        b = batch if batch.batched else Episode.stack([batch])
        params = self.predict_weights(b.support_x, b.support_y)
        pred = self.render(params, b.query_x)
        mse = ((pred - b.query_y) ** 2).flatten(1).mean(dim=1)  # per image, as the authors' trainer
        loss = mse.mean()
        return loss, image_metrics(loss, mse)

    # ------------------------------------------------------------------ adaptation
    def adapt(self, support_x: Tensor, support_y: Tensor) -> Params:
        with torch.no_grad():
            params = {k: v[0] for k, v in self.predict_weights(support_x[None], support_y[None]).items()}
        if self.tto_steps:
            params = self.refine(params, support_x, support_y, self.tto_steps)
        return params

    def refine(self, params: Params, support_x: Tensor, support_y: Tensor, steps: int) -> Params:
        """``steps`` Adam steps (rate ``tto_lr``) on the weights, fitting the observed pixels: the
        paper's test-time optimisation, through the shared functional inner loop."""
        with torch.enable_grad():
            fitted, losses = inner_loop(self.render, F.mse_loss, params, support_x, support_y, steps,
                                        InnerAdam(self.tto_lr, betas=(0.9, 0.999)), differentiable=False)
        check_inner_losses(losses[None], "test-time optimisation")
        return {k: v.detach() for k, v in fitted.items()}

    def predict(self, adapted: Params, x: Tensor) -> Tensor:
        return self.render(adapted, x)
