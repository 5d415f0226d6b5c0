/* chargpt's native decode loop: a pre-norm GPT's single-token steps and the draw of each next
 * token, for a whole run of tokens in one call from Python (see native.py, which builds this
 * file with the machine's C compiler and checks every shape before calling it).
 *
 * At chargpt's sizes a token costs well under a megaflop, so a framework's per-operation cost
 * (dispatch, allocation, Python) dominates a decode step; written as plain loops over
 * contiguous float32 arrays the step costs about its arithmetic. Weight matrices arrive
 * transposed, (in, out), so that every product is a sum of scaled rows, vectorised over the
 * outputs without reordering any sum. The result is the eager step's arithmetic up to
 * rounding (summation order, exp and erf of the C library).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* dims[] */
enum { D_LAYERS, D_HEADS, D_HEAD_DIM, D_EMBD, D_HIDDEN, D_VOCAB, D_NORM, D_ACT, D_QK_NORM,
       D_ROPE, D_WPE, D_MAX_LEN, D_BATCH, D_TOP_K, D_BIG, D_WEIGHTS, D_N_DIMS };
/* params[] */
enum { P_NORM_EPS, P_QK_EPS, P_SCALE, P_SOFTCAP, P_TEMPERATURE, P_TOP_P, P_N_PARAMS };
/* ptrs[]: the model's arrays, then per layer L_COUNT of them (NULL where a part is absent) */
enum { G_WTE, G_WPE, G_LNF_W, G_LNF_B, G_HEAD_WT, G_HEAD_S, G_HEAD_B, G_COUNT };
/* (a matrix's *_S: the scales of an int8 matrix) */
enum { L_LN1_W, L_LN1_B, L_ATTN_WT, L_ATTN_S, L_ATTN_B, L_VE, L_PROJ_WT, L_PROJ_S, L_PROJ_B,
       L_LN2_W, L_LN2_B, L_FC_WT, L_FC_S, L_FC_B, L_MPROJ_WT, L_MPROJ_S, L_MPROJ_B, L_K, L_V,
       L_COUNT };
enum { NORM_NONE, NORM_LAYER, NORM_RMS };
enum { ACT_RELU, ACT_RELU2, ACT_GELU };

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
typedef uint16_t vf_bf16 __attribute__((vector_size(VW * sizeof(uint16_t))));
typedef uint32_t vf_u32 __attribute__((vector_size(VW * sizeof(uint32_t))));
/* 16 floats: the running partial sums of a row of a big matrix (two vectors where the
 * machine's are 8 wide) */
typedef float v16 __attribute__((vector_size(16 * sizeof(float))));
typedef uint16_t v16_bf16 __attribute__((vector_size(16 * sizeof(uint16_t))));
typedef uint32_t v16_u32 __attribute__((vector_size(16 * sizeof(uint32_t))));
#define INLINE static inline __attribute__((always_inline))

INLINE vf load_vf(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE vh load_vh(const float *p) { vh v; memcpy(&v, p, sizeof v); return v; }
INLINE void store_vf(float *p, vf v) { memcpy(p, &v, sizeof v); }
INLINE void store_vh(float *p, vh v) { memcpy(p, &v, sizeof v); }
INLINE v16 load_v16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }

/* A weight matrix is stored in one of three kinds (dims[D_WEIGHTS]): float32; bfloat16, the
 * upper half of a float32, so a weight widens exactly by a shift; or int8 with one float32
 * scale per output (a row of W), the weight being q * scale. Either way the products below run
 * in float32 on the widened weights: a narrower kind halves or quarters the bytes a token
 * reads, not the precision of the arithmetic. */
enum { W_F32, W_BF16, W_I8 };

typedef struct {
    const void *w;       /* the weights, (in, out) or (out, in) (see linear) */
    const float *scale;  /* (out) scales of an int8 matrix, else NULL */
} matrix;

typedef int8_t vf_i8 __attribute__((vector_size(VW)));
typedef int8_t v16_i8 __attribute__((vector_size(16)));

