/* The plain ConvLSTM update, forward and backward, one pass each: see convlstm/gates.py
   (native_lstm_update), and for the forward's arithmetic convlstm/cells/lstm.py
   (lstm_update). The forward saves the activations its backward reads.

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

#include <stdint.h>

/* exp(x) - 1 and exp(x) without a libm call, so that GCC vectorises the loops that use them:
   x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, Cody and Waite), e^r - 1 as its
   Taylor series to r^7 (float; error about 2e-8 relative) or r^14 (double; below 1e-17),
   times 2^n made from the exponent bits. x is clamped to where 2^n is a normal number
   (e^x then saturates: the gates' sigmoid and tanh reach their limits long before). */
static inline float expm1_f32(float x, float *e) {
    x = x < -87.0f ? -87.0f : x; /* ternaries, not fminf: those GCC does not vectorise */
    x = x > 88.0f ? 88.0f : x;   /* a NaN stays: it reaches the result through r */
    float xn = x == x ? x : 0.0f; /* n from a number, so that its conversion is defined */
    float n = (xn * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* rounded: + 1.5 2^23 */
    float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    float q = r * (1.0f + r * (1.0f / 2 + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120
              + r * (1.0f / 720 + r * (1.0f / 5040)))))));
    union { uint32_t i; float f; } bits = {.i = (uint32_t)((int32_t)n + 127) << 23};
    float scale = bits.f;
    *e = scale * q + scale; /* e^x */
    return scale * q + (scale - 1.0f);
}

static inline double expm1_f64(double x, double *e) {
    x = x < -708.0 ? -708.0 : x;
    x = x > 709.0 ? 709.0 : x;
    double xn = x == x ? x : 0.0;
    double n = (xn * 1.44269504088896338700 + 6755399441055744.0) - 6755399441055744.0;
    double r = (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
    double q = r * (1 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120
               + r * (1.0 / 720 + r * (1.0 / 5040 + r * (1.0 / 40320 + r * (1.0 / 362880
               + r * (1.0 / 3628800 + r * (1.0 / 39916800 + r * (1.0 / 479001600
               + r * (1.0 / 6227020800 + r * (1.0 / 87178291200.0))))))))))))));
    union { uint64_t i; double f; } bits = {.i = (uint64_t)((int64_t)n + 1023) << 52};
    double scale = bits.f;
    *e = scale * q + scale;
    return scale * q + (scale - 1.0);
}

/* sigmoid(x) = 1 / (1 + e^-x); tanh(x) = m / (m + 2) with m = e^2x - 1, accurate near 0 */
#define ACTIVATIONS(T, S)                                                                     \
static inline T sigmoid_##S(T x) { T e; expm1_##S(-x, &e); return 1 / (1 + e); }              \
static inline T tanh_##S(T x) { T e; T m = expm1_##S(2 * x, &e); return m / (m + 2); }

/* Both passes: every (image b, row q) of the ch-channel tensors, split between threads for
   calls of 2^16 gate elements or more; `one` is the row's offset in those, `four` gate 0's
   in the four-gate tensors, where gate k lies k `gate` further on. */
#define LAYOUT long outer = nhwc ? hw : ch, inner = nhwc ? ch : hw, gate = nhwc ? ch : ch * hw;
#define FOR_ROWS                                                                              \
    _Pragma("omp parallel for collapse(2) schedule(static) if (n * 4 * ch * hw >= 65536)")    \
    for (long b = 0; b < n; b++)                                                              \
        for (long q = 0; q < outer; q++)
#define OFFSETS                                                                               \
    long one = (b * outer + q) * inner;                                                       \
    long four = nhwc ? (b * hw + q) * 4 * ch : b * 4 * ch * hw + q * hw;

/* bf16 (the upper half of a float32) to and from float: the store rounds to nearest even,
   and a NaN stays a NaN (its quiet bit set, so that no payload is cut to infinity) */
static inline float bf16_load(uint16_t v) {
    union { uint32_t i; float f; } u = {.i = (uint32_t)v << 16};
    return u.f;
}
static inline uint16_t bf16_store(float x) {
    union { float f; uint32_t i; } u = {.f = x};
    uint32_t rounded = (u.i + 0x7FFFu + ((u.i >> 16) & 1u)) >> 16;
    return (uint16_t)(x == x ? rounded : (u.i >> 16) | 0x40u);
}
#define PLAIN(x) (x)

/* One element of the forward, from the four gates' pre-activations */
#define FORWARD_ELEMENT(T, S, HST, PI, PF, PG, PO)                                            \
    {                                                                                         \
        T i = sigmoid_##S(PI), f = sigmoid_##S(PF), g = tanh_##S(PG), o = sigmoid_##S(PO);    \
        T cnew = f * c[one + k] + i * g, tk = tanh_##S(cnew);                                 \
        ai[k] = i; af[k] = f; ag[k] = g; ao[k] = o;                                           \
        cn[one + k] = cnew; t[one + k] = tk; h[one + k] = HST(o * tk);                        \
    }

