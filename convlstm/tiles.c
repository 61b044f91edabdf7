/* Winograd F(4x4, 3x3) and F(4x4, 5x5) tile transforms for convlstm/winograd.py, one pass
   each.

   In PyTorch each transform is two small matrix products plus the copies that cut out the
   tiles and put them back; here each runs in one pass over its tensors. Layouts are dense
   with the channels innermost: images are NHWC (n, h, w, c); the Winograd domain is
   (a * a, tiles, c) with the tiles in (image, tile row, tile column) order. Input tiles are
   a x a (a = 6 for 3x3 filters, 8 for 5x5), output tiles 4 x 4, and pad = (a - 4) / 2: tile
   t covers image rows 4 ty - pad .. 4 ty - pad + a - 1 and the same columns from 4 tx - pad
   (zero outside the image), and yields output rows 4 ty .. 4 ty + 3, columns 4 tx .. 4 tx + 3.

   Threads: the tiles are split between OpenMP threads, PyTorch's own (convlstm.native links
   this file against the runtime PyTorch loaded), each with its own scratch; input_grad,
   whose overlapping tiles add into the same pixels, splits the images instead. Every output
   is computed by one thread in one order: the same bits for any thread count. On a 2-core
   AVX-512 Xeon this made training steps 1.10x (mmnist-cpu-small, batch 8) to 1.14x (batch
   16) and 1.08x (ConvLSTM-S, batch 2) faster. (An earlier try, OpenMP over the channels of
   each tile with a runtime of its own, made them slower.) Each function returns 0, 1 when
   a scratch could not be allocated, or 2 for a tile size other than 6 or 8.

   The 1-D transforms, the matrices of Lavin and Gray (2016) with points 0, 1, -1, 2, -2
   (a = 6) and also 1/2, -1/2 (a = 8), and infinity, written out with their even and odd
   halves shared (the matrices themselves: convlstm/winograd.py, made from the points):
     B^T (a x a): the input tile's         A^T (4 x a): the products' back to outputs
     B (a x a):   B^T's transpose          A (a x 4):   A^T's transpose
   Each one combines its input vectors (pointers, so that rows outside the image can point
   at a zero vector and outputs outside it at a scratch sink) over the channel range. The
   output vectors of one call never overlap each other or the inputs, which GCC is told
   with "ivdep" (it does not trust the restrict-qualified locals): without it, GCC vectorised
   a third of the loops, and the transforms took 2-2.5x as long. */

#include <stdlib.h>
#include <string.h>

#define M 4 /* output tile */

/* Calls that touch at least 2^16 tile elements run on all threads (see the note above);
   smaller ones stay on the calling thread, where a fork would cost more than it saves.
   Without OpenMP the pragmas are ignored. */
#define PRAGMA(x) _Pragma(#x)
#define PARALLEL(work) PRAGMA(omp parallel if ((work) >= 65536) reduction(|:failed))
#define FOR_TILES _Pragma("omp for schedule(static)") for (long t = 0; t < tiles; t++)

/* The tiling for input tiles of a x a; any other a than 6 or 8 returns 2. */
#define TILING                                                                                 \
    if (a != 6 && a != 8) return 2;                                                            \
    long th = (h + M - 1) / M, tw = (w + M - 1) / M, tiles = n * th * tw;

#define IN6(T)                                                                                 \
    const T *restrict i0 = in[0], *restrict i1 = in[1], *restrict i2 = in[2];                  \
    const T *restrict i3 = in[3], *restrict i4 = in[4], *restrict i5 = in[5];
#define IN8(T) IN6(T) const T *restrict i6 = in[6], *restrict i7 = in[7];
#define OUT4(T)                                                                                \
    T *restrict o0 = o[0], *restrict o1 = o[1], *restrict o2 = o[2], *restrict o3 = o[3];
#define OUT6(T) OUT4(T) T *restrict o4 = o[4], *restrict o5 = o[5];
#define OUT8(T) OUT6(T) T *restrict o6 = o[6], *restrict o7 = o[7];
#define LOOP _Pragma("GCC ivdep") for (long k = 0; k < c; k++)
#define STORE6                                                                                 \
    if (add) {                                                                                 \
        o0[k] += r0; o1[k] += r1; o2[k] += r2; o3[k] += r3; o4[k] += r4; o5[k] += r5;          \
    } else {                                                                                   \
        o0[k] = r0; o1[k] = r1; o2[k] = r2; o3[k] = r3; o4[k] = r4; o5[k] = r5;                \
    }
