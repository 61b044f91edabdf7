"""ConvGRU and TrajGRU in the form of Shi et al. 2017 ("Deep learning for precipitation
nowcasting: a benchmark and a new model", eqs. 3 and 4), and the plain tanh ConvRNN baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convlstm import packed, winograd
from convlstm.cells.base import GateNorm, RecurrentCell, conv, with_input
from convlstm.errors import ConfigError


class _GRUUpdate(nn.Module):
    """The GRU arithmetic shared by ConvGRU and TrajGRU, given the input-to-state part
    (B, 3C, H, W) or None and the state-to-state part (B, 3C, H, W), gates in order z, r, h~:

        z = σ(N(xz + hz))    r = σ(N(xr + hr))    h~ = act(N_h(xh + r ⊙ hh))
        h' = (1 - z) ⊙ h~ + z ⊙ h
    """

    def __init__(self, *, channels: int, norm: str, activation: nn.Module) -> None:
        super().__init__()
        self.norm = GateNorm(norm, gates=2, channels=channels)
        self.candidate_norm = GateNorm(norm, gates=1, channels=channels)
        self.activation = activation

    def forward(self, from_x: Tensor | None, from_h: Tensor, h: Tensor) -> Tensor:
        hz, hr, hh = from_h.chunk(3, dim=1)
        if from_x is None:
            pre_zr, xh = torch.cat([hz, hr], dim=1), 0.0
        else:
            xz, xr, xh = from_x.chunk(3, dim=1)
            pre_zr = torch.cat([xz + hz, xr + hr], dim=1)  # (B, 2C, H, W)
        z, r = torch.sigmoid(self.norm(pre_zr)).chunk(2, dim=1)
        candidate = self.activation(self.candidate_norm(xh + r * hh))
        return (1 - z) * candidate + z * h


class ConvGRUCell(RecurrentCell):
    """ConvGRU (Shi et al. 2017, eq. 3). State (h,).

        [xz, xr, xh] = W_x * x + b          [hz, hr, hh] = W_h * h
        z = σ(xz + hz)    r = σ(xr + hr)    h~ = tanh(xh + r ⊙ hh)    h' = (1 - z) ⊙ h~ + z ⊙ h

    The reset gate scales the state-to-state convolution's output (Shi et al.'s form), so both
    convolutions run once per step and the input one can be computed for all frames at once.
    One departure: the candidate uses tanh (a bounded state, as in the GRU), where Shi et al.
    use a leaky ReLU for ConvGRU as for TrajGRU (which keeps the paper's leaky ReLU here).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        hidden_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        norm: str = "none",
    ) -> None:
        super().__init__(
            in_channels=in_channels, hidden_channels=hidden_channels, kernel_size=kernel_size
        )
        c = hidden_channels
        use_bias = bias and norm == "none"
        self.conv_x = conv(in_channels, 3 * c, kernel_size, bias=use_bias) if in_channels else None
        self.conv_h = conv(c, 3 * c, kernel_size, bias=use_bias and not in_channels)
        self.update = _GRUUpdate(channels=c, norm=norm, activation=nn.Tanh())

    def step(
        self, x: Tensor | None, state: tuple[Tensor, ...], convs: tuple | None = None
    ) -> tuple[Tensor]:
        """convs: (W_x * ., W_h * .) to run instead of conv_x and conv_h (Winograd's, packed
        ones, batched ones)."""
        (h,) = state
        conv_x, conv_h = (self.conv_x, self.conv_h) if convs is None else convs
        from_x = None if x is None else conv_x(x)
        return (self.update(from_x, conv_h(h), h),)

    def open_sequence(self) -> tuple | None:
        """(W_x * ., W_h * .) for the steps of one sequence (see sequence_scope): by Winograd,
        each filter transformed once, or with batched_wgrad / forward_dgrad (while grad is
        enabled) their gradients made through convlstm.wgrad; None for the plain conv_x and
        conv_h."""
        if self.winograd_now():
            batch_grad = not self.checkpointing
            return self._convs(lambda c: winograd.sequence_conv(c, batch_grad=batch_grad))
        if self.sequence_grads_now():
            return self._convs(lambda c: _sequence_conv(self, c))
        return None

    def step_convs(self, make) -> tuple:
        return self._convs(make)

    def _convs(self, make) -> tuple:
        return (None if self.conv_x is None else make(self.conv_x), make(self.conv_h))

    # The hoisted form (convlstm.speed): the input convolution for many frames at once.
    def split_weights(self) -> tuple | None:
        """The two convolutions are separate already: None, or open_sequence's (Winograd's,
        or with batched_wgrad / forward_dgrad W_x, which runs once over all frames and has
        no steps to batch, and W_h through convlstm.wgrad; without autograd, with `packed`,
        both from kept packs)."""
        if not self.winograd_now() and self.packs_now():
            return self._convs(packed.step_conv)
        if self.winograd_now() or not self.sequence_grads_now():
            return self.open_sequence()
        return (
            None if self.conv_x is None else _sequence_conv(self, self.conv_x, batch=False),
            _sequence_conv(self, self.conv_h),
        )

    def project_input(self, x: Tensor, weights: tuple | None = None) -> Tensor:
        """W_x * x + b for frames x (N, C_in, H, W) -> (N, 3C, H, W)."""
        return (self.conv_x if weights is None else weights[0])(x)

    def step_projected(
        self,
        from_x: Tensor,
        state: tuple[Tensor, ...],
        weights: tuple | None = None,
        zero_state: bool = False,
    ) -> tuple[Tensor]:
        """step() given project_input(x). W_h * h runs even for a zero h (one code path;
        a skip would save one small convolution per sequence)."""
        (h,) = state
        conv_h = self.conv_h if weights is None else weights[1]
        return (self.update(from_x, conv_h(h), h),)


