"""Independent float64 NumPy re-computations of the published equations (no torch ops)."""

from __future__ import annotations

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def conv2d_same(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Cross-correlation with zero 'same' padding. x (B, Cin, H, W), weight (Cout, Cin, k, k)."""
    b, _, h, w = x.shape
    k = weight.shape[-1]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((b, weight.shape[0], h, w))
    for dy in range(k):
        for dx in range(k):
            window = xp[:, :, dy : dy + h, dx : dx + w]  # (B, Cin, H, W)
            out += np.einsum("bchw,oc->bohw", window, weight[:, :, dy, dx])
    if bias is not None:
        out += bias[None, :, None, None]
    return out


def convlstm_step(x, h, c, weight, bias):
    """Shi et al. 2015 without peepholes; gates in order i, f, g, o along the conv output."""
    z = conv2d_same(np.concatenate([x, h], axis=1), weight, bias)
    i, f, g, o = np.split(z, 4, axis=1)
    c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h_new = sigmoid(o) * np.tanh(c_new)
    return h_new, c_new


def patchify(frame: np.ndarray, p: int) -> np.ndarray:
    """(B, C, H, W) -> (B, C*p*p, H/p, W/p), channel index = c*p*p + dy*p + dx."""
    b, c, h, w = frame.shape
    out = np.zeros((b, c * p * p, h // p, w // p))
    for ch in range(c):
        for dy in range(p):
            for dx in range(p):
                out[:, ch * p * p + dy * p + dx] = frame[:, ch, dy::p, dx::p]
    return out


def unpatchify(grid: np.ndarray, p: int) -> np.ndarray:
    b, cpp, h, w = grid.shape
    c = cpp // (p * p)
    out = np.zeros((b, c, h * p, w * p))
    for ch in range(c):
        for dy in range(p):
            for dx in range(p):
                out[:, ch, dy::p, dx::p] = grid[:, ch * p * p + dy * p + dx]
    return out
