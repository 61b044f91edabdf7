"""Independent float64 NumPy re-computations of the published equations of every recurrent cell
in `convlstm.cells` (no torch ops): ConvLSTM with peepholes and gate normalisation (Shi et al.
2015, Ba et al. 2016), ConvGRU and TrajGRU (Shi et al. 2017), the tanh ConvRNN, and SA-ConvLSTM
(Lin et al. 2020).

Every function takes numpy arrays (weights passed in explicitly) and returns numpy arrays.
A normalisation is given as `norm=(groups, weight, bias)` (a GroupNorm with a per-channel affine)
or None for no normalisation. `x=None` stands for a cell built without input.
"""

from __future__ import annotations

import numpy as np

from tests.reference import conv2d_same, sigmoid

Norm = tuple[int, np.ndarray, np.ndarray] | None


def group_norm(
    z: np.ndarray, groups: int, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5
) -> np.ndarray:
    """GroupNorm of z (B, C, H, W): the C channels are cut into `groups` consecutive groups, each
    normalised over its (C/G, H, W) values with the biased variance, then scaled and shifted per
    channel."""
    b, c, h, w = z.shape
    assert c % groups == 0, (c, groups)
    out = np.empty_like(z, dtype=np.float64)
    size = c // groups
    for n in range(b):
        for g in range(groups):
            block = z[n, g * size : (g + 1) * size]
            mean = block.sum() / block.size
            var = ((block - mean) ** 2).sum() / block.size  # biased, as in torch
            out[n, g * size : (g + 1) * size] = (block - mean) / np.sqrt(var + eps)
    return out * weight[None, :, None, None] + bias[None, :, None, None]


def _normalise(z: np.ndarray, norm: Norm) -> np.ndarray:
    return z if norm is None else group_norm(z, norm[0], norm[1], norm[2])


def _with_input(x: np.ndarray | None, h: np.ndarray) -> np.ndarray:
    return h if x is None else np.concatenate([x, h], axis=1)


def leaky_relu(z: np.ndarray, slope: float = 0.2) -> np.ndarray:
    return np.where(z >= 0, z, slope * z)