#define STORE8                                                                                 \
    if (add) {                                                                                 \
        o0[k] += r0; o1[k] += r1; o2[k] += r2; o3[k] += r3;                                    \
        o4[k] += r4; o5[k] += r5; o6[k] += r6; o7[k] += r7;                                    \
    } else {                                                                                   \
        o0[k] = r0; o1[k] = r1; o2[k] = r2; o3[k] = r3;                                        \
        o4[k] = r4; o5[k] = r5; o6[k] = r6; o7[k] = r7;                                        \
    }

#define DEFINE_KERNELS(T, S)                                                                   \
static inline void bt6_##S(T *const *o, const T *const *in, long c) {                          \
    IN6(T) OUT6(T)                                                                             \
    LOOP {                                                                                     \
        T d0 = i0[k], d1 = i1[k], d2 = i2[k], d3 = i3[k], d4 = i4[k], d5 = i5[k];              \
        T r0 = 4 * d0 - 5 * d2 + d4, r1 = d3 + d4 - 4 * (d1 + d2);                             \
        T r2 = 4 * (d1 - d2) + d4 - d3, r3 = 2 * (d3 - d1) + d4 - d2;                          \
        T r4 = 2 * (d1 - d3) + d4 - d2, r5 = 4 * d1 - 5 * d3 + d5;                             \
        o0[k] = r0; o1[k] = r1; o2[k] = r2; o3[k] = r3; o4[k] = r4; o5[k] = r5;                \
    }                                                                                          \
}                                                                                              \
                                                                                               \
static inline void bt8_##S(T *const *o, const T *const *in, long c) {                          \
    IN8(T) OUT8(T)                                                                             \
    LOOP {                                                                                     \
        T d0 = i0[k], d1 = i1[k], d2 = i2[k], d3 = i3[k];                                      \
        T d4 = i4[k], d5 = i5[k], d6 = i6[k], d7 = i7[k];                                      \
        T e1 = d2 + d6 - (T)4.25 * d4, f1 = d1 + d5 - (T)4.25 * d3;                            \
        T e3 = (T)0.25 * d2 - (T)1.25 * d4 + d6, f3 = (T)0.5 * d1 - (T)2.5 * d3 + 2 * d5;      \
        T e5 = 4 * d2 - 5 * d4 + d6, f5 = 2 * d1 - (T)2.5 * d3 + (T)0.5 * d5;                  \
        T r0 = d6 - d0 + (T)5.25 * (d2 - d4), r7 = d7 - d1 + (T)5.25 * (d3 - d5);              \
        T r1 = e1 + f1, r2 = e1 - f1, r3 = e3 + f3, r4 = e3 - f3, r5 = e5 + f5, r6 = e5 - f5;  \
        o0[k] = r0; o1[k] = r1; o2[k] = r2; o3[k] = r3;                                        \
        o4[k] = r4; o5[k] = r5; o6[k] = r6; o7[k] = r7;                                        \
    }                                                                                          \
}                                                                                              \
                                                                                               \
static inline void b6_##S(T *const *o, const T *const *in, long c, int add) {                  \
    IN6(T) OUT6(T)                                                                             \
    LOOP {                                                                                     \
        T u0 = i0[k], u1 = i1[k], u2 = i2[k], u3 = i3[k], u4 = i4[k], u5 = i5[k];              \
        T r0 = 4 * u0, r1 = 4 * (u2 - u1) + 2 * (u4 - u3) + 4 * u5;                            \
        T r2 = -5 * u0 - 4 * (u1 + u2) - u3 - u4, r3 = u1 - u2 + 2 * (u3 - u4) - 5 * u5;       \
        T r4 = u0 + u1 + u2 + u3 + u4, r5 = u5;                                                \
        STORE6                                                                                 \
    }                                                                                          \
}                                                                                              \
                                                                                               \
static inline void b8_##S(T *const *o, const T *const *in, long c, int add) {                  \
    IN8(T) OUT8(T)                                                                             \
    LOOP {                                                                                     \
        T u0 = i0[k], u7 = i7[k];                                                              \
        T s1 = i1[k] + i2[k], d1 = i1[k] - i2[k], s3 = i3[k] + i4[k], d3 = i3[k] - i4[k];      \
        T s5 = i5[k] + i6[k], d5 = i5[k] - i6[k];                                              \
        T r0 = -u0, r1 = d1 + (T)0.5 * d3 + 2 * d5 - u7;                                       \
        T r2 = (T)5.25 * u0 + s1 + (T)0.25 * s3 + 4 * s5;                                      \
        T r3 = (T)5.25 * u7 - (T)4.25 * d1 - (T)2.5 * (d3 + d5);                               \
        T r4 = -(T)5.25 * u0 - (T)4.25 * s1 - (T)1.25 * s3 - 5 * s5;                           \
        T r5 = d1 + 2 * d3 + (T)0.5 * d5 - (T)5.25 * u7;                                       \
        T r6 = u0 + s1 + s3 + s5, r7 = u7;                                                     \
        STORE8                                                                                 \
    }                                                                                          \
}                                                                                              \
                                                                                               \