def _sequence_conv(cell: RecurrentCell, conv: nn.Conv2d, batch: bool = True):
    """conv for one sequence of `cell`'s steps, its gradients made as the cell's options say
    (RecurrentCell.wgrad_conv), or the plain conv where none applies."""
    return cell.wgrad_conv(conv.weight, conv.bias, conv.padding[0], batch) or conv


def warp(h: Tensor, flow: Tensor) -> Tensor:
    """Bilinear backward warp: out[b, :, y, x] = h[b, :, y + v, x + u], where
    (u, v) = flow[b, :, y, x] in grid cells (u along the width); outside the grid reads zeros.
    h (B, C, H, W), flow (B, 2, H, W) -> (B, C, H, W). Runs in float32 (or float64) even under
    autocast: in bf16 the sampling positions and the gradient reaching the flows are too coarse.
    """
    dtype = torch.promote_types(torch.promote_types(h.dtype, flow.dtype), torch.float32)
    with torch.autocast(h.device.type, enabled=False):
        h, flow = h.to(dtype), flow.to(dtype)
        _, _, height, width = h.shape
        ys = torch.arange(height, device=h.device, dtype=dtype).view(1, height, 1)
        xs = torch.arange(width, device=h.device, dtype=dtype).view(1, 1, width)
        x_src = xs + flow[:, 0]  # (B, H, W)
        y_src = ys + flow[:, 1]
        # grid_sample with align_corners=False reads cell i's centre at (2i + 1) / size - 1
        # (this also holds for a grid one cell wide).
        grid = torch.stack([(2 * x_src + 1) / width - 1, (2 * y_src + 1) / height - 1], dim=-1)
        return F.grid_sample(  # grid (B, H, W, 2)
            h, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )


