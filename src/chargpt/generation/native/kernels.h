/* The kernels of chargpt's native decode loop (native_decode.c): the products of a weight
 * matrix and a batch of vectors (`linear`) in every storage kind of Config.weight_format, and
 * the products of a head's attention (`dot`, `weigh_values`). Each output is one chain of
 * multiply-adds in a fixed order, whatever the vector width, tile or thread split.
 */
#ifndef CHARGPT_KERNELS_H
#define CHARGPT_KERNELS_H
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "structs.h"

/* Vectors of VW floats (GCC/clang vector extensions; the compiler maps them onto the machine's
 * registers, two or four of them where its vectors are narrower). Accumulators are held in
 * such variables, never in arrays indexed at run time: an array of partial sums is kept in
 * memory, and every multiply-add then waits for a store and a load. */
#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
typedef float vf __attribute__((vector_size(VW * sizeof(float))));
typedef float vh __attribute__((vector_size(VW / 2 * sizeof(float))));
/* 16 floats: the running partial sums of a row of a big matrix (two vectors where the
 * machine's are 8 wide) */
typedef float v16 __attribute__((vector_size(16 * sizeof(float))));
#define INLINE static inline __attribute__((always_inline))

INLINE vf load_vf(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE vh load_vh(const float *p) { vh v; memcpy(&v, p, sizeof v); return v; }
INLINE void store_vf(float *p, vf v) { memcpy(p, &v, sizeof v); }
INLINE void store_vh(float *p, vh v) { memcpy(p, &v, sizeof v); }
INLINE v16 load_v16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }

/* A weight matrix is stored in one of three kinds (Config.weight_format): float32; bfloat16,
 * the upper half of a float32, so a weight widens exactly by a shift; or int8 with one float32
 * scale per output (a row of W), the weight being q * scale. Either way the products below run
 * in float32 on the widened weights: a narrower kind halves or quarters the bytes a token
 * reads, not the precision of the arithmetic. */

/* WIDEN(V, N): widen_V_bf16 and widen_V_i8, N weights from p widened to the N floats of V */
#define WIDEN(V, N)                                                                   \
    typedef uint16_t V##_u16 __attribute__((vector_size(N * sizeof(uint16_t))));    \
    typedef uint32_t V##_u32 __attribute__((vector_size(N * sizeof(uint32_t))));    \
    typedef int8_t V##_i8 __attribute__((vector_size(N)));                          \
    INLINE V widen_##V##_bf16(const uint16_t *p)                                      \
    {                                                                                  \
        V##_u16 h;                                                                     \
        memcpy(&h, p, sizeof h);                                                       \
        const V##_u32 bits = __builtin_convertvector(h, V##_u32) << 16;               \
        V f;                                                                           \
        memcpy(&f, &bits, sizeof f);                                                   \
        return f;                                                                      \
    }                                                                                  \
    INLINE V widen_##V##_i8(const int8_t *p)                                          \
    {                                                                                  \
        V##_i8 b;                                                                      \
        memcpy(&b, p, sizeof b);                                                       \
        return __builtin_convertvector(b, V);                                         \
    }

#if defined(__AVX512F__)
/* one zero-extending load and a shift (the compiler's own conversion of a vector type splits
 * it into halves on some tunings); vf is v16 */
#include <immintrin.h>
INLINE v16 widen_v16_bf16(const uint16_t *p)
{
    const __m512i bits = _mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
    v16 f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

INLINE v16 widen_v16_i8(const int8_t *p)
{
    const __m512 f32 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128((const __m128i *)p)));
    v16 f;
    memcpy(&f, &f32, sizeof f);
    return f;
}
#define widen_vf_bf16 widen_v16_bf16
#define widen_vf_i8 widen_v16_i8
#else
WIDEN(vf, VW)
WIDEN(v16, 16)
#endif

