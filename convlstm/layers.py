"""Building blocks above a cell: a recurrent layer over time, patching, and resampling stages."""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from convlstm.errors import ShapeError


def check_video(x: Tensor, name: str = "frames") -> None:
    """Raise ShapeError unless x is a (B, T, C, H, W) tensor."""
    if not isinstance(x, Tensor) or x.dim() != 5:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ShapeError(f"{name} must be a (B, T, C, H, W) tensor, got shape {got}")


class ConvRNN(nn.Module):
    """Runs one cell over the time axis, with explicit state in and out."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        check_video(x, "ConvRNN input")
        outputs = []
        for t in range(x.shape[1]):
            h, state = self.cell(x[:, t], state)  # (B, C_hid, H, W)
            outputs.append(h)
        return torch.stack(outputs, dim=1), state  # (B, T, C_hid, H, W)


def patchify(frames: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, C*p*p, H/p, W/p): each p x p block becomes channels."""
    if patch == 1:
        return frames
    if frames.shape[-2] % patch or frames.shape[-1] % patch:
        raise ShapeError(
            f"frame size {tuple(frames.shape[-2:])} is not divisible by patch_size {patch}"
        )
    return rearrange(frames, "b c (h p1) (w p2) -> b (c p1 p2) h w", p1=patch, p2=patch)


def unpatchify(grid: Tensor, patch: int) -> Tensor:
    """(B, C*p*p, h, w) -> (B, C, h*p, w*p), the inverse of patchify."""
    if patch == 1:
        return grid
    return rearrange(grid, "b (c p1 p2) h w -> b c (h p1) (w p2)", p1=patch, p2=patch)


def _resample_kernel(stride: int) -> tuple[int, int]:
    # kernel 2s (even s) or 2s-1 (odd s) with padding (k-s)/2 maps H to H/s exactly, and its
    # transpose maps H/s back to H, so down and up stages mirror each other.
    kernel = 2 * stride - stride % 2
    return kernel, (kernel - stride) // 2


class DownStage(nn.Module):
    """Strided convolution + leaky ReLU between encoder RNN layers (Shi et al. 2017)."""

    def __init__(self, *, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        kernel, padding = _resample_kernel(stride) if stride > 1 else (3, 1)
        self.stride = stride
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] % self.stride or x.shape[-1] % self.stride:
            raise ShapeError(
                f"grid {tuple(x.shape[-2:])} is not divisible by the stage stride {self.stride}"
            )
        return self.act(self.conv(x))


class UpStage(nn.Module):
    """Transposed convolution + leaky ReLU that mirrors a DownStage in the forecaster."""

    def __init__(self, *, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if stride > 1:
            kernel, padding = _resample_kernel(stride)
            self.conv: nn.Module = nn.ConvTranspose2d(
                in_channels, out_channels, kernel, stride=stride, padding=padding
            )
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))
