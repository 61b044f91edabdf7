/* Winograd F(4x4, 3x3) and F(2x2, 5x5) tile transforms for convlstm/winograd.py, one pass
   each.

   In PyTorch each transform is two small matrix products plus the copies that cut out the
   tiles and put them back; here each runs in one pass over its tensors. Layouts are dense
   with the channels innermost: images are NHWC (n, h, w, c); the Winograd domain is
   (36, tiles, c) with the tiles in (image, tile row, tile column) order. With output tiles
   of m x m (m = 4 for 3x3 filters, 2 for 5x5) and pad = (6 - m) / 2, tile t covers image
   rows m ty - pad .. m ty - pad + 5 and the same columns from m tx - pad (zero outside the
   image), and yields output rows m ty .. m ty + m - 1, columns m tx .. m tx + m - 1.

   One thread: on a 2-core CPU, OpenMP over the channels made a training step slower than
   leaving the second core to PyTorch (mmnist-cpu-small, 1.48-1.50x eager against
   1.52-1.59x). Each function returns 0, 1 when its scratch could not be allocated, or 2
   for an m other than 2 or 4.

   The 1-D transforms, the matrices of Lavin and Gray (2016) with points 0, 1, -1, 2, -2
   (and infinity); both filter sizes share the input transform:
     B^T (6x6): the input tile's           A^T (m x 6): the products' back to outputs
     B (6x6):   B^T's transpose            A (6 x m):   A^T's transpose
   Each one combines its input vectors (pointers, so that rows outside the image can point
   at a zero vector and outputs outside it at a scratch sink) over the channel range. The
   output vectors of one call never overlap each other or the inputs, which GCC is told
   with "ivdep" (it does not trust the restrict-qualified locals): without it, GCC vectorised
   a third of the loops, and the transforms took 2-2.5x as long. */

#include <stdlib.h>
#include <string.h>

/* The tiling for an output tile of m x m (4: F(4x4, 3x3); 2: F(2x2, 5x5)); the input tile
   is always 6 x 6 and starts pad = (6 - m) / 2 rows and columns before its output tile.
   Any other m returns 2. */
#define TILING                                                                                 \
    if (m != 2 && m != 4) return 2;                                                            \
    long th = (h + m - 1) / m, tw = (w + m - 1) / m, tiles = n * th * tw;

#define DEFINE_KERNELS(T, S)                                                                   \
                                                                                               \
static inline void bt_##S(T *const *o, const T *const *in, long c) {                           \
    const T *restrict i0 = in[0], *restrict i1 = in[1], *restrict i2 = in[2];                  \
    const T *restrict i3 = in[3], *restrict i4 = in[4], *restrict i5 = in[5];                  \
    T *restrict o0 = o[0], *restrict o1 = o[1], *restrict o2 = o[2];                           \
    T *restrict o3 = o[3], *restrict o4 = o[4], *restrict o5 = o[5];                           \
    _Pragma("GCC ivdep") for (long k = 0; k < c; k++) {                                        \
        T d0 = i0[k], d1 = i1[k], d2 = i2[k], d3 = i3[k], d4 = i4[k], d5 = i5[k];              \
        T r0 = 4 * d0 - 5 * d2 + d4, r1 = d3 + d4 - 4 * (d1 + d2);                             \
        T r2 = 4 * (d1 - d2) + d4 - d3, r3 = 2 * (d3 - d1) + d4 - d2;                          \
        T r4 = 2 * (d1 - d3) + d4 - d2, r5 = 4 * d1 - 5 * d3 + d5;                             \
        o0[k] = r0; o1[k] = r1; o2[k] = r2; o3[k] = r3; o4[k] = r4; o5[k] = r5;                \
    }                                                                                          \
}                                                                                              \
                                                                                               \