/* the weight at element `at` of output `j` */
INLINE float weight_at(Linear m, int64_t at, int j, const int KIND)
{
    if (KIND == W_FLOAT32) return ((const float *)m.weight)[at];
    if (KIND == W_INT8) return (float)((const int8_t *)m.weight)[at] * m.scale[j];
    const uint32_t bits = (uint32_t)((const uint16_t *)m.weight)[at] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* VW weights from element `at` on, of outputs j.. (an (in, out) matrix: int8 scales vary
 * along the vector) */
INLINE vf weights_vf(Linear m, int64_t at, int j, const int KIND)
{
    if (KIND == W_FLOAT32) return load_vf((const float *)m.weight + at);
    if (KIND == W_INT8) return widen_vf_i8((const int8_t *)m.weight + at) * load_vf(m.scale + j);
    return widen_vf_bf16((const uint16_t *)m.weight + at);
}

/* 16 weights from element `at` on, of output j (a row of an (out, in) matrix: one scale) */
INLINE v16 weights_v16(Linear m, int64_t at, int j, const int KIND)
{
    if (KIND == W_FLOAT32) return load_v16((const float *)m.weight + at);
    if (KIND == W_INT8) return widen_v16_i8((const int8_t *)m.weight + at) * m.scale[j];
    return widen_v16_bf16((const uint16_t *)m.weight + at);
}

#define TR 4 /* rows of a tile of a product */
#define TV 4 /* vectors of outputs of a tile: TV * VW outputs */

/* y[b, j0 : j0 + NV * VW] = x[b, :in] @ wt[:, that span] for b < R (wt is (in, out)): R x NV
 * accumulators in registers, each weight vector loaded once for all R rows. Every output is
 * the same chain of multiply-adds over the inputs in order, whatever the tile. */
INLINE void tile(const float *restrict x, int in, Linear wt, int out, float *restrict y, int j0,
                 const int R, const int NV, const int KIND)
{
    vf acc[TR][TV];
    for (int b = 0; b < R; b++)
        for (int v = 0; v < NV; v++) acc[b][v] = (vf){0};
    for (int i = 0; i < in; i++) {
        vf wv[TV];
        for (int v = 0; v < NV; v++)
            wv[v] = weights_vf(wt, (int64_t)i * out + j0 + v * VW, j0 + v * VW, KIND);
        for (int b = 0; b < R; b++) {
            const float xi = x[(int64_t)b * in + i];
            for (int v = 0; v < NV; v++) acc[b][v] += xi * wv[v];
        }
    }
    for (int b = 0; b < R; b++)
        for (int v = 0; v < NV; v++) store_vf(y + (int64_t)b * out + j0 + v * VW, acc[b][v]);
}

/* the scalar product of the last outputs, which fill no vector: in the same order */
INLINE float column(const float *restrict xb, int in, Linear wt, int out, int j, const int KIND)
{
    float acc = 0.0f;
    for (int i = 0; i < in; i++) acc += xb[i] * weight_at(wt, (int64_t)i * out + j, j, KIND);
    return acc;
}

/* the first n < 16 floats from p, zeros after them */
INLINE v16 part_x(const float *p, int n)
{
    float tmp[16] = {0.0f};
    memcpy(tmp, p, sizeof(float) * n);
    return load_v16(tmp);
}

/* the first n < 16 weights of output j from element `at`, zeros after them */
INLINE v16 part_w(Linear m, int64_t at, int j, int n, const int KIND)
{
    float tmp[16] = {0.0f};
    for (int k = 0; k < n; k++) tmp[k] = weight_at(m, at + k, j, KIND);
    return load_v16(tmp);
}

/* the sum of 16 partial sums, added pairwise */
INLINE float sum16(v16 a)
{
    float s[8];
    for (int k = 0; k < 8; k++) s[k] = a[k] + a[k + 8];
    return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}

/* rows of a big matrix read side by side; each read prefetches the same place RB rows on (a
 * row or two ahead of the hardware prefetcher, which follows each stream only as it is read;
 * measured 1.1-1.25x faster than prefetching a fixed distance ahead, at 6 x 384) */
#define RB 4

/* y[b, j : j + R] = x[b, :in] . w[j + r, :in] for b < rows: R rows of w (out, in) read side by
 * side, each with 16 partial sums in registers (lane k sums the inputs i = k mod 16, in order) */
INLINE void rows_block(const float *restrict x, int rows, int in, Linear w, int out,
                       float *restrict y, int j, const int R, const int KIND)
{
    const int64_t w0 = (int64_t)j * in; /* the block's first weight */
    const char *bytes = (const char *)w.weight;
    const int size = KIND == W_FLOAT32 ? 4 : KIND == W_BFLOAT16 ? 2 : 1;
    for (int b = 0; b < rows; b++) {
        const float *xb = x + (int64_t)b * in;
        v16 acc[RB];
        for (int r = 0; r < R; r++) acc[r] = (v16){0};
        int i = 0;
        for (; i + 16 <= in; i += 16) {
            if (b == 0)
                for (int r = 0; r < R; r++) /* the next block's row, where this one is */
                    __builtin_prefetch(bytes + (w0 + (int64_t)(r + RB) * in + i) * size);
            const v16 xv = load_v16(xb + i);
            for (int r = 0; r < R; r++)
                acc[r] += xv * weights_v16(w, w0 + (int64_t)r * in + i, j + r, KIND);
        }
        if (i < in) {
            const v16 xv = part_x(xb + i, in - i);
            for (int r = 0; r < R; r++)
                acc[r] += xv * part_w(w, w0 + (int64_t)r * in + i, j + r, in - i, KIND);
        }
        for (int r = 0; r < R; r++) y[(int64_t)b * out + j + r] = sum16(acc[r]);
    }
}

/* One function per tile shape, row block and weight kind, so that each one's accumulators
 * are registers; tables of them by kind. */
typedef void (*tile_fn)(const float *restrict, int, Linear, int, float *restrict, int);
typedef void (*rows_fn)(const float *restrict, int, int, Linear, int, float *restrict, int);
typedef float (*column_fn)(const float *restrict, int, Linear, int, int);
#define TILE(R, NV, K)                                                                       \
    static void tile_##R##_##NV##_##K(const float *restrict x, int in, Linear wt, int out,  \
                                      float *restrict y, int j0)                            \
    { tile(x, in, wt, out, y, j0, R, NV, K); }
