/* chargpt's native decode loop: a pre-norm GPT's single-token steps and the draw of each next
 * token, for a whole run of tokens in one call from Python (loop.py checks every shape before
 * calling it; build.py builds this file with the machine's C compiler).
 *
 * At chargpt's sizes a token costs well under a megaflop, so a framework's per-operation cost
 * (dispatch, allocation, Python) dominates a decode step; written as plain loops over
 * contiguous float32 arrays the step costs about its arithmetic. Weight matrices arrive
 * transposed, (in, out), so that every product is a sum of scaled rows, vectorised over the
 * outputs without reordering any sum (kernels.h). The result is the eager step's arithmetic
 * up to rounding (summation order, exp and erf of the C library).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
/* Config, Norm, Linear, Layer, Model, Cache, Chunk and the NORM_*, ACT_* and W_* constants,
 * generated from structs.py's ctypes Structures (build.py writes the header; structs.header()
 * prints it) */
#include "structs.h"
#include "kernels.h"

/* y = norm(x) over n features, y may be x; n.weight, n.bias may be NULL (RMSNorm without
 * weight, no bias) */
static void norm(int kind, const float *x, Norm n, float eps, int len, float *y)
{
    const float *restrict w = n.weight, *restrict b = n.bias;
    if (kind == NORM_NONE) {
        if (y != x) memcpy(y, x, sizeof(float) * len);
        return;
    }
    float mean = 0.0f;
    if (kind == NORM_LAYERNORM) {
        for (int i = 0; i < len; i++) mean += x[i];
        mean /= len;
    }
    float var = 0.0f;
    for (int i = 0; i < len; i++) var += (x[i] - mean) * (x[i] - mean);
    const float r = 1.0f / sqrtf(var / len + eps);
    for (int i = 0; i < len; i++) {
        float v = (x[i] - mean) * r;
        if (w) v *= w[i];
        if (b) v += b[i];
        y[i] = v;
    }
}