static inline void b_##S(T *const *o, const T *const *in, long c, int add) {                   \
    const T *restrict i0 = in[0], *restrict i1 = in[1], *restrict i2 = in[2];                  \
    const T *restrict i3 = in[3], *restrict i4 = in[4], *restrict i5 = in[5];                  \
    T *restrict o0 = o[0], *restrict o1 = o[1], *restrict o2 = o[2];                           \
    T *restrict o3 = o[3], *restrict o4 = o[4], *restrict o5 = o[5];                           \
    _Pragma("GCC ivdep") for (long k = 0; k < c; k++) {                                        \
        T u0 = i0[k], u1 = i1[k], u2 = i2[k], u3 = i3[k], u4 = i4[k], u5 = i5[k];              \
        T r0 = 4 * u0, r1 = 4 * (u2 - u1) + 2 * (u4 - u3) + 4 * u5;                            \
        T r2 = -5 * u0 - 4 * (u1 + u2) - u3 - u4, r3 = u1 - u2 + 2 * (u3 - u4) - 5 * u5;       \
        T r4 = u0 + u1 + u2 + u3 + u4, r5 = u5;                                                \
        if (add) {                                                                             \
            o0[k] += r0; o1[k] += r1; o2[k] += r2; o3[k] += r3; o4[k] += r4; o5[k] += r5;      \
        } else {                                                                               \
            o0[k] = r0; o1[k] = r1; o2[k] = r2; o3[k] = r3; o4[k] = r4; o5[k] = r5;            \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
static inline void at4_##S(T *const *o, const T *const *in, long c) {                          \
    const T *restrict i0 = in[0], *restrict i1 = in[1], *restrict i2 = in[2];                  \
    const T *restrict i3 = in[3], *restrict i4 = in[4], *restrict i5 = in[5];                  \
    T *restrict o0 = o[0], *restrict o1 = o[1], *restrict o2 = o[2], *restrict o3 = o[3];      \
    _Pragma("GCC ivdep") for (long k = 0; k < c; k++) {                                        \
        T s = i1[k] + i2[k], d = i1[k] - i2[k], s2 = i3[k] + i4[k], d2 = i3[k] - i4[k];        \
        o0[k] = i0[k] + s + s2; o1[k] = d + 2 * d2; o2[k] = s + 4 * s2;                        \
        o3[k] = d + 8 * d2 + i5[k];                                                            \
    }                                                                                          \
}                                                                                              \
                                                                                               \
static inline void a4_##S(T *const *o, const T *const *in, long c) {                           \
    const T *restrict i0 = in[0], *restrict i1 = in[1], *restrict i2 = in[2];                  \
    const T *restrict i3 = in[3];                                                              \
    T *restrict o0 = o[0], *restrict o1 = o[1], *restrict o2 = o[2];                           \
    T *restrict o3 = o[3], *restrict o4 = o[4], *restrict o5 = o[5];                           \
    _Pragma("GCC ivdep") for (long k = 0; k < c; k++) {                                        \
        T g0 = i0[k], g1 = i1[k], g2 = i2[k], g3 = i3[k];                                      \
        T s = g0 + g2, d = g1 + g3, s4 = g0 + 4 * g2, d2 = 2 * g1 + 8 * g3;                    \
        o0[k] = g0; o1[k] = s + d; o2[k] = s - d; o3[k] = s4 + d2; o4[k] = s4 - d2; o5[k] = g3;\
    }                                                                                          \
}                                                                                              \
                                                                                               \
/* F(2, 5): A^T (2x6) = the first row of F(4, 3)'s and 0, 1, -1, 2, -2, 1; A its transpose */ \
static inline void at2_##S(T *const *o, const T *const *in, long c) {                          \
    const T *restrict i0 = in[0], *restrict i1 = in[1], *restrict i2 = in[2];                  \
    const T *restrict i3 = in[3], *restrict i4 = in[4], *restrict i5 = in[5];                  \
    T *restrict o0 = o[0], *restrict o1 = o[1];                                                \
    _Pragma("GCC ivdep") for (long k = 0; k < c; k++) {                                        \
        o0[k] = i0[k] + i1[k] + i2[k] + i3[k] + i4[k];                                         \
        o1[k] = i1[k] - i2[k] + 2 * (i3[k] - i4[k]) + i5[k];                                   \
    }                                                                                          \
}                                                                                              \
                                                                                               \
static inline void a2_##S(T *const *o, const T *const *in, long c) {                           \
    const T *restrict i0 = in[0], *restrict i1 = in[1];                                        \
    T *restrict o0 = o[0], *restrict o1 = o[1], *restrict o2 = o[2];                           \
    T *restrict o3 = o[3], *restrict o4 = o[4], *restrict o5 = o[5];                           \
    _Pragma("GCC ivdep") for (long k = 0; k < c; k++) {                                        \
        T g0 = i0[k], g1 = i1[k];                                                              \
        o0[k] = g0; o1[k] = g0 + g1; o2[k] = g0 - g1; o3[k] = g0 + 2 * g1;                     \
        o4[k] = g0 - 2 * g1; o5[k] = g1;                                                       \
    }                                                                                          \
}                                                                                              \
                                                                                               \