static inline void at6_##S(T *const *o, const T *const *in, long c, const T *bias) {         \
    IN6(T) OUT4(T) const T *restrict bs = bias;                                                \
    LOOP {                                                                                     \
        T s = i1[k] + i2[k], d = i1[k] - i2[k], s2 = i3[k] + i4[k], d2 = i3[k] - i4[k];        \
        o0[k] = i0[k] + s + s2 + bs[k]; o1[k] = d + 2 * d2 + bs[k];                            \
        o2[k] = s + 4 * s2 + bs[k]; o3[k] = d + 8 * d2 + i5[k] + bs[k];                        \
    }                                                                                          \
}                                                                                              \
                                                                                               \
static inline void at8_##S(T *const *o, const T *const *in, long c, const T *bias) {         \
    IN8(T) OUT4(T) const T *restrict bs = bias;                                                \
    LOOP {                                                                                     \
        T s = i1[k] + i2[k], d = i1[k] - i2[k], s2 = i3[k] + i4[k], d2 = i3[k] - i4[k];        \
        T sh = i5[k] + i6[k], dh = i5[k] - i6[k];                                              \
        o0[k] = i0[k] + s + s2 + sh + bs[k]; o1[k] = d + 2 * d2 + (T)0.5 * dh + bs[k];         \
        o2[k] = s + 4 * s2 + (T)0.25 * sh + bs[k];                                             \
        o3[k] = d + 8 * d2 + (T)0.125 * dh + i7[k] + bs[k];                                    \
    }                                                                                          \
}                                                                                              \
                                                                                               \
static inline void a6_##S(T *const *o, const T *const *in, long c) {                           \
    const T *restrict i0 = in[0], *restrict i1 = in[1], *restrict i2 = in[2];                  \
    const T *restrict i3 = in[3];                                                              \
    OUT6(T)                                                                                    \
    LOOP {                                                                                     \
        T g0 = i0[k], g1 = i1[k], g2 = i2[k], g3 = i3[k];                                      \
        T s = g0 + g2, d = g1 + g3, s4 = g0 + 4 * g2, d2 = 2 * g1 + 8 * g3;                    \
        o0[k] = g0; o1[k] = s + d; o2[k] = s - d;                                              \
        o3[k] = s4 + d2; o4[k] = s4 - d2; o5[k] = g3;                                          \
    }                                                                                          \
}                                                                                              \
                                                                                               \
static inline void a8_##S(T *const *o, const T *const *in, long c) {                           \
    const T *restrict i0 = in[0], *restrict i1 = in[1], *restrict i2 = in[2];                  \
    const T *restrict i3 = in[3];                                                              \
    OUT8(T)                                                                                    \
    LOOP {                                                                                     \
        T g0 = i0[k], g1 = i1[k], g2 = i2[k], g3 = i3[k];                                      \
        T s = g0 + g2, d = g1 + g3, s4 = g0 + 4 * g2, d2 = 2 * g1 + 8 * g3;                    \
        T sh = g0 + (T)0.25 * g2, dh = (T)0.5 * g1 + (T)0.125 * g3;                            \
        o0[k] = g0; o1[k] = s + d; o2[k] = s - d; o3[k] = s4 + d2;                             \
        o4[k] = s4 - d2; o5[k] = sh + dh; o6[k] = sh - dh; o7[k] = g3;                         \
    }                                                                                          \
}                                                                                              \
                                                                                               \
static inline void bt_##S(T *const *o, const T *const *in, long c, long a) {                   \
    if (a == 6) bt6_##S(o, in, c); else bt8_##S(o, in, c);                                     \
}                                                                                              \
                                                                                               \
static inline void b_##S(T *const *o, const T *const *in, long c, int add, long a) {           \
    if (a == 6) b6_##S(o, in, c, add); else b8_##S(o, in, c, add);                             \
}                                                                                              \
                                                                                               \
static inline void at_##S(T *const *o, const T *const *in, long c, long a, const T *bias) {    \
    if (a == 6) at6_##S(o, in, c, bias); else at8_##S(o, in, c, bias);                         \
}                                                                                              \
                                                                                               \