/* The forward: z (+ z_more, which may be NULL) -> the activations a = [i, f, g, o], the new
   memory c' = f c + i g, t = tanh(c') and h' = o t; layouts as for the backward below. The
   pre-activations are of type Z, read with LD (bf16 under autocast: the rest in float), and
   h' of type H, written with HST (bf16 with low_precision_h). */
#define DEFINE_FORWARD(T, S, Z, NAME, LD, H, HST)                                             \
void lstm_forward_##NAME(const Z *restrict z, const Z *restrict zm, const T *restrict c,      \
                         T *restrict a, T *restrict cn, T *restrict t, H *restrict h,         \
                         long n, long ch, long hw, int nhwc) {                                \
    LAYOUT                                                                                    \
    FOR_ROWS {                                                                                \
        OFFSETS                                                                               \
        const Z *zi = z + four, *zf = zi + gate, *zg = zf + gate, *zo = zg + gate;            \
        T *ai = a + four, *af = ai + gate, *ag = af + gate, *ao = ag + gate;                  \
        if (zm) {                                                                             \
            const Z *mi = zm + four, *mf = mi + gate, *mg = mf + gate, *mo = mg + gate;       \
            _Pragma("GCC ivdep") for (long k = 0; k < inner; k++)                             \
                FORWARD_ELEMENT(T, S, HST, LD(zi[k]) + LD(mi[k]), LD(zf[k]) + LD(mf[k]),      \
                                LD(zg[k]) + LD(mg[k]), LD(zo[k]) + LD(mo[k]))                 \
        } else {                                                                              \
            _Pragma("GCC ivdep") for (long k = 0; k < inner; k++)                             \
                FORWARD_ELEMENT(T, S, HST, LD(zi[k]), LD(zf[k]), LD(zg[k]), LD(zo[k]))        \
        }                                                                                     \
    }                                                                                         \
}

/* The backward: dz (type Z, written with ST) and dc from the saved activations and dh (type
   H, read with HLD) */
#define DEFINE_BACKWARD(T, Z, NAME, ST, H, HLD)                                               \
void lstm_backward_##NAME(const T *restrict a, const T *restrict c, const T *restrict t,      \
                          const H *restrict dh, const T *restrict dcn, Z *restrict dz,        \
                          T *restrict dc, long n, long ch, long hw, int nhwc) {               \
    LAYOUT                                                                                    \
    FOR_ROWS {                                                                                \
        OFFSETS                                                                               \
        const T *ai = a + four, *af = ai + gate, *ag = af + gate, *ao = ag + gate;            \
        Z *zi = dz + four, *zf = zi + gate, *zg = zf + gate, *zo = zg + gate;                 \
        _Pragma("GCC ivdep") for (long k = 0; k < inner; k++) {                               \
            T i = ai[k], f = af[k], g = ag[k], o = ao[k];                                     \
            T tk = t[one + k], dhk = HLD(dh[one + k]);                                        \
            T total = dcn[one + k] + dhk * o * (1 - tk * tk);                                 \
            zi[k] = ST(total * g * i * (1 - i));                                              \
            zf[k] = ST(total * c[one + k] * f * (1 - f));                                     \
            zg[k] = ST(total * i * (1 - g * g));                                              \
            zo[k] = ST(dhk * tk * o * (1 - o));                                               \
            dc[one + k] = total * f;                                                          \
        }                                                                                     \
    }                                                                                         \
}

ACTIVATIONS(float, f32)
ACTIVATIONS(double, f64)
DEFINE_FORWARD(float, f32, float, f32, PLAIN, float, PLAIN)
DEFINE_FORWARD(double, f64, double, f64, PLAIN, double, PLAIN)
DEFINE_BACKWARD(float, float, f32, PLAIN, float, PLAIN)
DEFINE_BACKWARD(double, double, f64, PLAIN, double, PLAIN)
/* bf16 pre-activations (autocast's convolution output) with a float32 memory: the
   arithmetic, the saved activations, h' and c' in float32, the gradient dz in bf16 */
DEFINE_FORWARD(float, f32, uint16_t, bf16, bf16_load, float, PLAIN)
DEFINE_BACKWARD(float, uint16_t, bf16, bf16_store, float, PLAIN)
/* the same with h' in bf16 (low_precision_h), and so its gradient dh */
DEFINE_FORWARD(float, f32, uint16_t, bf16h, bf16_load, uint16_t, bf16_store)
DEFINE_BACKWARD(float, uint16_t, bf16h, bf16_store, uint16_t, bf16_load)