/* the weight at element `at` of output `j` */
INLINE float weight_at(matrix m, int64_t at, int j, const int KIND)
{
    if (KIND == W_F32) return ((const float *)m.w)[at];
    if (KIND == W_I8) return (float)((const int8_t *)m.w)[at] * m.scale[j];
    const uint32_t bits = (uint32_t)((const uint16_t *)m.w)[at] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* 16 bfloat16 weights widened: one zero-extending load and a shift where the CPU has it (the
 * compiler's own conversion of a vector type splits it into halves on some tunings) */
#if defined(__AVX512F__)
#include <immintrin.h>
INLINE v16 widen16(const uint16_t *p)
{
    const __m512i bits = _mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
    v16 f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

INLINE v16 widen16_i8(const int8_t *p)
{
    const __m512 f32 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128((const __m128i *)p)));
    v16 f;
    memcpy(&f, &f32, sizeof f);
    return f;
}
#define HAVE_WIDEN16 1
#endif

/* VW weights from element `at` on, of outputs j.. (an (in, out) matrix: int8 scales vary
 * along the vector) */
INLINE vf weights_vf(matrix m, int64_t at, int j, const int KIND)
{
    if (KIND == W_F32) return load_vf((const float *)m.w + at);
    if (KIND == W_I8) {
#if defined(HAVE_WIDEN16) && VW == 16
        const vf q = widen16_i8((const int8_t *)m.w + at);
#else
        vf_i8 b;
        memcpy(&b, (const int8_t *)m.w + at, sizeof b);
        const vf q = __builtin_convertvector(b, vf);
#endif
        return q * load_vf(m.scale + j);
    }
#if defined(HAVE_WIDEN16) && VW == 16
    return widen16((const uint16_t *)m.w + at);
#else
    vf_bf16 h;
    memcpy(&h, (const uint16_t *)m.w + at, sizeof h);
    const vf_u32 bits = __builtin_convertvector(h, vf_u32) << 16;
    vf f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

/* 16 weights from element `at` on, of output j (a row of an (out, in) matrix: one scale) */
INLINE v16 weights_v16(matrix m, int64_t at, int j, const int KIND)
{
    if (KIND == W_F32) return load_v16((const float *)m.w + at);
    if (KIND == W_I8) {
#if defined(HAVE_WIDEN16)
        const v16 q = widen16_i8((const int8_t *)m.w + at);
#else
        v16_i8 b;
        memcpy(&b, (const int8_t *)m.w + at, sizeof b);
        const v16 q = __builtin_convertvector(b, v16);
#endif
        return q * m.scale[j];
    }
#if defined(HAVE_WIDEN16)
    return widen16((const uint16_t *)m.w + at);
#else
    v16_bf16 h;
    memcpy(&h, (const uint16_t *)m.w + at, sizeof h);
    const v16_u32 bits = __builtin_convertvector(h, v16_u32) << 16;
    v16 f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

#define TR 4 /* rows of a tile of a product */
#define TV 4 /* vectors of outputs of a tile: TV * VW outputs */

/* y[b, j0 : j0 + NV * VW] = x[b, :in] @ wt[:, that span] for b < R (wt is (in, out)): R x NV
 * accumulators in registers, each weight vector loaded once for all R rows. Every output is
 * the same chain of multiply-adds over the inputs in order, whatever the tile. */
INLINE void tile(const float *restrict x, int in, matrix wt, int out, float *restrict y, int j0,
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

/* one function per tile shape and weight kind, so that each one's accumulators are registers */
typedef void (*tile_fn)(const float *restrict, int, matrix, int, float *restrict, int);
#define TILE(R, NV, K) \
    static void tile_##R##_##NV##_##K(const float *restrict x, int in, matrix wt, int out, \
                                      float *restrict y, int j0) \
    { tile(x, in, wt, out, y, j0, R, NV, K); }
#define TILES_OF(K) \
    TILE(1, 1, K) TILE(1, 2, K) TILE(1, 3, K) TILE(1, 4, K) \
    TILE(2, 1, K) TILE(2, 2, K) TILE(2, 3, K) TILE(2, 4, K) \
    TILE(3, 1, K) TILE(3, 2, K) TILE(3, 3, K) TILE(3, 4, K) \
    TILE(4, 1, K) TILE(4, 2, K) TILE(4, 3, K) TILE(4, 4, K)
#define TILE_ROW(R, K) {tile_##R##_1_##K, tile_##R##_2_##K, tile_##R##_3_##K, tile_##R##_4_##K}
#define TILES_TABLE(K) {TILE_ROW(1, K), TILE_ROW(2, K), TILE_ROW(3, K), TILE_ROW(4, K)}
TILES_OF(0)
TILES_OF(1)
TILES_OF(2)
static const tile_fn TILES[3][TR][TV] = {TILES_TABLE(0), TILES_TABLE(1), TILES_TABLE(2)};

/* the scalar product of the last outputs, which fill no vector: in the same order */
INLINE float column(const float *restrict xb, int in, matrix wt, int out, int j, const int KIND)
{
    float acc = 0.0f;
    for (int i = 0; i < in; i++) acc += xb[i] * weight_at(wt, (int64_t)i * out + j, j, KIND);
    return acc;
}

/* y[b, :out] = x[b, :in] @ wt for b < rows (wt is (in, out)), tile by tile */
static void linear_part(const float *restrict x, int rows, int in, matrix wt, int out,
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
            for (int b = 0; b < r; b++) {
                const float *xr = xb + (int64_t)b * in;
                yb[(int64_t)b * out + j] = kind == W_F32    ? column(xr, in, wt, out, j, W_F32)
                                           : kind == W_BF16 ? column(xr, in, wt, out, j, W_BF16)
                                                            : column(xr, in, wt, out, j, W_I8);
            }
    }
}

/* the first n < 16 floats from p, zeros after them */
INLINE v16 part_x(const float *p, int n)
{
    float tmp[16] = {0.0f};
    memcpy(tmp, p, sizeof(float) * n);
    return load_v16(tmp);
}

/* the first n < 16 weights of output j from element `at`, zeros after them */
INLINE v16 part_w(matrix m, int64_t at, int j, int n, const int KIND)
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
INLINE void rows_block(const float *restrict x, int rows, int in, matrix w, int out,
                       float *restrict y, int j, const int R, const int KIND)
{
    const int64_t w0 = (int64_t)j * in; /* the block's first weight */
    const char *bytes = (const char *)w.w;
    const int size = KIND == W_F32 ? 4 : KIND == W_BF16 ? 2 : 1;
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

typedef void (*rows_fn)(const float *restrict, int, int, matrix, int, float *restrict, int);
#define ROWS(R, K) \
    static void rows_##R##_##K(const float *restrict x, int rows, int in, matrix w, int out, \
                               float *restrict y, int j) \
    { rows_block(x, rows, in, w, out, y, j, R, K); }
ROWS(1, 0) ROWS(4, 0) ROWS(1, 1) ROWS(4, 1) ROWS(1, 2) ROWS(4, 2)
static const rows_fn ROWS_1[3] = {rows_1_0, rows_1_1, rows_1_2};
static const rows_fn ROWS_4[3] = {rows_4_0, rows_4_1, rows_4_2};

/* y[b, ja:jb] = x[b, :in] . w[j, :in] (w is (out, in)), for b < rows: the layout of a big
 * matrix, read in memory order as RB rows at a time (the matrix is far larger than the
 * caches, so each weight is read once from memory per step and the rows of a batch reuse it
 * from the nearest cache) */
static void linear_rows(const float *restrict x, int rows, int in, matrix w, int out,
                        float *restrict y, int ja, int jb, int kind)
{
    int j = ja;
    for (; j + RB <= jb; j += RB) ROWS_4[kind](x, rows, in, w, out, y, j);
    for (; j < jb; j++) ROWS_1[kind](x, rows, in, w, out, y, j); /* a split's last rows */
}

/* y[b, :out] = x[b, :in] @ W.T + bias, for b < rows, with W (out, in) given as `w` (of kind
 * `kind`): transposed, (in, out), when it has fewer than `big` weights, else as it is
 * (linear_rows). A big matrix is split by rows over `threads` threads: at batch 1 a big
 * model's step is bound by how fast its weights stream from memory, and two cores stream
 * faster than one. */
static void linear(const float *restrict x, int rows, int in, matrix w,
                   const float *restrict bias, int out, float *restrict y, int threads,
                   int64_t big, int kind)
{
    if ((int64_t)in * out < big) {
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
    if (bias)
        for (int b = 0; b < rows; b++)
            for (int j = 0; j < out; j++) y[(int64_t)b * out + j] += bias[j];
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

/* y = norm(x) over n features, y may be x; w, b may be NULL (RMSNorm without weight, no bias) */
static void norm(int kind, const float *x, const float *restrict w, const float *restrict b,
                 float eps, int n, float *y)
{
    if (kind == NORM_NONE) {
        if (y != x) memcpy(y, x, sizeof(float) * n);
        return;
    }
    float mean = 0.0f;
    if (kind == NORM_LAYER) {
        for (int i = 0; i < n; i++) mean += x[i];
        mean /= n;
    }
    float var = 0.0f;
    for (int i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    const float r = 1.0f / sqrtf(var / n + eps);
    for (int i = 0; i < n; i++) {
        float v = (x[i] - mean) * r;
        if (w) v *= w[i];
        if (b) v += b[i];
        y[i] = v;
    }
}

/* x rotated by one rotary row: rot[0] = [cos | cos], rot[1] = [sin | -sin] (decode.py) */
static void rotate(float *restrict x, const float *restrict rot, int hs)
{
    float tmp[1024];
    const int h = hs / 2;
    for (int i = 0; i < hs; i++) {
        const float swapped = i < h ? x[i + h] : x[i - h];
        tmp[i] = x[i] * rot[i] + swapped * rot[hs + i];
    }
    memcpy(x, tmp, sizeof(float) * hs);
}

static float activate(int kind, float v)
{
    if (kind == ACT_GELU) return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    v = v > 0.0f ? v : 0.0f;
    return kind == ACT_RELU2 ? v * v : v;
}

/* in-place softmax over n values; returns nothing, p sums to 1 */
static void softmax(float *p, int n)
{
    float m = -INFINITY;
    for (int i = 0; i < n; i++) m = p[i] > m ? p[i] : m;
    float s = 0.0f;
    for (int i = 0; i < n; i++) {
        p[i] = expf(p[i] - m);
        s += p[i];
    }
    const float r = 1.0f / s;
    for (int i = 0; i < n; i++) p[i] *= r;
}

static int argmax(const float *v, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

/* the k-th largest of v[:n] (1 <= k <= n); scratch holds n floats */
static float kth_largest(const float *v, int n, int k, float *scratch)
{
    memcpy(scratch, v, sizeof(float) * n);
    int lo = 0, hi = n - 1, want = k - 1; /* quickselect, descending */
    while (lo < hi) {
        const float pivot = scratch[(lo + hi) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (scratch[i] > pivot) i++;
            while (scratch[j] < pivot) j--;
            if (i <= j) {
                const float t = scratch[i];
                scratch[i++] = scratch[j];
                scratch[j--] = t;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break;
    }
    return scratch[want];
}

/* positions sorted by descending value, ties in order (a bottom-up merge sort) */
static void sort_desc(const float *v, int *order, int *tmp, int n)
{
    for (int i = 0; i < n; i++) order[i] = i;
    for (int width = 1; width < n; width *= 2) {
        for (int lo = 0; lo < n; lo += 2 * width) {
            int mid = lo + width < n ? lo + width : n, hi = lo + 2 * width < n ? lo + 2 * width : n;
            int a = lo, b = mid, o = lo;
            while (a < mid && b < hi)
                tmp[o++] = v[order[b]] > v[order[a]] ? order[b++] : order[a++];
            while (a < mid) tmp[o++] = order[a++];
            while (b < hi) tmp[o++] = order[b++];
        }
        memcpy(order, tmp, sizeof(int) * n);
    }
}

/* SamplingSettings.pick for one row: logits (V) are overwritten; noise NULL is greedy */
static int pick(float *logits, const float *noise, int V, float temperature, int top_k,
                float top_p, float *scratch, int *order)
{
    if (noise == NULL || temperature == 0.0f) return argmax(logits, V);
    if (temperature != 1.0f)
        for (int i = 0; i < V; i++) logits[i] /= temperature;
    if (top_k > 0 && top_k < V) {
        const float kth = kth_largest(logits, V, top_k, scratch);
        for (int i = 0; i < V; i++)
            if (logits[i] < kth) logits[i] = -INFINITY;
    }
    if (top_p < 1.0f) {
        sort_desc(logits, order, order + V, V);
        for (int i = 0; i < V; i++) scratch[i] = logits[order[i]];
        softmax(scratch, V);
        float above = 0.0f; /* probability of the tokens ranked above this one */
        for (int i = 0; i < V; i++) {
            const float p = scratch[i];
            if (above >= top_p) logits[order[i]] = -INFINITY;
            above += p;
        }
    }
    softmax(logits, V);
    for (int i = 0; i < V; i++) logits[i] /= noise[i];
    return argmax(logits, V);
}

/* the matrix at ptrs p[NAME_WT], with its scales */
#define MAT(p, NAME) ((matrix){(const void *)(p)[NAME##_WT], (p)[NAME##_S]})

/* floats of work memory chargpt_fill needs */
int64_t chargpt_work_size(const int32_t *dims)
{
    const int64_t B = dims[D_BATCH], C = dims[D_EMBD], H = dims[D_HIDDEN], V = dims[D_VOCAB];
    const int64_t T = dims[D_MAX_LEN];
    return B * (3 * C + 3 * C + (H > C ? H : C) + V) + T + 4 * V + 1024;
}

/* Samples seq[b, start:end] for the rows row0 <= b < row1, each token from the one before it
 * and the KV cache, whose next position is `pos`. seq is (batch, stride) int64; rot holds the
 * rotary rows (2, head_dim) of positions pos.. (NULL without rotary positions); noise is
 * (end - start, batch, vocab) Exp(1) noise, NULL for greedy. Rows never interact, so callers
 * may run disjoint row ranges at once, each with its own work memory (chargpt_work_size
 * floats); `threads` more split each large product (where built with OpenMP). Returns 0, or
 * -1 for a token id out of range. */
int chargpt_fill(const int32_t *dims, const float *params, void *const *ptrs, int64_t *seq,
                 int64_t stride, int64_t start, int64_t end, int64_t pos, const float *rot,
                 const float *noise, float *work, int32_t row0, int32_t row1,
                 int32_t threads)
{
    const int L = dims[D_LAYERS], nh = dims[D_HEADS], hs = dims[D_HEAD_DIM], C = dims[D_EMBD];
    const int H = dims[D_HIDDEN], V = dims[D_VOCAB], normk = dims[D_NORM], act = dims[D_ACT];
    const int T = dims[D_MAX_LEN], batch = dims[D_BATCH], B = row1 - row0;
    const int64_t big = dims[D_BIG];
    const int kind = dims[D_WEIGHTS];
    const float eps = params[P_NORM_EPS], qk_eps = params[P_QK_EPS], scale = params[P_SCALE];
    const float cap = params[P_SOFTCAP];
    const float *const *g = (const float *const *)ptrs;
    const float *const *layers = g + G_COUNT;

    float *x = work;                         /* (B, C) the residual stream */
    float *xn = x + (int64_t)B * C;          /* (B, C) its normalised copy */
    float *qkv = xn + (int64_t)B * C;        /* (B, 3C) */
    float *y = qkv + (int64_t)B * 3 * C;     /* (B, C) attention output, then a sub-layer's */
    float *h = y + (int64_t)B * C;           /* (B, max(H, C)) */
    float *logits = h + (int64_t)B * (H > C ? H : C); /* (B, V) */
    float *att = logits + (int64_t)B * V;    /* (T) */
    float *scratch = att + T;                /* (V) */
    int *order = (int *)(scratch + V);       /* (2V) */

    for (int64_t t = start; t < end; t++, pos++) {
        const int slot = (int)(pos % T), n_keys = pos + 1 < T ? (int)(pos + 1) : T;
        for (int b = 0; b < B; b++) {
            const int64_t tok = seq[(row0 + b) * stride + t - 1];
            if (tok < 0 || tok >= V) return -1;
            memcpy(x + (int64_t)b * C, g[G_WTE] + tok * C, sizeof(float) * C);
            if (dims[D_WPE])
                for (int i = 0; i < C; i++) x[(int64_t)b * C + i] += g[G_WPE][pos * C + i];
        }
        for (int l = 0; l < L; l++) {
            const float *const *w = layers + (int64_t)l * L_COUNT;
            for (int b = 0; b < B; b++)
                norm(normk, x + (int64_t)b * C, w[L_LN1_W], w[L_LN1_B], eps, C,
                     xn + (int64_t)b * C);
            linear(xn, B, C, MAT(w, L_ATTN), w[L_ATTN_B], 3 * C, qkv, threads, big, kind);
            for (int b = 0; b < B; b++) {
                float *q = qkv + (int64_t)b * 3 * C, *k = q + C, *v = k + C;
                if (w[L_VE]) {
                    const int64_t tok = seq[(row0 + b) * stride + t - 1];
                    for (int i = 0; i < C; i++) v[i] += w[L_VE][tok * C + i];
                }
                for (int hd = 0; hd < nh; hd++) {
                    float *qh = q + hd * hs, *kh = k + hd * hs, *vh = v + hd * hs;
                    if (dims[D_QK_NORM]) {
                        norm(NORM_RMS, qh, NULL, NULL, qk_eps, hs, qh);
                        norm(NORM_RMS, kh, NULL, NULL, qk_eps, hs, kh);
                    }
                    if (rot) {
                        rotate(qh, rot + (t - start) * 2 * hs, hs);
                        rotate(kh, rot + (t - start) * 2 * hs, hs);
                    }
                    /* this layer's cache (B, nh, T, hs): write the token, attend to n_keys */
                    const int64_t base = (((int64_t)(row0 + b) * nh + hd) * T) * hs;
                    float *K = (float *)w[L_K] + base, *Vc = (float *)w[L_V] + base;
                    memcpy(K + (int64_t)slot * hs, kh, sizeof(float) * hs);
                    memcpy(Vc + (int64_t)slot * hs, vh, sizeof(float) * hs);
                    for (int s = 0; s < n_keys; s++)
                        att[s] = dot(qh, K + (int64_t)s * hs, hs) * scale;
                    softmax(att, n_keys);
                    weigh_values(att, Vc, n_keys, hs, y + (int64_t)b * C + hd * hs);
                }
            }
            float *mixed = y;
            if (w[L_PROJ_WT]) {
                linear(y, B, C, MAT(w, L_PROJ), w[L_PROJ_B], C, h, threads, big, kind);
                mixed = h;
            }
            for (int64_t i = 0; i < (int64_t)B * C; i++) x[i] += mixed[i];
            if (w[L_FC_WT]) {
                for (int b = 0; b < B; b++)
                    norm(normk, x + (int64_t)b * C, w[L_LN2_W], w[L_LN2_B], eps, C,
                         xn + (int64_t)b * C);
                linear(xn, B, C, MAT(w, L_FC), w[L_FC_B], H, h, threads, big, kind);
                for (int64_t i = 0; i < (int64_t)B * H; i++) h[i] = activate(act, h[i]);
                if (w[L_MPROJ_WT]) {
                    linear(h, B, H, MAT(w, L_MPROJ), w[L_MPROJ_B], C, y, threads, big, kind);
                    for (int64_t i = 0; i < (int64_t)B * C; i++) x[i] += y[i];
                } else {
                    for (int64_t i = 0; i < (int64_t)B * C; i++) x[i] += h[i];
                }
            }
        }
        for (int b = 0; b < B; b++)
            norm(normk, x + (int64_t)b * C, g[G_LNF_W], g[G_LNF_B], eps, C, xn + (int64_t)b * C);
        linear(xn, B, C, MAT(g, G_HEAD), g[G_HEAD_B], V, logits, threads, big, kind);
        for (int b = 0; b < B; b++) {
            float *lb = logits + (int64_t)b * V;
            if (cap > 0.0f)
                for (int i = 0; i < V; i++) lb[i] = cap * tanhf(lb[i] / cap);
            const int64_t row = (t - start) * batch + row0 + b;
            const float *nb = noise ? noise + row * V : NULL;
            seq[(row0 + b) * stride + t] = pick(lb, nb, V, params[P_TEMPERATURE], dims[D_TOP_K],
                                       params[P_TOP_P], scratch, order);
        }
    }
    return 0;
}