def conv1x1(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """1x1 convolution written as a channel matrix product. weight (Cout, Cin, 1, 1)."""
    out = np.einsum("oc,bchw->bohw", weight[:, :, 0, 0], x)
    if bias is not None:
        out = out + bias[None, :, None, None]
    return out


# --------------------------------------------------------------------------------------------
# ConvLSTM (Shi et al. 2015, eq. 3), optional peepholes and layer/group normalisation


def convlstm_cell_step(
    x: np.ndarray | None,
    h: np.ndarray,
    c: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    *,
    w_ci: np.ndarray | None = None,
    w_cf: np.ndarray | None = None,
    w_co: np.ndarray | None = None,
    norm: Norm = None,
    cell_norm: Norm = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One ConvLSTM step.

        z = N(W * [x, h] + b)            (no b when N is a norm)
        i, f, g, o = channel blocks of z (C each, in that order)
        i += w_ci ⊙ c ;  f += w_cf ⊙ c
        c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g)
        o += w_co ⊙ c'
        h' = σ(o) ⊙ tanh(N_c(c'))

    Peephole weights are (C, 1, 1) or (C, H, W) and broadcast over the batch.
    """
    hidden = h.shape[1]
    z = _normalise(conv2d_same(_with_input(x, h), weight, bias), norm)
    i = z[:, 0 * hidden : 1 * hidden]
    f = z[:, 1 * hidden : 2 * hidden]
    g = z[:, 2 * hidden : 3 * hidden]
    o = z[:, 3 * hidden : 4 * hidden]
    if w_ci is not None:
        i = i + w_ci[None] * c
    if w_cf is not None:
        f = f + w_cf[None] * c
    c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    if w_co is not None:
        o = o + w_co[None] * c_new
    h_new = sigmoid(o) * np.tanh(_normalise(c_new, cell_norm))
    return h_new, c_new


# --------------------------------------------------------------------------------------------
# ConvGRU and TrajGRU (Shi et al. 2017, eqs. 3 and 4)


def gru_update(
    from_x: np.ndarray | None,
    from_h: np.ndarray,
    h: np.ndarray,
    *,
    activation,
    norm: Norm = None,
    candidate_norm: Norm = None,
) -> np.ndarray:
    """The GRU update from the input-to-state part [xz, xr, xh] (or None without input) and the
    state-to-state part [hz, hr, hh]:

        z = σ(N(xz + hz))_z    r = σ(N(xr + hr))_r     (N normalises the 2C stacked channels)
        h~ = act(N_h(xh + r ⊙ hh))
        h' = (1 - z) ⊙ h~ + z ⊙ h
    """
    hidden = h.shape[1]
    hz, hr, hh = (from_h[:, k * hidden : (k + 1) * hidden] for k in range(3))
    if from_x is None:
        xz = xr = xh = np.zeros_like(h)
    else:
        xz, xr, xh = (from_x[:, k * hidden : (k + 1) * hidden] for k in range(3))
    gates = _normalise(np.concatenate([xz + hz, xr + hr], axis=1), norm)
    z = sigmoid(gates[:, :hidden])
    r = sigmoid(gates[:, hidden:])
    candidate = activation(_normalise(xh + r * hh, candidate_norm))
    return (1.0 - z) * candidate + z * h


def convgru_step(
    x: np.ndarray | None,
    h: np.ndarray,
    w_x: np.ndarray | None,
    b_x: np.ndarray | None,
    w_h: np.ndarray,
    b_h: np.ndarray | None,
    *,
    norm: Norm = None,
    candidate_norm: Norm = None,
) -> np.ndarray:
    """ConvGRU: [xz, xr, xh] = W_x * x + b_x, [hz, hr, hh] = W_h * h (+ b_h), tanh candidate."""
    from_x = None if x is None else conv2d_same(x, w_x, b_x)
    from_h = conv2d_same(h, w_h, b_h)
    return gru_update(
        from_x, from_h, h, activation=np.tanh, norm=norm, candidate_norm=candidate_norm
    )


def bilinear_warp(h: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """out[b, c, y, x] = bilinear sample of h[b, c] at (y + v, x + u), (u, v) = flow[b, :, y, x]
    in grid cells (u along the width). Each of the four neighbours that lies outside the grid
    contributes zero. h (B, C, H, W), flow (B, 2, H, W)."""
    b, c, height, width = h.shape
    out = np.zeros((b, c, height, width))
    for n in range(b):
        for y in range(height):
            for x in range(width):
                sx = x + flow[n, 0, y, x]
                sy = y + flow[n, 1, y, x]
                x0, y0 = int(np.floor(sx)), int(np.floor(sy))
                ax, ay = sx - x0, sy - y0  # weights of the far neighbours
                for yy, wy in ((y0, 1.0 - ay), (y0 + 1, ay)):
                    for xx, wx in ((x0, 1.0 - ax), (x0 + 1, ax)):
                        if 0 <= yy < height and 0 <= xx < width:
                            out[n, :, y, x] += wy * wx * h[n, :, yy, xx]
    return out


def trajgru_flows(
    x: np.ndarray | None,
    h: np.ndarray,
    *,
    flow_x_w: np.ndarray | None,
    flow_x_b: np.ndarray | None,
    flow_h_w: np.ndarray,
    flow_h_b: np.ndarray | None,
    flow_out_w: np.ndarray,
    flow_out_b: np.ndarray | None,
) -> np.ndarray:
    """The flow network γ(x, h): (B, 2L, H, W), channel 2l = u_l (width), 2l + 1 = v_l (height)."""
    hidden = conv2d_same(h, flow_h_w, flow_h_b)
    if x is not None:
        hidden = hidden + conv2d_same(x, flow_x_w, flow_x_b)
    return conv2d_same(leaky_relu(hidden, 0.2), flow_out_w, flow_out_b)


def trajgru_step(
    x: np.ndarray | None,
    h: np.ndarray,
    *,
    w_x: np.ndarray | None,
    b_x: np.ndarray | None,
    w_h: np.ndarray,
    b_h: np.ndarray | None,
    flow_x_w: np.ndarray | None,
    flow_x_b: np.ndarray | None,
    flow_h_w: np.ndarray,
    flow_h_b: np.ndarray | None,
    flow_out_w: np.ndarray,
    flow_out_b: np.ndarray | None,
    norm: Norm = None,
    candidate_norm: Norm = None,
) -> np.ndarray:
    """TrajGRU: warp h along each of the L flows, [hz, hr, hh] = Σ_l W_l (1x1) warp_l(h) with
    W_h (3C, L*C, 1, 1) split link-major into the W_l, and the GRU update with a leaky-ReLU
    (slope 0.2) candidate."""
    hidden = h.shape[1]
    flows = trajgru_flows(
        x,
        h,
        flow_x_w=flow_x_w,
        flow_x_b=flow_x_b,
        flow_h_w=flow_h_w,
        flow_h_b=flow_h_b,
        flow_out_w=flow_out_w,
        flow_out_b=flow_out_b,
    )
    links = flows.shape[1] // 2
    from_h = np.zeros((h.shape[0], 3 * hidden, h.shape[2], h.shape[3]))
    for link in range(links):
        warped = bilinear_warp(h, flows[:, 2 * link : 2 * link + 2])
        w_link = w_h[:, link * hidden : (link + 1) * hidden]
        from_h = from_h + conv1x1(warped, w_link, None)
    if b_h is not None:
        from_h = from_h + b_h[None, :, None, None]
    from_x = None if x is None else conv2d_same(x, w_x, b_x)
    return gru_update(
        from_x,
        from_h,
        h,
        activation=lambda z: leaky_relu(z, 0.2),
        norm=norm,
        candidate_norm=candidate_norm,
    )


# --------------------------------------------------------------------------------------------
# The tanh ConvRNN


def convrnn_step(
    x: np.ndarray | None,
    h: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    *,
    norm: Norm = None,
) -> np.ndarray:
    """h' = tanh(N(W * [x, h] + b))."""
    return np.tanh(_normalise(conv2d_same(_with_input(x, h), weight, bias), norm))