static inline void a_##S(T *const *o, const T *const *in, long c, long a) {                    \
    if (a == 6) a6_##S(o, in, c); else a8_##S(o, in, c);                                       \
}                                                                                              \
                                                                                               \
/* x NHWC -> u (a * a, tiles, c) = B^T d B for each a x a tile d */                            \
int input_tiles_##S(const T *x, T *u, long n, long h, long w, long c, long a) {                \
    TILING                                                                                     \
    long pad = (a - M) / 2;                                                                    \
    int failed = 0;                                                                            \
    PARALLEL(tiles * a * a * c)                                                                \
    {                                                                                          \
        T *r = malloc(sizeof(T) * (a * a + 1) * (c + 1)), *zero = r + a * a * c;               \
        failed |= !r;                                                                          \
        if (r) memset(zero, 0, sizeof(T) * c);                                                 \
        FOR_TILES if (r) {                                                                     \
            long img = t / (th * tw), y0 = M * ((t / tw) % th) - pad;                          \
            long x0 = M * (t % tw) - pad;                                                      \
            for (int q = 0; q < a; q++) { /* down column q: r[p][q] = sum_k B^T[p][k] d[k][q] */ \
                const T *in[8]; T *o[8];                                                       \
                long xx = x0 + q;                                                              \
                for (int p = 0; p < a; p++) {                                                  \
                    long yy = y0 + p;                                                          \
                    int outside = yy < 0 || yy >= h || xx < 0 || xx >= w;                      \
                    in[p] = outside ? zero : x + ((img * h + yy) * w + xx) * c;                \
                    o[p] = r + (a * p + q) * c;                                                \
                }                                                                              \
                bt_##S(o, in, c, a);                                                           \
            }                                                                                  \
            for (int p = 0; p < a; p++) { /* along row p, into u[a p + q] */                   \
                const T *in[8]; T *o[8];                                                       \
                for (int q = 0; q < a; q++) {                                                  \
                    in[q] = r + (a * p + q) * c;                                               \
                    o[q] = u + ((a * p + q) * tiles + t) * c;                                  \
                }                                                                              \
                bt_##S(o, in, c, a);                                                           \
            }                                                                                  \
        }                                                                                      \
        free(r);                                                                               \
    }                                                                                          \
    return failed;                                                                             \
}                                                                                              \
                                                                                               \
/* products v (a * a, tiles, c) -> y NHWC = A^T v A (+ bias, c values, unless NULL) for each  \
   tile, cut to the image */                                                                   \
int output_from_##S(const T *v, T *y, long n, long h, long w, long c, long a, const T *bias) {  \
    TILING                                                                                     \
    int failed = 0;                                                                            \
    PARALLEL(tiles * a * a * c)                                                                \
    {                                                                                          \
        T *r = malloc(sizeof(T) * (M * a + M + 1) * (c + 1)), *sink = r + M * a * c;           \
        T *zero = sink + M * c;                                                                \
        failed |= !r;                                                                          \
        if (r) memset(zero, 0, sizeof(T) * c);                                                 \
        const T *shift = bias ? bias : zero;                                                   \
        FOR_TILES if (r) {                                                                     \
            long img = t / (th * tw), y0 = M * ((t / tw) % th), x0 = M * (t % tw);             \
            for (int q = 0; q < a; q++) { /* r[i][q] = sum_p A^T[i][p] v[a p + q] */           \
                const T *in[8]; T *o[M];                                                       \
                for (int p = 0; p < a; p++) in[p] = v + ((a * p + q) * tiles + t) * c;         \
                for (int i = 0; i < M; i++) o[i] = r + (a * i + q) * c;                        \
                at_##S(o, in, c, a, zero);                                                     \
            }                                                                                  \
            for (int i = 0; i < M; i++) { /* along row i, into the image (or the sink) */      \
                const T *in[8]; T *o[M];                                                       \
                long yy = y0 + i;                                                              \
                for (int q = 0; q < a; q++) in[q] = r + (a * i + q) * c;                       \
                for (int j = 0; j < M; j++) {                                                  \
                    long xx = x0 + j;                                                          \
                    o[j] = yy < h && xx < w ? y + ((img * h + yy) * w + xx) * c : sink + j * c; \
                }                                                                              \
                at_##S(o, in, c, a, shift);                                                    \
            }                                                                                  \
        }                                                                                      \
        free(r);                                                                               \
    }                                                                                          \
    return failed;                                                                             \
}                                                                                              \
                                                                                               \
/* dL/dy NHWC -> dL/dv (a * a, tiles, c) = A g A^T for each 4 x 4 output tile g (zero          \
   outside the image): output_from's transpose */                                              \
