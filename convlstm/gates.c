/* The plain ConvLSTM update's backward, one pass: see convlstm/gates.py (native_lstm_update).

   Given the saved activations a = [i, f, g, o] (sigmoid, sigmoid, tanh, sigmoid of the
   pre-activations), the old memory c, t = tanh(c') and the gradients of h' = o t and
   c' = f c + i g:
     dc_total = dc' + dh o (1 - t^2)
     dz_i = dc_total g i (1 - i)      dz_f = dc_total c f (1 - f)
     dz_g = dc_total i (1 - g^2)      dz_o = dh t o (1 - o)
     dc = dc_total f
   Tensors are dense, all in one layout: NCHW (nhwc = 0) or channels-last (nhwc = 1). The
   four-gate tensors a and dz have 4 * ch channels, gate k in channels k ch .. (k + 1) ch - 1;
   the others have ch. Calls of at least 2^16 elements split the images and rows between
   OpenMP threads, PyTorch's own (see convlstm/tiles.c): each element is computed alike. */

#define DEFINE_BACKWARD(T, S)                                                                 \
void lstm_backward_##S(const T *restrict a, const T *restrict c, const T *restrict t,         \
                       const T *restrict dh, const T *restrict dcn, T *restrict dz,           \
                       T *restrict dc, long n, long ch, long hw, int nhwc) {                  \
    /* element (image b, channel k, pixel p) of a ch-channel tensor, and the stride from one  \
       gate to the next in the four-gate ones */                                              \
    long outer = nhwc ? hw : ch, inner = nhwc ? ch : hw, gate = nhwc ? ch : ch * hw;          \
    _Pragma("omp parallel for collapse(2) schedule(static) if (n * 4 * ch * hw >= 65536)")    \
    for (long b = 0; b < n; b++)                                                              \
        for (long q = 0; q < outer; q++) {                                                    \
            long one = (b * outer + q) * inner;                                               \
            long four = nhwc ? (b * hw + q) * 4 * ch : b * 4 * ch * hw + q * hw;              \
            const T *ai = a + four, *af = ai + gate, *ag = af + gate, *ao = ag + gate;        \
            T *zi = dz + four, *zf = zi + gate, *zg = zf + gate, *zo = zg + gate;             \
            for (long k = 0; k < inner; k++) {                                                \
                T i = ai[k], f = af[k], g = ag[k], o = ao[k];                                 \
                T tk = t[one + k], dhk = dh[one + k];                                         \
                T total = dcn[one + k] + dhk * o * (1 - tk * tk);                             \
                zi[k] = total * g * i * (1 - i);                                              \
                zf[k] = total * c[one + k] * f * (1 - f);                                     \
                zg[k] = total * i * (1 - g * g);                                              \
                zo[k] = dhk * tk * o * (1 - o);                                               \
                dc[one + k] = total * f;                                                      \
            }                                                                                 \
        }                                                                                     \
}

DEFINE_BACKWARD(float, f32)
DEFINE_BACKWARD(double, f64)
