"""Building blocks above a cell: a recurrent layer over time, patching, and resampling stages."""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from convlstm.cells.base import sequence_scope
from convlstm.errors import ShapeError


def check_video(x: Tensor, name: str = "frames") -> None:
    """Raise ShapeError unless x is a (B, T, C, H, W) tensor."""
    if not isinstance(x, Tensor) or x.dim() != 5:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ShapeError(f"{name} must be a (B, T, C, H, W) tensor, got shape {got}")


class ConvRNN(nn.Module):
    """Runs one cell over the time axis, with explicit state in and out.

    With `hoist` (set by convlstm.speed.apply_speed), a cell that has `project_input` and more
    than one frame, the input-to-state convolution runs once over all T frames (one large
    convolution instead of T small ones) and each step adds only the state-to-state part; a
    step that starts from the zero state skips that part. The same function as the per-step
    reference.
    """

    hoist = False

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        check_video(x, "ConvRNN input")
        return run_cell(self.cell, x, state, self.hoist)


def run_cell(
    cell: nn.Module, x: Tensor | None, state: Any, hoist: bool, steps: int = 1
) -> tuple[Tensor, Any]:
    """`cell` over time: (outputs (B, T, C_hid, H, W), last state) for frames x (B, T, C, H,
    W), or for `steps` steps of an input-less cell (x None). With `hoist`, for a cell that
    has `project_input` and more than one frame, the input-to-state convolution runs once
    over all frames (see ConvRNN)."""
    t = steps if x is None else x.shape[1]
    outputs = []
    if hoist and x is not None and t > 1 and hasattr(cell, "project_input") and cell.in_channels:
        b = x.shape[0]
        zero_state = state is None
        state = cell.prepare_state(x[:, 0], state)  # shape checks; zeros if None
        weights = cell.split_weights()
        # time-major, so that each step's slice is one dense block
        frames = x.transpose(0, 1).flatten(0, 1)  # (T*B, C_in, H, W)
        projected = cell.project_input(frames, weights).unflatten(0, (t, b))
        # unbind, not projected[i]: its backward is one stack, where indexing's would
        # write a zero-filled (T, B, ...) gradient per step and sum them
        for from_x in projected.unbind(0):  # (B, gates * C_hid, H, W)
            state = cell.run_step(cell.step_projected, from_x, state, weights, zero_state)
            zero_state = False
            outputs.append(state[0])
        return stack_time(outputs), state
    if x is None:
        inputs = [None] * t
    else:  # one frame: squeeze, whose backward is a view, where unbind's would stack a copy
        inputs = x.unbind(1) if t > 1 else (x.squeeze(1),)
    with sequence_scope([cell] if t > 1 else []):
        for frame in inputs:
            h, state = cell(frame, state)  # (B, C_hid, H, W)
            outputs.append(h)
    return stack_time(outputs), state  # (B, T, C_hid, H, W)


def stack_time(frames: list[Tensor]) -> Tensor:
    """torch.stack(frames, dim=1) for frames (B, C, H, W), as a view of a time-major buffer:
    each frame, and the time-major (T*B, C, H, W) flattening the next layer's hoisted
    convolution reads, stay views in the frames' memory format (channels-last included), where
    a stack along dim 1 would copy them into a (B, T, ...) layout. One frame is not copied:
    the result is a view of it (of the layer's returned h), so neither may be changed in place."""
    if len(frames) == 1:
        return frames[0].unsqueeze(1)
    return torch.cat(frames, dim=0).unflatten(0, (len(frames), frames[0].shape[0])).transpose(0, 1)


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


class StateMerge(nn.Module):
    """Merges a forward and a backward pass's final states into one: each state tensor becomes
    W [s_fwd; s_bwd] + b (a 1x1 convolution), initialised to the mean of the two."""

    def __init__(self, *, channels: int, state_size: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(2 * channels, channels, 1) for _ in range(state_size))
        with torch.no_grad():
            eye = torch.eye(channels).view(channels, channels, 1, 1)
            for conv in self.convs:
                conv.weight.copy_(torch.cat([eye, eye], dim=1) / 2)
                conv.bias.zero_()

    def forward(self, forward_state: tuple, backward_state: tuple) -> tuple:
        # the merged states keep the states' dtype (under autocast c in float32, h in float32
        # or, with low_precision_h, in bf16)
        return tuple(
            conv(torch.cat([f, b], dim=1)).to(f.dtype)
            for conv, f, b in zip(self.convs, forward_state, backward_state, strict=True)
        )


class TemporalAttention(nn.Module):
    """Attention of a forecaster state over an encoder's per-step states, at each grid position:

        q = W_q h,  k_t = W_k e_t,  v_t = W_v e_t                  (1x1 convolutions)
        a_t(y, x) = softmax_t(q(y, x) . k_t(y, x) / sqrt(d))
        h' = h + W_o Σ_t a_t v_t

    h (B, C, H, W); the memory e (B, T, C_e, H, W) is the encoder layer's output sequence.
    """

    def __init__(self, *, channels: int, memory_channels: int, key_channels: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, key_channels, 1)
        self.key = nn.Conv2d(memory_channels, key_channels, 1)
        self.value = nn.Conv2d(memory_channels, channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        self.scale = key_channels**-0.5

    def keys_values(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, C_e, H, W) -> keys (B, T, d, H, W) and values (B, T, C, H, W), once per
        forecast."""
        flat = memory.flatten(0, 1)  # (B*T, C_e, H, W)
        t = memory.shape[1]
        return self.key(flat).unflatten(0, (-1, t)), self.value(flat).unflatten(0, (-1, t))

    def forward(self, h: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        q = self.query(h)  # (B, d, H, W)
        scores = torch.einsum("bdhw,btdhw->bthw", q, keys.to(q.dtype)) * self.scale
        weights = scores.softmax(dim=1)  # (B, T, H, W), over the context steps
        context = torch.einsum("bthw,btchw->bchw", weights, values.to(weights.dtype))
        return h + self.out(context)