int grad_tiles_##S(const T *g, T *dv, long n, long h, long w, long c, long a) {                \
    TILING                                                                                     \
    int failed = 0;                                                                            \
    PARALLEL(tiles * a * a * c)                                                                \
    {                                                                                          \
        T *r = malloc(sizeof(T) * (a * M + 1) * (c + 1)), *zero = r + a * M * c;               \
        failed |= !r;                                                                          \
        if (r) memset(zero, 0, sizeof(T) * c);                                                 \
        FOR_TILES if (r) {                                                                     \
            long img = t / (th * tw), y0 = M * ((t / tw) % th), x0 = M * (t % tw);             \
            for (int j = 0; j < M; j++) { /* down column j: r[p][j] = sum_i A[p][i] g[i][j] */ \
                const T *in[M]; T *o[8];                                                       \
                long xx = x0 + j;                                                              \
                for (int i = 0; i < M; i++) {                                                  \
                    long yy = y0 + i;                                                          \
                    in[i] = yy < h && xx < w ? g + ((img * h + yy) * w + xx) * c : zero;       \
                }                                                                              \
                for (int p = 0; p < a; p++) o[p] = r + (M * p + j) * c;                        \
                a_##S(o, in, c, a);                                                            \
            }                                                                                  \
            for (int p = 0; p < a; p++) { /* along row p, into dv[a p + q] */                  \
                const T *in[M]; T *o[8];                                                       \
                for (int j = 0; j < M; j++) in[j] = r + (M * p + j) * c;                       \
                for (int q = 0; q < a; q++) o[q] = dv + ((a * p + q) * tiles + t) * c;         \
                a_##S(o, in, c, a);                                                            \
            }                                                                                  \
        }                                                                                      \
        free(r);                                                                               \
    }                                                                                          \
    return failed;                                                                             \
}                                                                                              \
                                                                                               \
/* dL/du (a * a, tiles, c) -> dL/dx NHWC: B du B^T for each tile, overlapping tiles summed     \
   and the padding dropped: input_tiles' transpose. Overlapping tiles are of one image: the    \
   threads split the images. */                                                                \
int input_grad_##S(const T *du, T *dx, long n, long h, long w, long c, long a) {               \
    TILING                                                                                     \
    long pad = (a - M) / 2, per_image = th * tw;                                               \
    int failed = 0;                                                                            \
    PARALLEL(n > 1 ? tiles * a * a * c : 0)                                                    \
    {                                                                                          \
        T *r = malloc(sizeof(T) * (a * a + a) * (c + 1)), *sink = r + a * a * c;               \
        failed |= !r;                                                                          \
        if (r) memset(sink, 0, sizeof(T) * a * c);                                             \
        _Pragma("omp for schedule(static)")                                                    \
        for (long img = 0; img < n; img++) if (r) {                                            \
            memset(dx + img * h * w * c, 0, sizeof(T) * h * w * c);                            \
            for (long t = img * per_image; t < (img + 1) * per_image; t++) {                   \
                long y0 = M * ((t / tw) % th) - pad, x0 = M * (t % tw) - pad;                  \
                for (int q = 0; q < a; q++) { /* down column q: r[p][q] = sum_k B[p][k] du[a k + q] */ \
                    const T *in[8]; T *o[8];                                                   \
                    for (int k = 0; k < a; k++) {                                              \
                        in[k] = du + ((a * k + q) * tiles + t) * c;                            \
                        o[k] = r + (a * k + q) * c;                                            \
                    }                                                                          \
                    b_##S(o, in, c, 0, a);                                                     \
                }                                                                              \
                for (int p = 0; p < a; p++) { /* along row p, added into dx (or the sink) */   \
                    const T *in[8]; T *o[8];                                                   \
                    long yy = y0 + p;                                                          \
                    for (int q = 0; q < a; q++) {                                              \
                        long xx = x0 + q;                                                      \
                        int outside = yy < 0 || yy >= h || xx < 0 || xx >= w;                  \
                        in[q] = r + (a * p + q) * c;                                           \
                        o[q] = outside ? sink + q * c : dx + ((img * h + yy) * w + xx) * c;    \
                    }                                                                          \
                    b_##S(o, in, c, 1, a);                                                     \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        free(r);                                                                               \
    }                                                                                          \
    return failed;                                                                             \
}

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)

/* How many threads a large call runs on: OpenMP's count, or 0 when built without OpenMP. */
#ifdef _OPENMP
#include <omp.h>
int tiles_threads(void) { return omp_get_max_threads(); }
#else
int tiles_threads(void) { return 0; }
#endif
