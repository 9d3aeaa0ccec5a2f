"""A plain, configurable U-Net (Ronneberger et al. 2015): the segmentation backbone of CFSSNet
and of the shape-prior segmentation models."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

NORMS = ("batch", "instance", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


class DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) x 2; the conv has a bias only without a norm."""

    def __init__(self, cin: int, cout: int, norm: str = "batch", dropout: float = 0.0):
        bias = norm == "none"
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=bias), _norm(norm, cout), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        layers += [nn.Conv2d(cout, cout, 3, padding=1, bias=bias), _norm(norm, cout), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class UNet(nn.Module):
    """U-Net: ``depth`` 2x down-samplings, ``width * 2**level`` channels per level.

    Args:
        in_channels / out_channels: image channels in, logit (or head) channels out.
        depth: number of down-sampling steps (0 = a single conv block); any input size works
            (the decoder resizes to the skip connection's size, so odd sizes are fine).
        width: channels of the first level.
        norm: "batch" | "instance" | "group" | "none".
        dropout: Dropout2d probability inside the blocks (0 = off).
        upsample: "bilinear" (resize + conv) or "transpose" (learned 2x2 transposed conv).

    forward(x (B, in_channels, H, W)) -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, depth: int = 4, width: int = 32,
                 norm: str = "batch", dropout: float = 0.0, upsample: str = "bilinear"):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("width", width)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise ValueError(f"depth must be an int >= 0, got {depth!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if upsample not in ("bilinear", "transpose"):
            raise ValueError(f"upsample must be 'bilinear' or 'transpose', got {upsample!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or \
                not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        self.in_channels, self.out_channels, self.depth = in_channels, out_channels, depth
        self.upsample = upsample
        chans = [width * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList([DoubleConv(in_channels, chans[0], norm, dropout)])
        for level in range(1, depth + 1):
            self.down.append(DoubleConv(chans[level - 1], chans[level], norm, dropout))
        self.up_convs = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for level in range(depth, 0, -1):
            cin, cskip = chans[level], chans[level - 1]
            if upsample == "transpose":
                self.up_convs.append(nn.ConvTranspose2d(cin, cskip, 2, stride=2))
            else:
                self.up_convs.append(nn.Conv2d(cin, cskip, 1))
            self.up_blocks.append(DoubleConv(2 * cskip, cskip, norm, dropout))
        self.head = nn.Conv2d(chans[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point image, got dtype {x.dtype}")
        skips = []
        h = x
        for level, block in enumerate(self.down):
            if level > 0:
                h = F.max_pool2d(h, 2, ceil_mode=True)
            h = block(h)
            skips.append(h)
        for up, block, skip in zip(self.up_convs, self.up_blocks, reversed(skips[:-1])):
            if self.upsample == "transpose":
                h = up(h)
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest") if h.shape[-2:] != skip.shape[-2:] else h
            else:
                h = up(F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False))
            h = block(torch.cat([skip, h], dim=1))
        return self.head(h)
