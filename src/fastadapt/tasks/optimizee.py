"""Optimizee families: the tasks of learned optimizers (Andrychowicz et al. 2016, Metz et al. 2022).

A learned optimizer is meta-trained on a distribution of training problems and tested on unseen
ones. A :class:`Problem` is one such training run: initial parameters (a dict of tensors, so any
shape) and a loss of a parameter dict that draws its own minibatch. A family, registered by name
in :data:`fastadapt.registry.OPTIMIZEES`, samples problems from a seeded generator:

- ``quadratic``: ``f(theta) = mean_b ||W_b theta_b - y_b||^2`` over 128 independent 10-d problems
  with ``W``, ``y`` uniform in [0, 1) and ``theta ~ N(0, 0.01^2)``, as in the reference code of
  Andrychowicz et al. (a deterministic loss: no minibatch).
- ``mnist-mlp``: the paper's MNIST problem, a one-hidden-layer MLP (20 sigmoid units) on 28x28
  MNIST with minibatches of 128, weights and biases ``~ N(0, 0.01^2)``; the variants of the
  paper's generalisation study change one thing: ``mnist-mlp-wide`` (40 units),
  ``mnist-mlp-deep`` (two hidden layers), ``mnist-mlp-relu`` (ReLU units).
- ``cifar10-mlp``: the same MLP on CIFAR-10 (a different dataset), and ``cifar10-conv``: a
  small convnet (three 3x3 convolutions of 16 channels with max-pooling, a 32-unit layer, ReLU),
  the harder family of the reference code (without its BatchNorm).

The MNIST families read the IDX files (``data_dir``, else ``$FASTADAPT_DATA/mnist``); with only the
test file, the deterministic 8,000 / 2,000 split of :mod:`fastadapt.data.mnist` gives the
``train`` and ``test`` images. ``split`` picks which images the minibatches come from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..registry import OPTIMIZEES

Params = dict[str, Tensor]


@dataclass
class Problem:
    """One training problem: ``init`` parameters and ``loss(params, generator)``.

    ``loss`` draws its minibatch from ``generator`` (a CPU ``torch.Generator``); a deterministic
    problem ignores it. ``params`` passed to ``loss`` may be any tensors of the shapes of ``init``
    (leaves for ``torch.optim``, graph nodes in a meta-training unroll).
    """

    name: str
    init: Params
    loss_fn: Callable[[Params, torch.Generator], Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    def loss(self, params: Params, generator: torch.Generator) -> Tensor:
        return self.loss_fn(params, generator)

    def fresh_params(self) -> Params:
        """Copies of the initial parameters as leaves that require gradients."""
        return {k: v.detach().clone().requires_grad_(True) for k, v in self.init.items()}

    @property
    def num_params(self) -> int:
        return sum(v.numel() for v in self.init.values())


def _normal(shape: tuple[int, ...], std: float, g: torch.Generator, device: torch.device) -> Tensor:
    return (torch.randn(shape, generator=g) * std).to(device)


def _uniform_fan_in(shape: tuple[int, ...], fan_in: int, g: torch.Generator, device: torch.device) -> Tensor:
    bound = 1 / math.sqrt(fan_in)
    return ((torch.rand(shape, generator=g) * 2 - 1) * bound).to(device)


# --- quadratic ---------------------------------------------------------------------------------

@OPTIMIZEES.register("quadratic")
def quadratic(generator: torch.Generator, device: str | torch.device = "cpu", split: str = "train",
              data_dir: str | None = None, dims: int = 10, batch: int = 128) -> Problem:
    """``mean_b ||W_b theta_b - y_b||^2`` over ``batch`` independent ``dims``-d problems."""
    device = torch.device(device)
    w = torch.rand(batch, dims, dims, generator=generator).to(device)
    y = torch.rand(batch, dims, generator=generator).to(device)
    init = {"theta": _normal((batch, dims), 0.01, generator, device)}

    def loss(params: Params, g: torch.Generator) -> Tensor:
        residual = torch.einsum("bij,bj->bi", w, params["theta"]) - y
        return residual.pow(2).sum(1).mean()

    return Problem("quadratic", init, loss, {"dims": dims, "batch": batch})


# --- classifiers on images ---------------------------------------------------------------------

@dataclass
class _ImageData:
    images: Tensor  # uint8 [N, C, H, W]
    labels: Tensor  # int64 [N]
    mean: Tensor
    std: Tensor

    def batch(self, size: int, g: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(self.labels), (size,), generator=g)
        x = (self.images[idx].to(device, torch.float32) / 255 - self.mean.to(device)) / self.std.to(device)
        return x, self.labels[idx].to(device)


_DATA_CACHE: dict[tuple[str, str, str | None], _ImageData] = {}


def _image_data(dataset: str, split: str, data_dir: str | None) -> _ImageData:
    key = (dataset, split, data_dir)
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    if split not in ("train", "test"):
        raise ConfigError(f"optimizee split must be train or test, got {split!r}")
    if dataset == "mnist":
        from ..data.mnist import mnist_labelled

        images, labels = mnist_labelled(data_dir)[split]
        # The reference code feeds MNIST pixels scaled to [0, 1], without standardisation.
        data = _ImageData(images, labels, torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    elif dataset == "cifar10":
        from ..data.cifar10 import MEAN, STD, load_cifar10

        images, labels = load_cifar10(split, data_dir)
        data = _ImageData(images, labels, torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1))
    else:
        raise ConfigError(f"unknown optimizee dataset {dataset!r}")
    _DATA_CACHE[key] = data
    return data


def _mlp_problem(name: str, dataset: str, hidden: tuple[int, ...], activation: str, batch_size: int = 128):
    act = {"sigmoid": torch.sigmoid, "relu": torch.relu}[activation]

    def build(generator: torch.Generator, device: str | torch.device = "cpu", split: str = "train",
              data_dir: str | None = None) -> Problem:
        device = torch.device(device)
        data = _image_data(dataset, split, data_dir)
        sizes = [int(torch.tensor(data.images.shape[1:]).prod())] + list(hidden) + [10]
        init = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            init[f"w{i}"] = _normal((b, a), 0.01, generator, device)
            init[f"b{i}"] = _normal((b,), 0.01, generator, device)
        layers = len(sizes) - 1

        def loss(params: Params, g: torch.Generator) -> Tensor:
            x, y = data.batch(batch_size, g, device)
            h = x.flatten(1)
            for i in range(layers):
                h = F.linear(h, params[f"w{i}"], params[f"b{i}"])
                if i < layers - 1:
                    h = act(h)
            return F.cross_entropy(h, y)

        return Problem(name, init, loss, {"dataset": dataset, "hidden": list(hidden), "activation": activation,
                                          "batch_size": batch_size})

    build.__doc__ = (f"{'-'.join(map(str, hidden))} {activation} MLP on {dataset}, minibatches of {batch_size}.")
    return build


for _name, _dataset, _hidden, _act in (
    ("mnist-mlp", "mnist", (20,), "sigmoid"),
    ("mnist-mlp-wide", "mnist", (40,), "sigmoid"),
    ("mnist-mlp-deep", "mnist", (20, 20), "sigmoid"),
    ("mnist-mlp-relu", "mnist", (20,), "relu"),
    ("cifar10-mlp", "cifar10", (20,), "sigmoid"),
):
    OPTIMIZEES.register(_name)(_mlp_problem(_name, _dataset, _hidden, _act))


@OPTIMIZEES.register("cifar10-conv")
def cifar10_conv(generator: torch.Generator, device: str | torch.device = "cpu", split: str = "train",
                 data_dir: str | None = None, channels: int = 16, batch_size: int = 128) -> Problem:
    """Three 3x3 convolutions of ``channels`` with 2x2 max-pooling, a 32-unit layer, ReLU; CIFAR-10."""
    device = torch.device(device)
    data = _image_data("cifar10", split, data_dir)
    init = {}
    c_in = 3
    for i in range(3):
        init[f"conv{i}"] = _uniform_fan_in((channels, c_in, 3, 3), c_in * 9, generator, device)
        init[f"conv{i}_b"] = torch.zeros(channels, device=device)
        c_in = channels
    flat = channels * 4 * 4
    init["fc"] = _uniform_fan_in((32, flat), flat, generator, device)
    init["fc_b"] = torch.zeros(32, device=device)
    init["out"] = _uniform_fan_in((10, 32), 32, generator, device)
    init["out_b"] = torch.zeros(10, device=device)

    def loss(params: Params, g: torch.Generator) -> Tensor:
        x, y = data.batch(batch_size, g, device)
        for i in range(3):
            x = F.max_pool2d(torch.relu(F.conv2d(x, params[f"conv{i}"], params[f"conv{i}_b"], padding=1)), 2)
        h = torch.relu(F.linear(x.flatten(1), params["fc"], params["fc_b"]))
        return F.cross_entropy(F.linear(h, params["out"], params["out_b"]), y)

    return Problem("cifar10-conv", init, loss, {"dataset": "cifar10", "channels": channels, "batch_size": batch_size})


# --- a family of small tasks (VeLO-style meta-training) ------------------------------------------

MIXED_DATASETS = ("mnist", "cifar10", "glyphs")
MIXED_ACTIVATIONS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


def _glyph_data(split: str, generator: torch.Generator, classes: int = 10) -> _ImageData:
    """``classes`` glyph classes (20 images each) drawn from the built-in dataset's ``train`` or ``test``
    classes, labelled ``0..classes-1``: a small 10-way problem with no download."""
    from ..data.glyphs import glyph_pools

    if split not in ("train", "test"):
        raise ConfigError(f"optimizee split must be train or test, got {split!r}")
    pool = glyph_pools()[split]
    chosen = torch.randperm(pool.num_classes, generator=generator)[:classes]
    idx = (pool.offsets[chosen][:, None] + torch.arange(int(pool.counts.min()))).reshape(-1)
    labels = torch.arange(classes).repeat_interleave(int(pool.counts.min()))
    return _ImageData(pool.images[idx], labels, torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))


def _dataset_dir(data_dir: str | None, dataset: str) -> str | None:
    """A family over several datasets reads ``data_dir/<dataset>`` (a folder laid out like
    ``$FASTADAPT_DATA``), or the dataset's default folder without ``data_dir``."""
    if data_dir is None:
        return None
    from pathlib import Path

    sub = Path(data_dir) / dataset
    return str(sub) if sub.is_dir() else data_dir


