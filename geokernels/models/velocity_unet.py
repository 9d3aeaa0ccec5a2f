"""Pixel-space flow-matching velocity U-Net v_theta(x_t, t[, class]) (SPEC.md 3).

The network predicts the velocity of the affine path x_t = (1 - t)*eps + t*x (noise at t = 0, data
at t = 1), whose regression target is x - eps. Architecture (the usual diffusion U-Net, sized from a
sub-million-parameter CPU model to the paper's 128x128 / base-width-64 scale):

* sinusoidal embedding of t (scaled to [0, 1000]) followed by a two-layer MLP;
* optional class conditioning (one model for many categories): a learned class embedding is added to
  the time embedding;
* residual blocks whose second GroupNorm is modulated by the embedding (scale-shift / FiLM);
* multi-head self-attention at the low-resolution levels and in the middle block;
* strided-conv downsampling, nearest + conv upsampling, skip connections per block;
* zero-initialised output convolutions of every residual branch and of the head, so a fresh model
  is close to identity-plus-zero and trains stably.

Use ``VelocityUNet.from_preset(name)`` for the sizes in ``PRESETS``; ``model.config`` is a plain
dict that rebuilds the same architecture (stored in checkpoints).
"""
from __future__ import annotations

import math
from numbers import Integral

import torch
from torch import nn
from torch.nn import functional as F

# name -> constructor keyword arguments. Parameter counts (3 channels, unconditional):
# tiny 0.91 M, small 4.8 M, base 13.1 M, paper 23.0 M (checked in tests/test_velocity_unet.py).
PRESETS: dict[str, dict] = {
    # CPU-trainable: 4 levels (receptive field for textures), narrow at full resolution (cheap),
    # one block each, attention only in the middle (lowest resolution)
    "tiny": dict(base_width=16, channel_mults=(1, 2, 3, 4), blocks_per_level=1,
                 attention_levels=(), mid_attention=True, num_heads=4),
    # still CPU-feasible for short runs; attention at the lowest level
    "small": dict(base_width=32, channel_mults=(1, 2, 2, 4), blocks_per_level=2,
                  attention_levels=(3,), mid_attention=True, num_heads=4),
    # GPU model for 64-128 px inputs
    "base": dict(base_width=64, channel_mults=(1, 2, 2, 4), blocks_per_level=1,
                 attention_levels=(3,), mid_attention=True, num_heads=4),
    # the paper's scale: 128x128 input, base width 64, attention at 16x16 and 8x8
    "paper": dict(base_width=64, channel_mults=(1, 2, 3, 4), blocks_per_level=2,
                  attention_levels=(2, 3), mid_attention=True, num_heads=4),
}


