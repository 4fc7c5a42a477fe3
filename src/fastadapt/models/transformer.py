"""A pre-norm Transformer encoder and an image patch tokenizer (Vaswani et al. 2017; ViT,
Dosovitskiy et al. 2021), in the form Trans-INR (Chen & Wang, ECCV 2022) uses them.

Encoder layer: ``x + Attn(LN(x))`` then ``x + FF(LN(x))``; attention with ``heads`` heads of
``head_dim`` each (queries, keys and values without bias, an output projection with bias), the
feed-forward block ``Linear -> GELU -> Linear``. Shapes: ``[B, tokens, dim] -> [B, tokens, dim]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q = self.to_q(x)
        k, v = self.to_kv(x).chunk(2, dim=-1)
        q, k, v = (t.view(b, n, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, ff_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.GELU(), nn.Linear(ff_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class TransformerEncoder(nn.Module):
    """``depth`` pre-norm encoder layers (no final norm, as the reference code)."""

    def __init__(self, dim: int, depth: int, heads: int, head_dim: int, ff_dim: int) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("trans_depth", depth), ("heads", heads), ("head_dim", head_dim),
                            ("ff_dim", ff_dim)):
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, head_dim, ff_dim) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class PatchTokenizer(nn.Module):
    """An image ``[B, C, H, W]`` as ``[B, patches, dim]`` tokens: non-overlapping ``patch`` x
    ``patch`` patches, each flattened and projected linearly, plus a learned position embedding.

    An image whose side is not a multiple of ``patch`` is zero-padded at the bottom and right up to
    the next multiple (the reference code pads 178 px by one pixel on each side for 9 px patches).
    """

    def __init__(self, channels: int, height: int, width: int, patch: int, dim: int) -> None:
        super().__init__()
        if not (isinstance(patch, int) and 1 <= patch <= min(height, width)):
            raise ConfigError(f"--patch-size must be a whole number from 1 to the image side {min(height, width)}, "
                              f"got {patch!r}")
        self.patch = patch
        self.pad_h, self.pad_w = (-height) % patch, (-width) % patch
        self.grid = ((height + self.pad_h) // patch, (width + self.pad_w) // patch)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.proj = nn.Linear(channels * patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(self.num_tokens, dim))

    def forward(self, images: Tensor) -> Tensor:
        if self.pad_h or self.pad_w:
            images = F.pad(images, (0, self.pad_w, 0, self.pad_h))
        p = F.unfold(images, self.patch, stride=self.patch)  # [B, C * p * p, L]
        return self.proj(p.transpose(1, 2)) + self.pos