# --------------------------------------------------------------------------------------------
# SA-ConvLSTM (Lin et al., AAAI 2020)


def softmax(z: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Z[:, i] = Σ_j A[i, j] V[:, j] with A = softmax_j(Q^T K) (no 1/sqrt(d) scaling), for
    q, k (B, d, H, W) and v (B, C, H, W), positions flattened row-major (N = H*W)."""
    b, d, height, width = q.shape
    n = height * width
    out = np.zeros(v.shape)
    for s in range(b):
        qm = q[s].reshape(d, n)
        km = k[s].reshape(d, n)
        vm = v[s].reshape(v.shape[1], n)
        logits = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                logits[i, j] = np.dot(qm[:, i], km[:, j])
        a = softmax(logits, axis=1)  # over the keys j
        z = np.zeros((v.shape[1], n))
        for i in range(n):
            z[:, i] = (a[i][None, :] * vm).sum(axis=1)
        out[s] = z.reshape(v.shape[1], height, width)
    return out


def self_attention_memory(h: np.ndarray, m: np.ndarray, p: dict) -> tuple[np.ndarray, np.ndarray]:
    """The SAM module. `p` holds 'query', 'key_h', 'value_h', 'key_m', 'value_m', 'merge',
    'gates' as (weight, bias) pairs. Returns (h', m')."""
    q = conv1x1(h, *p["query"])
    z_h = attend(q, conv1x1(h, *p["key_h"]), conv1x1(h, *p["value_h"]))
    z_m = attend(q, conv1x1(m, *p["key_m"]), conv1x1(m, *p["value_m"]))
    z = conv1x1(np.concatenate([z_h, z_m], axis=1), *p["merge"])
    gates = conv2d_same(np.concatenate([z, h], axis=1), *p["gates"])
    hidden = h.shape[1]
    i = gates[:, :hidden]
    g = gates[:, hidden : 2 * hidden]
    o = gates[:, 2 * hidden :]
    m_new = (1.0 - sigmoid(i)) * m + sigmoid(i) * np.tanh(g)
    return sigmoid(o) * m_new, m_new


def sa_convlstm_step(
    x: np.ndarray | None,
    h: np.ndarray,
    c: np.ndarray,
    m: np.ndarray,
    *,
    lstm_weight: np.ndarray,
    lstm_bias: np.ndarray | None,
    memory: dict,
    norm: Norm = None,
    cell_norm: Norm = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ConvLSTM step on (x, h, c) giving (h1, c'), then SAM on (h1, m) giving (h', m')."""
    h1, c_new = convlstm_cell_step(x, h, c, lstm_weight, lstm_bias, norm=norm, cell_norm=cell_norm)
    h_new, m_new = self_attention_memory(h1, m, memory)
    return h_new, c_new, m_new