def _num_groups(channels: int) -> int:
    """Largest group count <= 32 dividing ``channels`` with at least 2 channels per group."""
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N, dim) of times t (N,) in [0, 1] (scaled by 1000 like DDPM steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) *
                      torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv, then GroupNorm modulated by (1 + scale, shift) from the embedding."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_num_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_num_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions (pre-norm, residual, zero-init output)."""

    def __init__(self, channels: int, num_heads: int = 4):
        super().__init__()
        heads = num_heads
        while channels % heads:
            heads -= 1
        self.num_heads = heads
        self.norm = nn.GroupNorm(_num_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (N, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(n, c, h, w)
        return x + self.proj(out)


class _Level(nn.Module):
    def __init__(self, blocks, attns):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)


class VelocityUNet(nn.Module):
    """Flow-matching velocity field v_theta(x_t, t[, cond]) on images (SPEC.md 3).

    Args:
        in_channels: image channels C (3 for RGB).
        base_width: channels of the first level.
        channel_mults: per-level width multipliers; the number of levels L = len(channel_mults)
            and inputs need H, W divisible by 2**(L-1).
        blocks_per_level: residual blocks per level (encoder; the decoder has one more).
        attention_levels: level indices (0 = full resolution) with self-attention; default: the
            lowest-resolution level if there are at least 3 levels.
        mid_attention: self-attention in the middle (lowest resolution) block.
        num_heads: attention heads (reduced until it divides the width).
        num_classes: 0 for an unconditional model; otherwise ``cond`` (N,) int64 class indices in
            [0, num_classes) are embedded and added to the time embedding.
        dropout: dropout inside the residual blocks.
        image_size: the training resolution (informational, stored in ``config``; any size
            divisible by 2**(L-1) is accepted at run time).

    forward(x_t, t, cond=None): x_t (N, C, H, W) float; t (N,) (or a scalar / (1,)) times in
    [0, 1]; returns the velocity (N, C, H, W) in the dtype of x_t.
    """

    def __init__(self, in_channels: int = 3, base_width: int = 64,
                 channel_mults=(1, 2, 2, 4), blocks_per_level: int = 2,
                 attention_levels=None, mid_attention: bool = True, num_heads: int = 4,
                 num_classes: int = 0, dropout: float = 0.0, image_size: int | None = None):
        super().__init__()

        def ints(values, name):   # int(1.5) would silently give 1
            values = tuple(values)
            if any(isinstance(v, bool) or not isinstance(v, Integral) for v in values):
                raise ValueError(f"{name} must hold ints, got {values!r}")
            return tuple(int(v) for v in values)

        channel_mults = ints(channel_mults, "channel_mults")
        if attention_levels is None:  # default: the lowest resolution, when it is low enough
            attention_levels = (len(channel_mults) - 1,) if len(channel_mults) >= 3 else ()
        attention_levels = ints(attention_levels, "attention_levels")
        for name, v in (("in_channels", in_channels), ("base_width", base_width),
                        ("blocks_per_level", blocks_per_level), ("num_heads", num_heads)):
            if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not channel_mults or min(channel_mults) < 1:
            raise ValueError(f"channel_mults must be a non-empty tuple of positive ints, "
                             f"got {channel_mults!r}")
        if any(a < 0 or a >= len(channel_mults) for a in attention_levels):
            raise ValueError(f"attention_levels must be level indices in [0, {len(channel_mults)})"
                             f", got {attention_levels!r}")
        if (isinstance(num_classes, bool) or not isinstance(num_classes, Integral)
                or num_classes < 0):
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.config = dict(in_channels=int(in_channels), base_width=int(base_width),
                           channel_mults=list(channel_mults),
                           blocks_per_level=int(blocks_per_level),
                           attention_levels=list(attention_levels),
                           mid_attention=bool(mid_attention),
                           num_heads=int(num_heads), num_classes=int(num_classes),
                           dropout=float(dropout),
                           image_size=None if image_size is None else int(image_size))
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.num_levels = len(channel_mults)
        self.base_width = int(base_width)
        emb_dim = 4 * base_width
        self.time_mlp = nn.Sequential(nn.Linear(base_width, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.class_embedding = nn.Embedding(num_classes, emb_dim) if num_classes > 0 else None

        self.stem = nn.Conv2d(in_channels, base_width, 3, padding=1)
        widths = [base_width * m for m in channel_mults]
        skip_widths = [base_width]
        ch = base_width
        self.down_levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for lvl, width in enumerate(widths):
            blocks, attns = [], []
            for _ in range(blocks_per_level):
                blocks.append(ResidualBlock(ch, width, emb_dim, dropout))
                attns.append(SelfAttention(width, num_heads) if lvl in attention_levels
                             else nn.Identity())
                ch = width
                skip_widths.append(ch)
            self.down_levels.append(_Level(blocks, attns))
            if lvl < self.num_levels - 1:
                self.downsamples.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_widths.append(ch)
        self.mid_block1 = ResidualBlock(ch, ch, emb_dim, dropout)
        self.mid_attention = SelfAttention(ch, num_heads) if mid_attention else nn.Identity()
        self.mid_block2 = ResidualBlock(ch, ch, emb_dim, dropout)

        self.up_levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for lvl in reversed(range(self.num_levels)):
            width = widths[lvl]
            blocks, attns = [], []
            for _ in range(blocks_per_level + 1):
                blocks.append(ResidualBlock(ch + skip_widths.pop(), width, emb_dim, dropout))
                attns.append(SelfAttention(width, num_heads) if lvl in attention_levels
                             else nn.Identity())
                ch = width
            self.up_levels.append(_Level(blocks, attns))
            if lvl > 0:
                self.upsamples.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.head_norm = nn.GroupNorm(_num_groups(ch), ch)
        self.head = _zero(nn.Conv2d(ch, in_channels, 3, padding=1))

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "VelocityUNet":
        """A model of one of the ``PRESETS`` sizes; keyword arguments override the preset."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
        kwargs = dict(PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_config(cls, config: dict) -> "VelocityUNet":
        """Rebuild a model from ``model.config`` (as stored in checkpoints)."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        return cls(**config)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (self.num_levels - 1)

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, x_t, t, cond):
        if not isinstance(x_t, torch.Tensor) or not x_t.is_floating_point():
            raise TypeError(f"x_t must be a floating-point torch.Tensor, got "
                            f"{getattr(x_t, 'dtype', type(x_t).__name__)}")
        if x_t.dim() != 4 or x_t.shape[1] != self.in_channels:
            raise ValueError(f"x_t must have shape (N, {self.in_channels}, H, W), got "
                             f"{tuple(x_t.shape)}")
        m = self.size_multiple
        if x_t.shape[2] % m or x_t.shape[3] % m or x_t.shape[2] == 0 or x_t.shape[3] == 0:
            raise ValueError(f"x_t height and width must be positive multiples of {m} for this "
                             f"{self.num_levels}-level U-Net, got {tuple(x_t.shape[2:])}")
        n = x_t.shape[0]
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"t must hold real times in [0, 1], got dtype {t.dtype}")
        from geokernels._checks import get_checks, tracing

        if t.device.type == "cpu" and t.numel() and not tracing(t) and \
                not bool(torch.isfinite(t).all()):
            raise ValueError("t holds NaN or Inf")
        if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == 1 and n != 1):
            t = t.reshape(1).expand(n)
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"t must have shape ({n},) (one time per image), got {tuple(t.shape)}")
        if self.class_embedding is None:
            if cond is not None:
                raise ValueError("cond was given but this model is unconditional (num_classes=0)")
        else:
            if cond is None:
                raise ValueError(f"cond (class indices, shape ({n},)) is required: this model is "
                                 f"class-conditional with num_classes={self.num_classes}")
            if not isinstance(cond, torch.Tensor):   # Python/numpy values: checked on the CPU
                cond = torch.as_tensor(cond)
            if cond.is_floating_point() or cond.is_complex() or cond.dtype == torch.bool:
                raise TypeError(f"cond must hold integer class indices, got dtype {cond.dtype}")
            if cond.dim() == 0:
                cond = cond.reshape(1).expand(n)
            if cond.dim() != 1 or cond.shape[0] != n:
                raise ValueError(f"cond must have shape ({n},), got {tuple(cond.shape)}")
            # on the CPU always; a device tensor only under set_checks("always") (a host sync):
            # an out-of-range index would trip nn.Embedding's device-side assert
            if cond.numel() and not cond.is_meta and not tracing(cond) and (
                    cond.device.type == "cpu" or get_checks() == "always") and (
                    int(cond.min()) < 0 or int(cond.max()) >= self.num_classes):
                raise ValueError(f"cond values must be in [0, {self.num_classes}), got range "
                                 f"[{int(cond.min())}, {int(cond.max())}]")
            cond = cond.to(device=x_t.device, dtype=torch.long)
        return t.to(x_t.device), cond

    def forward(self, x_t: torch.Tensor, t, cond=None) -> torch.Tensor:
        t, cond = self._check_inputs(x_t, t, cond)
        in_dtype = x_t.dtype
        x_t = x_t.to(self.stem.weight.dtype)   # e.g. a float64 x_t into float32 weights
        # model.to(memory_format=torch.channels_last) runs NHWC convolutions (faster with oneDNN
        # on CPU and cuDNN tensor cores on GPU); inputs follow the weights, outputs are NCHW
        channels_last = self.stem.weight.is_contiguous(memory_format=torch.channels_last)
        if channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        emb = self.time_mlp(timestep_embedding(t, self.base_width).to(x_t.dtype))
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(cond).to(emb.dtype)
        h = self.stem(x_t)
        skips = [h]
        for lvl, level in enumerate(self.down_levels):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, emb))
                skips.append(h)
            if lvl < self.num_levels - 1:
                h = self.downsamples[lvl](h)
                skips.append(h)
        h = self.mid_block2(self.mid_attention(self.mid_block1(h, emb)), emb)
        for i, level in enumerate(self.up_levels):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if i < self.num_levels - 1:
                h = self.upsamples[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.head(F.silu(self.head_norm(h)))
        out = out.contiguous() if channels_last else out
        return out if torch.is_autocast_enabled(out.device.type) else out.to(in_dtype)
