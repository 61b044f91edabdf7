"""Self-attention ConvLSTM (SA-ConvLSTM, Lin et al., AAAI 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convlstm.cells.base import RecurrentCell, conv
from convlstm.cells.lstm import ConvLSTMCell


class SelfAttentionMemory(nn.Module):
    """The self-attention memory module (SAM) of SA-ConvLSTM. Given the ConvLSTM's new hidden
    state H and the memory M (each (B, C, H, W), N = H*W positions):

        Q = W_q H,  K_h = W_k H,  V_h = W_v H,  K_m = W_mk M,  V_m = W_mv M      (1x1 convs)
        Z_h = V_h softmax(Q^T K_h)^T      Z_m = V_m softmax(Q^T K_m)^T          (over N keys)
        Z = W_z [Z_h; Z_m]                                                      (1x1 conv)
        [i, g, o] = W_m * [Z; H] + b                                            (k x k conv)
        M' = (1 - σ(i)) ⊙ M + σ(i) ⊙ tanh(g)        H' = σ(o) ⊙ M'

    The attention logits are not scaled by 1/sqrt(d) (the paper's equations, as in SAGAN).
    """

    def __init__(self, *, channels: int, key_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, key_channels, 1)
        self.key_h = nn.Conv2d(channels, key_channels, 1)
        self.value_h = nn.Conv2d(channels, channels, 1)
        self.key_m = nn.Conv2d(channels, key_channels, 1)
        self.value_m = nn.Conv2d(channels, channels, 1)
        self.merge = nn.Conv2d(2 * channels, channels, 1)
        self.gates = conv(2 * channels, 3 * channels, kernel_size)

    @staticmethod
    def _attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # (B, d, H, W), (B, d, H, W), (B, C, H, W) -> (B, C, H, W), attention over positions
        tokens = [t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (q, k, v)]  # (B, 1, N, .)
        out = F.scaled_dot_product_attention(*tokens, scale=1.0)  # (B, 1, N, C)
        return out.squeeze(1).transpose(1, 2).unflatten(2, v.shape[-2:])

    def forward(self, h: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        q = self.query(h)
        z_h = self._attend(q, self.key_h(h), self.value_h(h))
        z_m = self._attend(q, self.key_m(m), self.value_m(m))
        z = self.merge(torch.cat([z_h, z_m], dim=1))  # (B, C, H, W)
        i, g, o = self.gates(torch.cat([z, h], dim=1)).chunk(3, dim=1)
        i = torch.sigmoid(i)
        m = (1 - i) * m + i * torch.tanh(g)
        return torch.sigmoid(o) * m, m


class SAConvLSTMCell(RecurrentCell):
    """SA-ConvLSTM: a ConvLSTM step followed by the self-attention memory. State (h, c, m):
    the ConvLSTM updates (h, c) from x and the previous h; SAM turns the new h and m into
    the output h and the new m (Lin et al. 2020, Fig. 3). `key_channels` is the size of the
    queries and keys."""

    state_size = 3

    def __init__(
        self,
        *,
        in_channels: int,
        hidden_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        forget_bias: float = 1.0,
        norm: str = "none",
        key_channels: int = 16,
    ) -> None:
        super().__init__(
            in_channels=in_channels, hidden_channels=hidden_channels, kernel_size=kernel_size
        )
        self.lstm = ConvLSTMCell(
            in_channels=in_channels,
            hidden_channels=hidden_channels,
            kernel_size=kernel_size,
            bias=bias,
            forget_bias=forget_bias,
            norm=norm,
        )
        self.memory = SelfAttentionMemory(
            channels=hidden_channels, key_channels=key_channels, kernel_size=kernel_size
        )

    def step(self, x: Tensor | None, state: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        h, c, m = state
        h, c = self.lstm.step(x, (h, c))
        h, m = self.memory(h, m)
        return h, c, m