static inline void at_##S(T *const *o, const T *const *in, long c, long m) {                   \
    if (m == 4) at4_##S(o, in, c); else at2_##S(o, in, c);                                     \
}                                                                                              \
                                                                                               \
static inline void a_##S(T *const *o, const T *const *in, long c, long m) {                    \
    if (m == 4) a4_##S(o, in, c); else a2_##S(o, in, c);                                       \
}                                                                                              \
                                                                                               \
/* x NHWC -> u (36, tiles, c) = B^T d B for each 6x6 tile d */                                 \
int input_tiles_##S(const T *x, T *u, long n, long h, long w, long c, long m) {                \
    TILING                                                                                     \
    long pad = (6 - m) / 2;                                                                    \
    T *r = malloc(sizeof(T) * 37 * (c + 1)), *zero = r + 36 * c;                               \
    if (!r) return 1;                                                                          \
    memset(zero, 0, sizeof(T) * c);                                                            \
    for (long t = 0; t < tiles; t++) {                                                         \
        long img = t / (th * tw), y0 = m * ((t / tw) % th) - pad, x0 = m * (t % tw) - pad;     \
        for (int q = 0; q < 6; q++) { /* down column q: r[p][q] = sum_k B^T[p][k] d[k][q] */   \
            const T *in[6]; T *o[6];                                                           \
            long xx = x0 + q;                                                                  \
            for (int p = 0; p < 6; p++) {                                                      \
                long yy = y0 + p;                                                              \
                int outside = yy < 0 || yy >= h || xx < 0 || xx >= w;                          \
                in[p] = outside ? zero : x + ((img * h + yy) * w + xx) * c;                    \
                o[p] = r + (6 * p + q) * c;                                                    \
            }                                                                                  \
            bt_##S(o, in, c);                                                                  \
        }                                                                                      \
        for (int p = 0; p < 6; p++) { /* along row p, into u[6p + q] */                        \
            const T *in[6]; T *o[6];                                                           \
            for (int q = 0; q < 6; q++) {                                                      \
                in[q] = r + (6 * p + q) * c;                                                   \
                o[q] = u + ((6 * p + q) * tiles + t) * c;                                      \
            }                                                                                  \
            bt_##S(o, in, c);                                                                  \
        }                                                                                      \
    }                                                                                          \
    free(r);                                                                                   \
    return 0;                                                                                  \
}                                                                                              \
                                                                                               \
/* products v (36, tiles, c) -> y NHWC = A^T v A for each tile, cut to the image */            \
int output_from_##S(const T *v, T *y, long n, long h, long w, long c, long m) {                \
    TILING                                                                                     \
    T *r = malloc(sizeof(T) * 28 * (c + 1)), *sink = r + 24 * c;                               \
    if (!r) return 1;                                                                          \
    for (long t = 0; t < tiles; t++) {                                                         \
        long img = t / (th * tw), y0 = m * ((t / tw) % th), x0 = m * (t % tw);                 \
        for (int q = 0; q < 6; q++) { /* r[i][q] = sum_p A^T[i][p] v[6p + q] */                \
            const T *in[6]; T *o[4];                                                           \
            for (int p = 0; p < 6; p++) in[p] = v + ((6 * p + q) * tiles + t) * c;             \
            for (int i = 0; i < m; i++) o[i] = r + (6 * i + q) * c;                            \
            at_##S(o, in, c, m);                                                               \
        }                                                                                      \
        for (int i = 0; i < m; i++) { /* along row i, into the image (or the sink) */          \
            const T *in[6]; T *o[4];                                                           \
            long yy = y0 + i;                                                                  \
            for (int q = 0; q < 6; q++) in[q] = r + (6 * i + q) * c;                           \
            for (int j = 0; j < m; j++) {                                                      \
                long xx = x0 + j;                                                              \
                o[j] = yy < h && xx < w ? y + ((img * h + yy) * w + xx) * c : sink + j * c;    \
            }                                                                                  \
            at_##S(o, in, c, m);                                                               \
        }                                                                                      \
    }                                                                                          \
    free(r);                                                                                   \
    return 0;                                                                                  \
}                                                                                              \
                                                                                               \