#define TILE_ROW(R, K)                                                                       \
    TILE(R, 1, K) TILE(R, 2, K) TILE(R, 3, K) TILE(R, 4, K)
#define ROWS(R, K)                                                                           \
    static void rows_##R##_##K(const float *restrict x, int rows, int in, Linear w, int out, \
                               float *restrict y, int j)                                    \
    { rows_block(x, rows, in, w, out, y, j, R, K); }
#define KERNELS(K)                                                                           \
    TILE_ROW(1, K) TILE_ROW(2, K) TILE_ROW(3, K) TILE_ROW(4, K) ROWS(1, K) ROWS(4, K)        \
    static float column_##K(const float *restrict xb, int in, Linear wt, int out, int j)     \
    { return column(xb, in, wt, out, j, K); }
KERNELS(W_FLOAT32)
KERNELS(W_BFLOAT16)
KERNELS(W_INT8)
#define TILES_ROW(R, K) {tile_##R##_1_##K, tile_##R##_2_##K, tile_##R##_3_##K, tile_##R##_4_##K}
#define TILES_OF(K) [K] = {TILES_ROW(1, K), TILES_ROW(2, K), TILES_ROW(3, K), TILES_ROW(4, K)}
static const tile_fn TILES[][TR][TV] = {TILES_OF(W_FLOAT32), TILES_OF(W_BFLOAT16),
                                       TILES_OF(W_INT8)};
static const rows_fn ROWS_1[] = {[W_FLOAT32] = rows_1_W_FLOAT32,
                                 [W_BFLOAT16] = rows_1_W_BFLOAT16, [W_INT8] = rows_1_W_INT8};
static const rows_fn ROWS_4[] = {[W_FLOAT32] = rows_4_W_FLOAT32,
                                 [W_BFLOAT16] = rows_4_W_BFLOAT16, [W_INT8] = rows_4_W_INT8};
static const column_fn COLUMNS[] = {[W_FLOAT32] = column_W_FLOAT32,
                                    [W_BFLOAT16] = column_W_BFLOAT16, [W_INT8] = column_W_INT8};

/* y[b, :out] = x[b, :in] @ wt for b < rows (wt is (in, out)), tile by tile */
static void linear_part(const float *restrict x, int rows, int in, Linear wt, int out,
                        float *restrict y, int kind)
{
    const int full = out / VW * VW;
    for (int b0 = 0; b0 < rows; b0 += TR) {
        const int r = rows - b0 < TR ? rows - b0 : TR;
        const float *xb = x + (int64_t)b0 * in;
        float *yb = y + (int64_t)b0 * out;
        for (int j0 = 0; j0 < full; j0 += TV * VW) {
            const int nv = (full - j0) / VW < TV ? (full - j0) / VW : TV;
            TILES[kind][r - 1][nv - 1](xb, in, wt, out, yb, j0);
        }
        for (int j = full; j < out; j++)
            for (int b = 0; b < r; b++)
                yb[(int64_t)b * out + j] = COLUMNS[kind](xb + (int64_t)b * in, in, wt, out, j);
    }
}

/* y[b, ja:jb] = x[b, :in] . w[j, :in] (w is (out, in)), for b < rows: the layout of a big
 * matrix, read in memory order as RB rows at a time (the matrix is far larger than the
 * caches, so each weight is read once from memory per step and the rows of a batch reuse it
 * from the nearest cache) */