class TrajGRUCell(RecurrentCell):
    """TrajGRU (Shi et al. 2017, eq. 4). State (h,).

    A small network predicts `links` (L) flow fields from x and h:
        U, V = γ(x, h) = W_f * leaky(W_fx * x + W_fh * h + b)     (5x5 convolutions, 32 channels)
    h is warped along each flow (bilinear sampling); the state-to-state transition is a 1x1
    convolution over the L warped copies:
        [hz, hr, hh] = Σ_l W_l * warp(h, U_l, V_l)
    and the update is ConvGRU's with the paper's leaky ReLU (slope 0.2) as candidate activation.
    Sign convention: a copy is read at (y + v, x + u); some implementations subtract the flow
    instead, which the linear flow layer absorbs (the same family of functions).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        hidden_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        norm: str = "none",
        links: int = 9,
        flow_channels: int = 32,
        flow_kernel: int = 5,
    ) -> None:
        super().__init__(
            in_channels=in_channels, hidden_channels=hidden_channels, kernel_size=kernel_size
        )
        if links < 1:
            raise ConfigError(f"TrajGRU needs at least one link, got {links}")
        c = hidden_channels
        self.links = links
        use_bias = bias and norm == "none"
        self.conv_x = conv(in_channels, 3 * c, kernel_size, bias=use_bias) if in_channels else None
        self.flow_x = conv(in_channels, flow_channels, flow_kernel) if in_channels else None
        self.flow_h = conv(c, flow_channels, flow_kernel, bias=not in_channels)
        self.flow_out = conv(flow_channels, 2 * links, flow_kernel)
        self.conv_h = nn.Conv2d(links * c, 3 * c, 1, bias=use_bias and not in_channels)
        self.update = _GRUUpdate(channels=c, norm=norm, activation=nn.LeakyReLU(0.2))

    def flows(self, x: Tensor | None, h: Tensor) -> Tensor:
        """The L flow fields (B, L, 2, H, W), (u, v) in grid cells."""
        hidden = self.flow_h(h)
        if x is not None:
            hidden = hidden + self.flow_x(x)
        flows = self.flow_out(F.leaky_relu(hidden, 0.2))  # (B, 2L, H, W)
        return flows.unflatten(1, (self.links, 2))

    def step(self, x: Tensor | None, state: tuple[Tensor, ...]) -> tuple[Tensor]:
        (h,) = state
        flows = self.flows(x, h)  # (B, L, 2, H, W)
        b, links = flows.shape[:2]
        # warp all L copies in one call: (B*L, C, H, W) sampled along (B*L, 2, H, W)
        copies = h.unsqueeze(1).expand(-1, links, -1, -1, -1).flatten(0, 1)
        warped = warp(copies, flows.flatten(0, 1)).unflatten(0, (b, links))
        from_h = self.conv_h(warped.flatten(1, 2))  # (B, L*C, H, W) -> (B, 3C, H, W)
        from_x = None if x is None else self.conv_x(x)
        return (self.update(from_x, from_h, h),)


class ConvRNNCell(RecurrentCell):
    """The plain tanh ConvRNN, no gates (the baseline gated cells must beat). State (h,).

    h' = tanh(N(W * [x, h] + b))
    """

    def __init__(
        self,
        *,
        in_channels: int,
        hidden_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        norm: str = "none",
    ) -> None:
        super().__init__(
            in_channels=in_channels, hidden_channels=hidden_channels, kernel_size=kernel_size
        )
        c = hidden_channels
        self.norm = GateNorm(norm, gates=1, channels=c)
        self.conv = conv(in_channels + c, c, kernel_size, bias=bias and norm == "none")

    def step(self, x: Tensor | None, state: tuple[Tensor, ...], conv=None) -> tuple[Tensor]:
        """conv: W * . to run instead of self.conv (Winograd's, a packed one, a batched one)."""
        (h,) = state
        out = torch.tanh(self.norm((self.conv if conv is None else conv)(with_input(x, h))))
        return (out.to(h.dtype),)  # the state keeps its dtype (float32 under autocast)

    def open_sequence(self):
        """W * . for the steps of one sequence (see sequence_scope): by Winograd, the filter
        transformed once, or with batched_wgrad / forward_dgrad (while grad is enabled) its
        gradients made through convlstm.wgrad; None for the plain self.conv."""
        if self.winograd_now():
            return winograd.sequence_conv(self.conv, batch_grad=not self.checkpointing)
        if self.sequence_grads_now():
            return _sequence_conv(self, self.conv)
        return None

    def step_convs(self, make):
        return make(self.conv)