def _choice(options: tuple[Any, ...], g: torch.Generator) -> Any:
    return options[int(torch.randint(len(options), (1,), generator=g))]


def _mixed_problem(name: str, datasets: tuple[str, ...]):
    def build(generator: torch.Generator, device: str | torch.device = "cpu", split: str = "train",
              data_dir: str | None = None, batch_size: int = 128) -> Problem:
        device = torch.device(device)
        dataset = _choice(datasets, generator)
        if dataset == "glyphs":
            data = _glyph_data(split, generator)
        else:
            data = _image_data(dataset, split, _dataset_dir(data_dir, dataset))
        c, hw = data.images.shape[1], data.images.shape[-1]
        init: Params = {}
        if _choice(("mlp", "conv"), generator) == "mlp":
            depth = _choice((1, 2, 3), generator)
            width = _choice((16, 32, 64), generator)
            activation = _choice(tuple(MIXED_ACTIVATIONS), generator)
            small_init = _choice((True, False), generator)  # N(0, 0.01^2) as the paper's MNIST MLP, else fan-in
            sizes = [c * hw * hw] + [width] * depth + [10]
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
                if small_init:
                    init[f"w{i}"] = _normal((b, a), 0.01, generator, device)
                    init[f"b{i}"] = _normal((b,), 0.01, generator, device)
                else:
                    init[f"w{i}"] = _uniform_fan_in((b, a), a, generator, device)
                    init[f"b{i}"] = torch.zeros(b, device=device)
            info = {"arch": "mlp", "hidden": [width] * depth, "activation": activation, "small_init": small_init}
        else:
            depth = _choice((1, 2), generator)
            channels = _choice((4, 8, 16), generator)
            activation = _choice(("relu", "tanh"), generator)
            c_in = c
            for i in range(depth):
                init[f"conv{i}"] = _uniform_fan_in((channels, c_in, 3, 3), c_in * 9, generator, device)
                init[f"conv{i}_b"] = torch.zeros(channels, device=device)
                c_in = channels
            flat = channels * (hw // 2 ** depth) ** 2
            init["out"] = _uniform_fan_in((10, flat), flat, generator, device)
            init["out_b"] = torch.zeros(10, device=device)
            info = {"arch": "conv", "channels": [channels] * depth, "activation": activation}
        act, arch = MIXED_ACTIVATIONS[info["activation"]], info["arch"]

        def loss(params: Params, g: torch.Generator) -> Tensor:
            x, y = data.batch(batch_size, g, device)
            if arch == "mlp":
                h = x.flatten(1)
                for i in range(depth + 1):
                    h = F.linear(h, params[f"w{i}"], params[f"b{i}"])
                    h = act(h) if i < depth else h
                return F.cross_entropy(h, y)
            for i in range(depth):
                x = F.max_pool2d(act(F.conv2d(x, params[f"conv{i}"], params[f"conv{i}_b"], padding=1)), 2)
            return F.cross_entropy(F.linear(x.flatten(1), params["out"], params["out_b"]), y)

        return Problem(name, init, loss, {"dataset": dataset, "batch_size": batch_size, **info})

    build.__doc__ = (f"A small classifier drawn per problem: an MLP (1-3 hidden layers of 16-64 ReLU, sigmoid or "
                     f"tanh units) or a convnet (1-2 3x3 convolutions of 4-16 channels with max-pooling) on one of "
                     f"{', '.join(datasets)} (glyphs: 10 random classes of the built-in dataset).")
    return build


#: VeLO-style "family of small tasks"; ``mixed-glyphs`` needs no dataset on disk.
OPTIMIZEES.register("mixed")(_mixed_problem("mixed", MIXED_DATASETS))
OPTIMIZEES.register("mixed-glyphs")(_mixed_problem("mixed-glyphs", ("glyphs",)))


def make_problem(name: str, generator: torch.Generator, device: str | torch.device = "cpu", split: str = "train",
                 data_dir: str | None = None) -> Problem:
    """A problem of the family ``name``, its initial parameters drawn from ``generator``."""
    return OPTIMIZEES.get(name)(generator, device=device, split=split, data_dir=data_dir)


__all__ = ["Problem", "make_problem", "quadratic", "cifar10_conv"]