static void linear_rows(const float *restrict x, int rows, int in, Linear w, int out,
                        float *restrict y, int ja, int jb, int kind)
{
    int j = ja;
    for (; j + RB <= jb; j += RB) ROWS_4[kind](x, rows, in, w, out, y, j);
    for (; j < jb; j++) ROWS_1[kind](x, rows, in, w, out, y, j); /* a split's last rows */
}

/* y[b, :out] = x[b, :in] @ W.T + bias, for b < rows, W (out, in) stored as `w` says:
 * transposed, (in, out), when it has fewer than c->big weights, else as it is (linear_rows).
 * A big matrix is split by rows over `threads` threads: at batch 1 a big model's step is
 * bound by how fast its weights stream from memory, and two cores stream faster than one. */
static void linear(const float *restrict x, int rows, int in, Linear w, int out,
                   float *restrict y, const Config *c, int threads)
{
    const int kind = c->weight_format;
    if ((int64_t)in * out < c->big) {
        linear_part(x, rows, in, w, out, y, kind);
    } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            const int t = omp_get_thread_num(), n = omp_get_num_threads();
            const int groups = (out + RB - 1) / RB;
            const int ja = groups * t / n * RB, jb = t == n - 1 ? out : groups * (t + 1) / n * RB;
            linear_rows(x, rows, in, w, out, y, ja, jb, kind);
        }
#else
        linear_rows(x, rows, in, w, out, y, 0, out, kind);
#endif
    }
    (void)threads;
    if (w.bias)
        for (int b = 0; b < rows; b++)
            for (int j = 0; j < out; j++) y[(int64_t)b * out + j] += w.bias[j];
}

/* a . b over n floats, in 8 running partial sums (vectorised without reordering a loop the
 * compiler would otherwise keep serial), added pairwise */
static float dot(const float *restrict a, const float *restrict b, int n)
{
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    for (int j = 0; i < n; i++, j++) acc[j] += a[i] * b[i];
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

/* out[i] = sum over s < n of p[s] * v[s, i], for the NV * VW + (HALF ? VW / 2 : 0) features
 * from i0 of rows of hs floats: one pass over the keys, its sums in registers */
INLINE void weigh_span(const float *restrict p, const float *restrict v, int n, int hs,
                       float *restrict out, int i0, const int NV, const int HALF)
{
    vf acc[TV];
    vh acc_h = (vh){0};
    for (int k = 0; k < NV; k++) acc[k] = (vf){0};
    for (int s = 0; s < n; s++) {
        const float *row = v + (int64_t)s * hs + i0;
        for (int k = 0; k < NV; k++) acc[k] += p[s] * load_vf(row + k * VW);
        if (HALF) acc_h += p[s] * load_vh(row + NV * VW);
    }
    for (int k = 0; k < NV; k++) store_vf(out + i0 + k * VW, acc[k]);
    if (HALF) store_vh(out + i0 + NV * VW, acc_h);
}

#define WEIGH(NV, HALF) \
    static void weigh_##NV##_##HALF(const float *restrict p, const float *restrict v, int n, \
                                    int hs, float *restrict out, int i0) \
    { weigh_span(p, v, n, hs, out, i0, NV, HALF); }
WEIGH(0, 1) WEIGH(1, 0) WEIGH(1, 1) WEIGH(2, 0) WEIGH(2, 1) WEIGH(3, 0) WEIGH(3, 1) WEIGH(4, 0)
typedef void (*weigh_fn)(const float *restrict, const float *restrict, int, int,
                         float *restrict, int);
static const weigh_fn WEIGHS[TV + 1][2] = {{NULL, weigh_0_1}, {weigh_1_0, weigh_1_1},
    {weigh_2_0, weigh_2_1}, {weigh_3_0, weigh_3_1}, {weigh_4_0, NULL}};

/* out[:hs] = p[:n] @ v[:n, :hs], a head's attention output: spans of up to TV vectors (and a
 * half vector), then the last features one at a time */
static void weigh_values(const float *restrict p, const float *restrict v, int n, int hs,
                         float *restrict out)
{
    int i0 = 0;
    for (; hs - i0 >= TV * VW; i0 += TV * VW) weigh_4_0(p, v, n, hs, out, i0);
    const int nv = (hs - i0) / VW, half = (hs - i0 - nv * VW) >= VW / 2;
    if (nv || half) {
        WEIGHS[nv][half](p, v, n, hs, out, i0);
        i0 += nv * VW + half * VW / 2;
    }
    for (; i0 < hs; i0++) {
        float acc = 0.0f;
        for (int s = 0; s < n; s++) acc += p[s] * v[(int64_t)s * hs + i0];
        out[i0] = acc;
    }
}

#endif
