"""Images as functions: the task family of implicit neural representations (INRs).

A task is one image, seen as a function from pixel coordinates in ``[-1, 1]^2`` to pixel values
in ``[0, 1]``. Its query set is every pixel of the image; its support set is every pixel as well
(image reconstruction, the setting of Tancik et al. 2021 and Chen & Wang 2022) or, with
``support_fraction < 1``, a random subset of the pixels (reconstruction from sparse
observations), drawn afresh for each task.

Coordinates are pixel centres, ``-1 + (2 i + 1) / S`` along each axis, in (row, column) order and
row-major pixel order, as the Trans-INR code's ``make_coord_grid``. Episodes hold
``support_x [P, 2]``, ``support_y [P, C]``, ``query_x [H * W, 2]``, ``query_y [H * W, C]``.

The quality of a reconstruction is its PSNR, ``10 log10(1 / MSE)`` for values in ``[0, 1]``
(:func:`psnr`), computed per image and averaged over images.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .episode import Episode

KIND = "image_function"


def coordinate_grid(height: int, width: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Pixel-centre coordinates ``[height * width, 2]`` (row, column) in ``(-1, 1)``, row-major."""
    rows = -1.0 + (2.0 * torch.arange(height, dtype=dtype) + 1.0) / height
    cols = -1.0 + (2.0 * torch.arange(width, dtype=dtype) + 1.0) / width
    r, c = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([r, c], dim=-1).reshape(-1, 2)


def pixel_index(coords: Tensor, height: int, width: int) -> Tensor:
    """The row-major pixel index ``[...]`` of pixel-centre coordinates ``[..., 2]``."""
    r = torch.round((coords[..., 0] + 1.0) * (height / 2.0) - 0.5).long().clamp_(0, height - 1)
    c = torch.round((coords[..., 1] + 1.0) * (width / 2.0) - 0.5).long().clamp_(0, width - 1)
    return r * width + c


def scatter_to_image(coords: Tensor, values: Tensor, shape: Sequence[int], with_mask: bool = False) -> Tensor:
    """Observed pixels back on the image grid.

    ``coords [..., P, 2]`` and ``values [..., P, C]`` -> ``[..., C, H, W]`` with zeros where no pixel
    was observed; ``with_mask`` appends a channel that is 1 at observed pixels (``[..., C + 1, H, W]``).
    """
    c, h, w = shape
    lead = values.shape[:-2]
    idx = pixel_index(coords, h, w)  # [..., P]
    chans = c + 1 if with_mask else c
    src = values if not with_mask else torch.cat([values, torch.ones_like(values[..., :1])], dim=-1)
    out = values.new_zeros(*lead, h * w, chans)
    out = out.scatter(-2, idx.unsqueeze(-1).expand(*idx.shape, chans), src)
    return out.transpose(-1, -2).reshape(*lead, chans, h, w)


def psnr(mse: Tensor | float, peak: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB: ``10 log10(peak^2 / mse)`` (elementwise)."""
    mse = torch.as_tensor(mse, dtype=torch.float64 if not torch.is_tensor(mse) else None)
    return 10.0 * torch.log10(peak * peak / mse)


class ImageFunctionTasks:
    """Tasks that are images of one split (``kind = "image_function"``).

    ``images`` is ``uint8 [N, C, H, W]``; ``ids`` (``[N]``) names each image within ``id_space``
    (e.g. its row in the source file), so that splits can be checked to be disjoint.
    ``in_shape`` is the image shape ``(C, H, W)``: learners build their networks from it (the
    inputs of the function itself are always 2-D coordinates).

    Each task draws one image uniformly at random (with replacement) and, for sparse support,
    its observed pixels; the stream is a pure function of the generator.
    """

    kind = KIND

    def __init__(self, images: Tensor, split: str = "train", support_fraction: float = 1.0,
                 ids: Tensor | None = None, name: str = "images", id_space: str = "") -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"image-function tasks need uint8 images [N, C, H, W], got {images.dtype} "
                            f"{tuple(images.shape)}")
        if len(images) == 0:
            raise DataError(f"the {split} split of {name} holds no images")
        if not (isinstance(support_fraction, (int, float)) and 0 < support_fraction <= 1):
            raise ConfigError(f"--support-fraction must be a number in (0, 1], got {support_fraction!r}")
        self.images = images.contiguous()
        self.split, self.name = split, name
        self.support_fraction = float(support_fraction)
        self.ids = torch.arange(len(images)) if ids is None else torch.as_tensor(ids, dtype=torch.long)
        self.id_space = id_space or name
        c, h, w = images.shape[1:]
        self.coords = coordinate_grid(h, w)
        self.support_pixels = max(1, int(round(self.support_fraction * h * w)))

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.images)

    def values(self, index: Tensor) -> Tensor:
        """Pixel values ``[n, H * W, C]`` in ``[0, 1]`` of the images at ``index``, row-major."""
        x = self.images.index_select(0, index).float().div_(255.0)
        return x.flatten(2).transpose(1, 2)

    def episode_of(self, index: Tensor, generator: torch.Generator | None = None) -> Episode:
        """The batch of tasks of the images at ``index`` (support pixels drawn from ``generator``)."""
        n = len(index)
        y = self.values(index)
        x = self.coords.expand(n, *self.coords.shape)
        if self.support_pixels == x.shape[1]:
            return Episode(x, y, x, y)
        keys = torch.rand(n, x.shape[1], generator=generator)
        pick = keys.topk(self.support_pixels, dim=1, largest=False, sorted=False).indices
        sx = torch.gather(x, 1, pick.unsqueeze(-1).expand(-1, -1, 2))
        sy = torch.gather(y, 1, pick.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
        return Episode(sx, sy, x, y)

    def sample_batch(self, generator: torch.Generator, num_tasks: int) -> Episode:
        index = torch.randint(0, len(self.images), (num_tasks,), generator=generator)
        return self.episode_of(index, generator)

    def sample(self, generator: torch.Generator) -> Episode:
        return self.sample_batch(generator, 1).task(0)

    def describe(self) -> str:
        c, h, w = self.in_shape
        seen = "all pixels" if self.support_pixels == h * w else (
            f"{self.support_pixels} random pixels ({100 * self.support_fraction:g}%)")
        return f"{h}x{w} images ({c} channel{'s' if c > 1 else ''}), {seen} observed"


def resize_images(images: Tensor, size: int) -> Tensor:
    """``uint8 [N, C, H, W] -> uint8 [N, C, size, size]`` (antialiased bilinear; no-op at the same size)."""
    if images.shape[-2:] == (size, size):
        return images
    out = []
    for chunk in images.split(4096):
        z = torch.nn.functional.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)
        out.append(z.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)