/* x rotated by one rotary row: rot[0] = [cos | cos], rot[1] = [sin | -sin] (decode.py) */
static void rotate(float *restrict x, const float *restrict rot, int hs)
{
    float tmp[MAX_HEAD_DIM];
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
static int pick(float *logits, const float *noise, int V, const Config *c, float *scratch,
                int *order)
{
    const float temperature = c->temperature, top_p = c->top_p;
    const int top_k = c->top_k;
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

/* A call's work memory for its B rows, carved from Chunk.work */
typedef struct {
    float *x;       /* (B, C) the residual stream */
    float *xn;      /* (B, C) its normalised copy */
    float *qkv;     /* (B, 3C) */
    float *y;       /* (B, C) attention output, then a sub-layer's */
    float *h;       /* (B, max(H, C)) */
    float *logits;  /* (B, V) */
    float *att;     /* (T) one head's attention */
    float *scratch; /* (V) */
    int *order;     /* (2V) */
} State;

static int64_t widest(const Config *c) { return c->hidden > c->n_embd ? c->hidden : c->n_embd; }

/* floats of work memory a call needs (Chunk.work) */
int64_t chargpt_work_size(const Config *c)
{
    const int64_t B = c->batch, C = c->n_embd, V = c->vocab_size;
    return B * (3 * C + 3 * C + widest(c) + V) + c->max_len + 4 * V + 1024;
}

static State state_of(const Config *c, float *work, int64_t B)
{
    const int64_t C = c->n_embd, V = c->vocab_size;
    State s;
    s.x = work;
    s.xn = s.x + B * C;
    s.qkv = s.xn + B * C;
    s.y = s.qkv + B * 3 * C;
    s.h = s.y + B * C;
    s.logits = s.h + B * widest(c);
    s.att = s.logits + B * V;
    s.scratch = s.att + c->max_len;
    s.order = (int *)(s.scratch + V);
    return s;
}

/* the token before position t of row b of the call */
static int64_t token(const Chunk *ch, int b, int64_t t)
{
    return ch->seq[(ch->row0 + b) * ch->stride + t - 1];
}

/* s->y[b] = the attention of each row's token at position t (cache position pos) to the
 * cache's last n_keys positions, this token's key and value written at `slot` first */
static void attention(const Config *c, const Layer *l, float *K_l, float *V_l, const Chunk *ch,
                      int64_t t, int slot, int n_keys, State *s, int B)
{
    const int C = c->n_embd, nh = c->n_head, hs = c->head_dim, T = c->max_len;
    const float scale = c->attn_scale;
    for (int b = 0; b < B; b++) {
        float *q = s->qkv + (int64_t)b * 3 * C, *k = q + C, *v = k + C;
        if (l->ve)
            for (int i = 0; i < C; i++) v[i] += l->ve[token(ch, b, t) * C + i];
        for (int hd = 0; hd < nh; hd++) {
            float *qh = q + hd * hs, *kh = k + hd * hs, *vh = v + hd * hs;
            if (c->qk_norm) {
                norm(NORM_RMSNORM, qh, (Norm){NULL, NULL}, c->qk_eps, hs, qh);
                norm(NORM_RMSNORM, kh, (Norm){NULL, NULL}, c->qk_eps, hs, kh);
            }
            if (ch->rot) {
                rotate(qh, ch->rot + (t - ch->start) * 2 * hs, hs);
                rotate(kh, ch->rot + (t - ch->start) * 2 * hs, hs);
            }
            /* this layer's cache (batch, nh, T, hs): write the token, attend to n_keys */
            const int64_t base = (((int64_t)(ch->row0 + b) * nh + hd) * T) * hs;
            float *Kh = K_l + base, *Vh = V_l + base;
            memcpy(Kh + (int64_t)slot * hs, kh, sizeof(float) * hs);
            memcpy(Vh + (int64_t)slot * hs, vh, sizeof(float) * hs);
            for (int j = 0; j < n_keys; j++)
                s->att[j] = dot(qh, Kh + (int64_t)j * hs, hs) * scale;
            softmax(s->att, n_keys);
            weigh_values(s->att, Vh, n_keys, hs, s->y + (int64_t)b * C + hd * hs);
        }
    }
}

/* x += proj(attention(norm(x))), then x += mlp(norm(x)), for the call's B rows */
static void block(const Config *c, const Layer *l, float *K_l, float *V_l, const Chunk *ch,
                  int64_t t, int slot, int n_keys, State *s, int B)
{
    const int C = c->n_embd, H = c->hidden, threads = ch->threads;
    const int64_t n = (int64_t)B * C;
    for (int b = 0; b < B; b++)
        norm(c->norm, s->x + (int64_t)b * C, l->ln_1, c->norm_eps, C, s->xn + (int64_t)b * C);
    linear(s->xn, B, C, l->c_attn, 3 * C, s->qkv, c, threads);
    attention(c, l, K_l, V_l, ch, t, slot, n_keys, s, B);
    float *mixed = s->y;
    if (l->attn_proj.weight) {
        linear(s->y, B, C, l->attn_proj, C, s->h, c, threads);
        mixed = s->h;
    }
    for (int64_t i = 0; i < n; i++) s->x[i] += mixed[i];
    if (!l->c_fc.weight) return;
    for (int b = 0; b < B; b++)
        norm(c->norm, s->x + (int64_t)b * C, l->ln_2, c->norm_eps, C, s->xn + (int64_t)b * C);
    linear(s->xn, B, C, l->c_fc, H, s->h, c, threads);
    for (int64_t i = 0; i < (int64_t)B * H; i++) s->h[i] = activate(c->activation, s->h[i]);
    if (l->mlp_proj.weight) {
        linear(s->h, B, H, l->mlp_proj, C, s->y, c, threads);
        for (int64_t i = 0; i < n; i++) s->x[i] += s->y[i];
    } else {
        for (int64_t i = 0; i < n; i++) s->x[i] += s->h[i];
    }
}

/* FILL_BAD_CHUNK when the chunk's rows, tokens or positions lie outside the arrays Config
 * describes, FILL_PAST_POSITIONS when a position is past the learned ones, else 0: loop.py
 * refuses such calls before they are made; this keeps the arrays safe from any other caller */
static int check(const Config *c, const Model *m, const Chunk *ch)
{
    if (ch->row0 < 0 || ch->row0 > ch->row1 || ch->row1 > c->batch || ch->start < 1
        || ch->start > ch->end || ch->end > ch->stride || ch->pos < 0 || c->max_len < 1
        || ch->threads < 1)
        return FILL_BAD_CHUNK;
    if (m->wpe && ch->pos + (ch->end - ch->start) > c->n_positions) return FILL_PAST_POSITIONS;
    return 0;
}

/* Samples seq[b, start:end] for the chunk's rows, each token from the one before it and the
 * KV cache (see Chunk in structs.py). Rows never interact, so callers may run disjoint row
 * ranges at once, each with its own work memory; Chunk.threads more split each big product
 * (where built with OpenMP). Returns 0, or a FILL_* error. */
int chargpt_fill(const Config *c, const Model *m, const Cache *kv, const Chunk *ch)
{
    const int C = c->n_embd, V = c->vocab_size, T = c->max_len, B = ch->row1 - ch->row0;
    const int refused = check(c, m, ch);
    if (refused) return refused;
    State s = state_of(c, ch->work, B);
    int64_t pos = ch->pos;
    for (int64_t t = ch->start; t < ch->end; t++, pos++) {
        const int slot = (int)(pos % T), n_keys = pos + 1 < T ? (int)(pos + 1) : T;
        for (int b = 0; b < B; b++) {
            const int64_t tok = token(ch, b, t);
            if (tok < 0 || tok >= V) return FILL_BAD_TOKEN;
            memcpy(s.x + (int64_t)b * C, m->wte + tok * C, sizeof(float) * C);
            if (m->wpe)
                for (int i = 0; i < C; i++) s.x[(int64_t)b * C + i] += m->wpe[pos * C + i];
        }
        for (int l = 0; l < c->n_layer; l++)
            block(c, &m->layers[l], kv->k[l], kv->v[l], ch, t, slot, n_keys, &s, B);
        for (int b = 0; b < B; b++)
            norm(c->norm, s.x + (int64_t)b * C, m->ln_f, c->norm_eps, C, s.xn + (int64_t)b * C);
        linear(s.xn, B, C, m->lm_head, V, s.logits, c, ch->threads);
        for (int b = 0; b < B; b++) {
            float *lb = s.logits + (int64_t)b * V;
            const float cap = c->logit_softcap;
            if (cap > 0.0f)
                for (int i = 0; i < V; i++) lb[i] = cap * tanhf(lb[i] / cap);
            const int64_t row = (t - ch->start) * c->batch + ch->row0 + b;
            const float *nb = ch->noise ? ch->noise + row * V : NULL;
            ch->seq[(ch->row0 + b) * ch->stride + t] = pick(lb, nb, V, c, s.scratch, s.order);
        }
    }
    return 0;
}