/* dL/dy NHWC -> dL/dv (36, tiles, c) = A g A^T for each m x m output tile g (zero outside     \
   the image): output_from's transpose */                                                      \
int grad_tiles_##S(const T *g, T *dv, long n, long h, long w, long c, long m) {                \
    TILING                                                                                     \
    T *r = malloc(sizeof(T) * 25 * (c + 1)), *zero = r + 24 * c;                               \
    if (!r) return 1;                                                                          \
    memset(zero, 0, sizeof(T) * c);                                                            \
    for (long t = 0; t < tiles; t++) {                                                         \
        long img = t / (th * tw), y0 = m * ((t / tw) % th), x0 = m * (t % tw);                 \
        for (int j = 0; j < m; j++) { /* down column j: r[p][j] = sum_i A[p][i] g[i][j] */     \
            const T *in[4]; T *o[6];                                                           \
            long xx = x0 + j;                                                                  \
            for (int i = 0; i < m; i++) {                                                      \
                long yy = y0 + i;                                                              \
                in[i] = yy < h && xx < w ? g + ((img * h + yy) * w + xx) * c : zero;           \
            }                                                                                  \
            for (int p = 0; p < 6; p++) o[p] = r + (4 * p + j) * c;                            \
            a_##S(o, in, c, m);                                                                \
        }                                                                                      \
        for (int p = 0; p < 6; p++) { /* along row p, into dv[6p + q] */                       \
            const T *in[4]; T *o[6];                                                           \
            for (int j = 0; j < m; j++) in[j] = r + (4 * p + j) * c;                           \
            for (int q = 0; q < 6; q++) o[q] = dv + ((6 * p + q) * tiles + t) * c;             \
            a_##S(o, in, c, m);                                                                \
        }                                                                                      \
    }                                                                                          \
    free(r);                                                                                   \
    return 0;                                                                                  \
}                                                                                              \
                                                                                               \
/* dL/du (36, tiles, c) -> dL/dx NHWC: B du B^T for each tile, overlapping tiles summed        \
   and the padding dropped: input_tiles' transpose */                                          \
int input_grad_##S(const T *du, T *dx, long n, long h, long w, long c, long m) {               \
    TILING                                                                                     \
    long pad = (6 - m) / 2;                                                                    \
    T *r = malloc(sizeof(T) * 42 * (c + 1)), *sink = r + 36 * c;                               \
    if (!r) return 1;                                                                          \
    memset(sink, 0, sizeof(T) * 6 * c);                                                        \
    memset(dx, 0, sizeof(T) * n * h * w * c);                                                  \
    for (long t = 0; t < tiles; t++) {                                                         \
        long img = t / (th * tw), y0 = m * ((t / tw) % th) - pad, x0 = m * (t % tw) - pad;     \
        for (int q = 0; q < 6; q++) { /* down column q: r[p][q] = sum_k B[p][k] du[6k + q] */  \
            const T *in[6]; T *o[6];                                                           \
            for (int k = 0; k < 6; k++) {                                                      \
                in[k] = du + ((6 * k + q) * tiles + t) * c;                                    \
                o[k] = r + (6 * k + q) * c;                                                    \
            }                                                                                  \
            b_##S(o, in, c, 0);                                                                \
        }                                                                                      \
        for (int p = 0; p < 6; p++) { /* along row p, added into dx (or the sink) */           \
            const T *in[6]; T *o[6];                                                           \
            long yy = y0 + p;                                                                  \
            for (int q = 0; q < 6; q++) {                                                      \
                long xx = x0 + q;                                                              \
                int outside = yy < 0 || yy >= h || xx < 0 || xx >= w;                          \
                in[q] = r + (6 * p + q) * c;                                                   \
                o[q] = outside ? sink + q * c : dx + ((img * h + yy) * w + xx) * c;            \
            }                                                                                  \
            b_##S(o, in, c, 1);                                                                \
        }                                                                                      \
    }                                                                                          \
    free(r);                                                                                   \
    return 0;                                                                                  \
}

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)
