/* The glue between the matmuls of one decode step (one token, batch 1), in C.
 *
 * At one token per step the matmuls are a few hundred microseconds per layer, and the ~40
 * small torch ops around them (norms, rope, cache writes, attention, SwiGLU) cost as much
 * again in dispatch alone. These functions replace them, and fs_block_one runs a whole
 * block; model.py calls them only for a single row, and keeps the torch path for prefill
 * and for dense weights.
 * Float32 math, the same formulas as model.py (rotate-half rope, softmax with max shift);
 * the KV cache holds IEEE half floats (kv_cache.KV_DTYPE), widened as they are read.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef _Float16 kv_t;  /* GCC >= 12 and clang on x86-64/arm64 */
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#endif

/* q . k for one cached key (the compilers do not vectorize _Float16 widening themselves) */
static inline float dot_kv(const float *q, const kv_t *k, int n) {
    float dot = 0.f;
    int i = 0;
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i))), acc);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    dot = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#endif
    for (; i < n; i++) dot += q[i] * (float)k[i];
    return dot;
}

/* o += p * v for one cached value */
static inline void axpy_kv(float *o, float p, const kv_t *v, int n) {
    int i = 0;
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    const __m256 pv = _mm256_set1_ps(p);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(o + i, _mm256_fmadd_ps(pv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + i))), _mm256_loadu_ps(o + i)));
#endif
    for (; i < n; i++) o[i] += p * (float)v[i];
}

/* out[r][i] = x[r][i] * w[i] / sqrt(mean_i(x[r]^2) + eps), r < rows; out may be x. */
void fs_rmsnorm(const float *x, const float *w, float *out, int rows, int n, float eps) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * n;
        float *o = out + (size_t)r * n;
        double ss = 0.0;
        #pragma omp simd reduction(+:ss)
        for (int i = 0; i < n; i++) ss += (double)xr[i] * xr[i];
        const float inv = (float)(1.0 / sqrt(ss / n + eps));
        for (int i = 0; i < n; i++) o[i] = xr[i] * inv * w[i];
    }
}

/* out[i] = silu(gu[i]) * gu[n + i]: gate and up side by side, as the fused projection gives them. */
void fs_swiglu(const float *gu, float *out, int n) {
    for (int i = 0; i < n; i++) {
        const float g = gu[i];
        out[i] = g / (1.0f + expf(-g)) * gu[n + i];
    }
}

#if defined(__AVX512F__)
/* One head of one token over its T cached keys in 512-bit vectors, NV vectors of sixteen
 * floats a head (hd = 16 NV): the query in registers, a key's dot product NV fmas and one
 * reduction, and the weighted values summed in registers (two sets, even and odd keys) rather
 * than through o in memory (a store-to-load chain per key). s: [T] scratch; o: [16 NV]. */
static inline __attribute__((always_inline)) void head_512(const float *q, const kv_t *k, const kv_t *v, int T,
                                                           float scale, float *s, float *o, const int NV) {
    __m512 qv[8], a[8], b[8];
    for (int c = 0; c < NV; c++) qv[c] = _mm512_loadu_ps(q + 16 * c);
    float best = -INFINITY;
    for (int t = 0; t < T; t++) {
        const kv_t *kt = k + (size_t)t * 16 * NV;
        __m512 acc = _mm512_mul_ps(qv[0], _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)kt)));
        for (int c = 1; c < NV; c++)
            acc = _mm512_fmadd_ps(qv[c], _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kt + 16 * c))), acc);
        s[t] = _mm512_reduce_add_ps(acc) * scale;
        if (s[t] > best) best = s[t];
    }
    float sum = 0.f;
    for (int t = 0; t < T; t++) { s[t] = expf(s[t] - best); sum += s[t]; }
    for (int c = 0; c < NV; c++) a[c] = b[c] = _mm512_setzero_ps();
    int t = 0;
    for (; t + 2 <= T; t += 2) {
        const __m512 p0 = _mm512_set1_ps(s[t]), p1 = _mm512_set1_ps(s[t + 1]);
        const kv_t *v0 = v + (size_t)t * 16 * NV, *v1 = v0 + 16 * NV;
        for (int c = 0; c < NV; c++) {
            a[c] = _mm512_fmadd_ps(p0, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v0 + 16 * c))), a[c]);
            b[c] = _mm512_fmadd_ps(p1, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v1 + 16 * c))), b[c]);
        }
    }
    if (t < T) {
        const __m512 p0 = _mm512_set1_ps(s[t]);
        for (int c = 0; c < NV; c++)
            a[c] = _mm512_fmadd_ps(p0, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + (size_t)t * 16 * NV + 16 * c))), a[c]);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sum);
    for (int c = 0; c < NV; c++) _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(_mm512_add_ps(a[c], b[c]), inv));
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define GROUP_HEADS_256 1
/* The eight lanes' horizontal sums of a[0..7], lane h of the result a[h]'s */
static inline __m256 sums8(const __m256 *a) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* G query heads that read one kv head (grouped-query attention; G <= 8) of one token over its
 * T cached keys, in 256-bit vectors: each cached key and value is widened once for all G
 * heads, and G dot products run side by side (a head at a time, each key's dot product was
 * one chain of dependent fmas and its values went through o in memory). q: the G heads, hd
 * apart (hd a multiple of 8); s: [T][G] scratch, a key's G scores side by side; o: the G
 * heads' outputs, hd apart. */
static inline __attribute__((always_inline)) void group_heads_256(const float *q, const kv_t *k, const kv_t *v, int T,
                                                                  int hd, float scale, float *s, float *o, const int G) {
    const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(G), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 best = _mm256_set1_ps(-INFINITY);
    for (int t = 0; t < T; t++) {
        __m256 a[8];
        for (int h = 0; h < 8; h++) a[h] = _mm256_setzero_ps();
        const kv_t *kt = k + (size_t)t * hd;
        for (int c = 0; c < hd; c += 8) {
            const __m256 kv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kt + c)));
            for (int h = 0; h < G; h++) a[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (size_t)h * hd + c), kv, a[h]);
        }
        const __m256 st = _mm256_mul_ps(sums8(a), _mm256_set1_ps(scale));
        best = _mm256_max_ps(best, st);
        _mm256_maskstore_ps(s + (size_t)t * G, lanes, st);
    }
    float e[8], sum[8] = {0};
    _mm256_storeu_ps(e, best);
    for (int t = 0; t < T; t++)
        for (int h = 0; h < G; h++) {
            float *p = s + (size_t)t * G + h;
            *p = expf(*p - e[h]);
            sum[h] += *p;
        }
    for (int c = 0; c < hd; c += 8) {
        __m256 a[8];
        for (int h = 0; h < G; h++) a[h] = _mm256_setzero_ps();
        for (int t = 0; t < T; t++) {
            const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + (size_t)t * hd + c)));
            for (int h = 0; h < G; h++) a[h] = _mm256_fmadd_ps(_mm256_broadcast_ss(s + (size_t)t * G + h), vv, a[h]);
        }
        for (int h = 0; h < G; h++) _mm256_storeu_ps(o + (size_t)h * hd + c, _mm256_mul_ps(a[h], _mm256_set1_ps(1.0f / sum[h])));
    }
}

/* The heads h0 .. h0 + n of one kv group, eight, four, two or one at a time */
static void group_heads(const float *q, const kv_t *k, const kv_t *v, int T, int hd, float scale, float *s,
                        float *o, int n) {
    for (int h = 0; h < n;) {
        const int G = n - h >= 8 ? 8 : n - h >= 4 ? 4 : n - h >= 2 ? 2 : 1;
        const size_t at = (size_t)h * hd;
        if (G == 8) group_heads_256(q + at, k, v, T, hd, scale, s + (size_t)h * T, o + at, 8);
        else if (G == 4) group_heads_256(q + at, k, v, T, hd, scale, s + (size_t)h * T, o + at, 4);
        else if (G == 2) group_heads_256(q + at, k, v, T, hd, scale, s + (size_t)h * T, o + at, 2);
        else group_heads_256(q + at, k, v, T, hd, scale, s + (size_t)h * T, o + at, 1);
        h += G;
    }
}
#endif

static void rope(float *x, const float *cos, const float *sin, int hd) {
    const int half = hd / 2;
    for (int i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* Rope in place over a prompt's rows: row s (x + s * row_stride) holds `heads` heads of hd
 * floats (q or k as the fused projection leaves them), at the position of cos[s], sin[s] ([hd]
 * each). The same arithmetic as one token's (fs_attend_one). Returns 0, or -1 on bad sizes. */
int fs_rope_rows(float *x, long row_stride, int rows, int heads, int hd, const float *cos, const float *sin) {
    if (rows < 0 || heads <= 0 || hd <= 0 || hd % 2 != 0 || row_stride < (long)heads * hd) return -1;
    for (int s = 0; s < rows; s++)
        for (int h = 0; h < heads; h++)
            rope(x + (size_t)s * row_stride + (size_t)h * hd, cos + (size_t)s * hd, sin + (size_t)s * hd, hd);
    return 0;
}

/* One token of attention for one layer.
 *   qkv   [n_heads*hd | n_kv*hd | n_kv*hd]: this token's projections (biases added); q and
 *         k are rotated in place
 *   cos, sin [hd]: rope at position pos
 *   kc, vc [n_kv][cap][hd] half floats: this layer's cache; row pos is written, rows 0..pos are read
 *   out   [n_heads*hd]
 * Grouped-query: head h reads kv head h / (n_heads / n_kv). Returns 0, or -1 on bad sizes. */
int fs_attend_one(float *qkv, const float *cos, const float *sin, kv_t *kc, kv_t *vc, int cap, int pos,
                  int n_heads, int n_kv, int hd, float *out, float *scratch, int nthreads) {
    if (pos < 0 || pos >= cap || n_kv <= 0 || n_heads % n_kv != 0 || hd % 2 != 0) return -1;
    float *q = qkv, *k = qkv + (size_t)n_heads * hd, *v = k + (size_t)n_kv * hd;
    for (int h = 0; h < n_heads; h++) rope(q + (size_t)h * hd, cos, sin, hd);
    for (int g = 0; g < n_kv; g++) {
        rope(k + (size_t)g * hd, cos, sin, hd);
        kv_t *kd = kc + ((size_t)g * cap + pos) * hd, *vd = vc + ((size_t)g * cap + pos) * hd;
        for (int i = 0; i < hd; i++) { kd[i] = (kv_t)k[(size_t)g * hd + i]; vd[i] = (kv_t)v[(size_t)g * hd + i]; }
    }
    const int group = n_heads / n_kv, T = pos + 1;
    const float scale = 1.0f / sqrtf((float)hd);
    /* scratch: [n_heads][T] scores */
#if defined(GROUP_HEADS_256)
    if (hd % 8 == 0) {  /* a kv group's heads together, a group a thread */
        #pragma omp parallel for num_threads(nthreads) schedule(static) if ((size_t)T * n_heads * hd > 65536)
        for (int g = 0; g < n_kv; g++)
            group_heads(q + (size_t)g * group * hd, kc + (size_t)g * cap * hd, vc + (size_t)g * cap * hd, T, hd, scale,
                        scratch + (size_t)g * group * T, out + (size_t)g * group * hd, group);
        return 0;
    }
#endif
    #pragma omp parallel for num_threads(nthreads) schedule(static) if ((size_t)T * n_heads * hd > 65536)
    for (int h = 0; h < n_heads; h++) {
        const float *qh = q + (size_t)h * hd;
        const kv_t *kg = kc + (size_t)(h / group) * cap * hd, *vg = vc + (size_t)(h / group) * cap * hd;
        float *s = scratch + (size_t)h * T, *o = out + (size_t)h * hd;
#if defined(__AVX512F__)
        if (hd == 64 || hd == 128) {  /* the common head sizes, their vectors in registers */
            if (hd == 64) head_512(qh, kg, vg, T, scale, s, o, 4);
            else head_512(qh, kg, vg, T, scale, s, o, 8);
            continue;
        }
#endif
        float best = -INFINITY;
        for (int t = 0; t < T; t++) {
            s[t] = dot_kv(qh, kg + (size_t)t * hd, hd) * scale;
            if (s[t] > best) best = s[t];
        }
        float sum = 0.f;
        for (int t = 0; t < T; t++) { s[t] = expf(s[t] - best); sum += s[t]; }
        const float inv = 1.0f / sum;
        for (int i = 0; i < hd; i++) o[i] = 0.f;
        for (int t = 0; t < T; t++) axpy_kv(o, s[t] * inv, vg + (size_t)t * hd, hd);
    }
    return 0;
}

/* ---- one decoder block for one token, in one call ----------------------------------------
 * Per layer the Python side made ~10 calls (norms, projections, attention, SwiGLU, residual
 * adds, output buffers); at one token per step their dispatch cost as much as a small
 * model's matmuls. The block is described once (fs_block, filled by kernels/__init__.py)
 * and run here with the same functions and order as Block.forward_one. */

int fs_qmatmul_multi(int count, const int *fmts, const int *groups, const uint8_t *const *ws,
                     const long *strides, const int *ns, int K, const float *x, int M, float *y, int nthreads,
                     const long *w_bytes);

typedef struct {  /* matrices that read the same input, outputs side by side */
    int count, k;
    int fmts[8], groups[8], ns[8];
    const uint8_t *ws[8];
    long strides[8];
} fs_mats;

typedef struct {
    int dim, n_heads, n_kv, hd, ffn;
    float eps;
    const float *attn_norm, *ffn_norm;  /* [dim] */
    const float *q_norm, *k_norm;       /* [hd] per-head norms (qwen3), or NULL */
    const float *qkv_bias;              /* [(n_heads + 2 n_kv) hd] (qwen2), or NULL */
    fs_mats qkv, wo, gate_up, down;
    long nbytes[4][8];                  /* the bytes at each matrix's ws[j]: qkv, wo, gate_up, down
                                           (last: an older build reads the fields above only) */
} fs_block;

static int run_mats(const fs_block *b, const fs_mats *m, const float *x, int rows, float *y, int nthreads) {
    const long *nbytes = b->nbytes[m == &b->qkv ? 0 : m == &b->wo ? 1 : m == &b->gate_up ? 2 : 3];
    return fs_qmatmul_multi(m->count, m->fmts, m->groups, m->ws, m->strides, m->ns, m->k, x, rows, y, nthreads,
                            nbytes);
}

static long mats_rows(const fs_mats *m) {
    long n = 0;
    for (int j = 0; j < m->count && j < 8; j++) n += m->ns[j];
    return n;
}

/* A mixture's block (its FFN's matrices are the router's pick, kernels.ExpertMatmuls) is
 * described by its attention alone: ffn 0, no gate_up or down. fs_block_attend runs it. */
static int attention_only(const fs_block *b) {
    return b->ffn == 0 && b->gate_up.count == 0 && b->down.count == 0;
}

/* 0 when the block's sizes agree with each other: every matrix reads what the one before
 * it wrote (a model file whose config and tensors disagree would have the kernels read and
 * write past the work buffer), and the head sizes make sense; -1 otherwise. */
static int block_sizes_agree(const fs_block *b) {
    const long D = b->dim, H = b->n_heads, Hkv = b->n_kv, hd = b->hd, F = b->ffn, limit = 1L << 24;
    const int ffn = !attention_only(b);
    if (D <= 0 || H <= 0 || Hkv <= 0 || hd <= 0 || (ffn && F <= 0) || D > limit || H * hd > limit || F > limit) return -1;
    if (H % Hkv != 0 || hd % 2 != 0) return -1;
    const fs_mats *all[4] = { &b->qkv, &b->wo, &b->gate_up, &b->down };
    for (int i = 0; i < (ffn ? 4 : 2); i++)
        if (all[i]->count < 1 || all[i]->count > 8) return -1;
    if (b->qkv.k != D || mats_rows(&b->qkv) != (H + 2 * Hkv) * hd) return -1;
    if (b->wo.k != H * hd || mats_rows(&b->wo) != D) return -1;
    if (ffn && (b->gate_up.k != D || b->gate_up.count != 2 || b->gate_up.ns[0] != F || b->gate_up.ns[1] != F)) return -1;
    if (ffn && (b->down.k != F || mats_rows(&b->down) != D)) return -1;
    if (!b->attn_norm || !b->ffn_norm || (b->q_norm == NULL) != (b->k_norm == NULL)) return -1;
    return 0;
}

/* x [dim] in place: x += attn(norm(x)); x += ffn(norm(x)). kc, vc, cap, pos as fs_attend_one.
 * work: work_floats >= fs_block_work_floats(b, cap) floats. Returns 0, or < 0 on bad
 * arguments (-1: the block's sizes disagree, or too little work room). */
long fs_block_work_floats(const fs_block *b, int cap) {
    if (block_sizes_agree(b) != 0 || cap < 0) return -1;
    return 2L * b->dim + (long)(2 * b->n_heads + 2 * b->n_kv) * b->hd + 3L * b->ffn + (long)b->n_heads * cap;
}


/* ---- one decoder block for one token of each of M sessions ------------------------------
 * The serving loop's batched decode step: row r of x is session r's newest token, at
 * position poss[r] of its own cache (kcs[r], vcs[r], caps[r] as fs_attend_one's; cos/sin
 * rows at that position). The projections run as one M-row product, so each weight block is
 * read and decoded once for all sessions; attention runs per session. Every row gets the
 * operations fs_block_one gives it, in its order: the same bits as a step of its own.
 * work: fs_block_batch_work_floats(b, M, largest cap) floats. */
static long block_row_floats(const fs_block *b) {
    return 2L * b->dim + (long)(2 * b->n_heads + 2 * b->n_kv) * b->hd + 3L * b->ffn;
}

/* Each row's attention after its projection: the qkv bias, qwen3's per-head norms, rope, its
 * cache write and its heads (fs_attend_one), row after row. qkv: [M][(n_heads + 2 n_kv) hd]. */
static int attend_each(const fs_block *b, int M, float *qkv, kv_t *const *kcs, kv_t *const *vcs, const int *caps,
                       const int *poss, const float *const *coss, const float *const *sins, float *heads,
                       float *scores, int nthreads) {
    const long q_dim = (long)b->n_heads * b->hd, qkv_dim = q_dim + 2L * b->n_kv * b->hd;
    for (int r = 0; r < M; r++) {
        float *row = qkv + (size_t)r * qkv_dim;
        if (b->qkv_bias) for (long i = 0; i < qkv_dim; i++) row[i] += b->qkv_bias[i];
        if (b->q_norm) {
            fs_rmsnorm(row, b->q_norm, row, b->n_heads, b->hd, b->eps);
            fs_rmsnorm(row + q_dim, b->k_norm, row + q_dim, b->n_kv, b->hd, b->eps);
        }
        if (fs_attend_one(row, coss[r], sins[r], kcs[r], vcs[r], caps[r], poss[r], b->n_heads, b->n_kv, b->hd,
                          heads + (size_t)r * q_dim, scores, nthreads) != 0) return -1;
    }
    return 0;
}

long fs_block_batch_work_floats(const fs_block *b, int M, int max_cap) {
    if (block_sizes_agree(b) != 0 || attention_only(b) || M < 1 || max_cap < 0) return -1;
    return M * block_row_floats(b) + (long)b->n_heads * max_cap;
}

/* Rows x [M][dim] through the block's attention, in place: x += wo(attention(attn_norm(x))),
 * then h = ffn_norm(x) for the FFN. qkv, heads, o, scores: fs_block_batch's work. */
static int attention_rows(const fs_block *b, int M, float *x, float *h, float *qkv, float *heads, float *o,
                          float *scores, kv_t *const *kcs, kv_t *const *vcs, const int *caps, const int *poss,
                          const float *const *coss, const float *const *sins, int nthreads) {
    const int D = b->dim;
    fs_rmsnorm(x, b->attn_norm, h, M, D, b->eps);
    if (run_mats(b, &b->qkv, h, M, qkv, nthreads) != 0) return -2;
    if (attend_each(b, M, qkv, kcs, vcs, caps, poss, coss, sins, heads, scores, nthreads) != 0) return -3;
    if (run_mats(b, &b->wo, heads, M, o, nthreads) != 0) return -4;
    for (size_t i = 0; i < (size_t)M * D; i++) x[i] += o[i];
    fs_rmsnorm(x, b->ffn_norm, h, M, D, b->eps);
    return 0;
}

int fs_block_one(const fs_block *b, float *x, kv_t *kc, kv_t *vc, int cap, int pos, const float *cos,
                 const float *sin, float *work, int nthreads, long work_floats) {
    const long need = fs_block_work_floats(b, cap);
    if (need < 0 || work_floats < need || attention_only(b)) return -1;
    const int q_dim = b->n_heads * b->hd, qkv_dim = q_dim + 2 * b->n_kv * b->hd;
    float *h = work, *qkv = h + b->dim, *heads = qkv + qkv_dim, *o = heads + q_dim;
    float *gu = o + b->dim, *act = gu + 2 * b->ffn, *scores = act + b->ffn;
    const int rc = attention_rows(b, 1, x, h, qkv, heads, o, scores, &kc, &vc, &cap, &pos, &cos, &sin, nthreads);
    if (rc != 0) return rc;
    if (run_mats(b, &b->gate_up, h, 1, gu, nthreads) != 0) return -5;
    fs_swiglu(gu, act, b->ffn);
    if (run_mats(b, &b->down, act, 1, o, nthreads) != 0) return -6;
    for (int i = 0; i < b->dim; i++) x[i] += o[i];
    return 0;
}

/* One token of a mixture's block (attention_only) up to its experts: x [dim] += its attention
 * (as fs_block_one's first half), normed [dim] = ffn_norm(x), what the router and the chosen
 * experts read. kc, vc, cap, pos, cos, sin as fs_attend_one's; work: fs_block_work_floats(b,
 * cap) floats. Returns 0, or < 0 on bad arguments. */
int fs_block_attend(const fs_block *b, float *x, float *normed, kv_t *kc, kv_t *vc, int cap, int pos,
                    const float *cos, const float *sin, float *work, int nthreads, long work_floats) {
    const long need = fs_block_work_floats(b, cap);
    if (need < 0 || work_floats < need || !attention_only(b)) return -1;
    const long q_dim = (long)b->n_heads * b->hd, qkv_dim = q_dim + 2L * b->n_kv * b->hd;
    float *h = work, *qkv = h + b->dim, *heads = qkv + qkv_dim, *o = heads + q_dim, *scores = o + b->dim;
    const int rc = attention_rows(b, 1, x, h, qkv, heads, o, scores, &kc, &vc, &cap, &pos, &cos, &sin, nthreads);
    if (rc != 0) return rc;
    memcpy(normed, h, sizeof(float) * (size_t)b->dim);
    return 0;
}

int fs_block_batch(const fs_block *b, int M, float *x, kv_t *const *kcs, kv_t *const *vcs, const int *caps,
                   const int *poss, const float *const *coss, const float *const *sins, float *work, int nthreads,
                   long work_floats) {
    if (M < 1) return -1;
    int max_cap = 0;
    for (int r = 0; r < M; r++) max_cap = caps[r] > max_cap ? caps[r] : max_cap;
    const long need = fs_block_batch_work_floats(b, M, max_cap);
    if (need < 0 || work_floats < need) return -1;
    const int q_dim = b->n_heads * b->hd, qkv_dim = q_dim + 2 * b->n_kv * b->hd, D = b->dim, F = b->ffn;
    float *h = work, *qkv = h + (size_t)M * D, *heads = qkv + (size_t)M * qkv_dim, *o = heads + (size_t)M * q_dim;
    float *gu = o + (size_t)M * D, *act = gu + (size_t)M * 2 * F, *scores = act + (size_t)M * F;
    const int rc = attention_rows(b, M, x, h, qkv, heads, o, scores, kcs, vcs, caps, poss, coss, sins, nthreads);
    if (rc != 0) return rc;
    if (run_mats(b, &b->gate_up, h, M, gu, nthreads) != 0) return -5;
    for (int r = 0; r < M; r++) fs_swiglu(gu + (size_t)r * 2 * F, act + (size_t)r * F, F);
    if (run_mats(b, &b->down, act, M, o, nthreads) != 0) return -6;
    for (size_t i = 0; i < (size_t)M * D; i++) x[i] += o[i];
    return 0;
}

/* ---- one decoder block over a tensor-parallel group ----------------------------------------
 * Each machine of the group holds a slice of every layer: its query heads with their KV heads
 * (and those heads' cache), its FFN columns, and its rows of wo and down. Every matrix is split
 * by output rows, so every output element is computed whole, from the whole input, on one
 * machine: the four all-gathers (attention output, wo's output, the SwiGLU activation, down's
 * output) give every machine the same rows, and the step is bit for bit fs_block_batch's (the
 * kernels compute each output row from its own weights and the whole quantized input, at any
 * row offset that keeps the x8 row groups whole). x: [M][dim], the same on every machine.
 * mesh: fs_mesh (mesh.c), NULL for a group of one. */
#define FS_TP_MAX 64

typedef struct fs_mesh fs_mesh;
int fs_mesh_allgather_rows(fs_mesh *m, const float *mine, float *full, int M, const int *at, float *scratch,
                           int timeout_ms);

typedef struct {
    fs_block b;                   /* this machine's slice: n_heads, n_kv, ffn are its own, dim the model's;
                                     wo and down: its rows of their output */
    int ranks, rank, timeout_ms;
    int heads_at[FS_TP_MAX + 1];  /* each machine's floats of the attention output (n_heads hd of it) */
    int dim_at[FS_TP_MAX + 1];    /* each machine's rows of wo and down */
    int ffn_at[FS_TP_MAX + 1];    /* each machine's FFN columns */
} fs_tp_block;

static int spans_ok(const int *at, int n, long total) {
    if (at[0] != 0 || at[n] != total) return -1;
    for (int r = 0; r < n; r++) if (at[r + 1] < at[r]) return -1;
    return 0;
}

static int tp_sizes_agree(const fs_tp_block *t) {
    const fs_block *b = &t->b;
    if (t->ranks < 1 || t->ranks > FS_TP_MAX || t->rank < 0 || t->rank >= t->ranks) return -1;
    const long D = b->dim, hd = b->hd, limit = 1L << 24, r = t->rank;
    const long H_all = t->heads_at[t->ranks], F_all = t->ffn_at[t->ranks];
    if (D <= 0 || hd <= 0 || hd % 2 != 0 || b->n_heads < 0 || b->n_kv < 0 || D > limit || H_all > limit || F_all > limit)
        return -1;
    if (spans_ok(t->heads_at, t->ranks, H_all) || spans_ok(t->dim_at, t->ranks, D) || spans_ok(t->ffn_at, t->ranks, F_all))
        return -1;
    if (H_all <= 0 || F_all <= 0 || t->heads_at[r + 1] - t->heads_at[r] != (long)b->n_heads * hd) return -1;
    if (t->ffn_at[r + 1] - t->ffn_at[r] != b->ffn || t->dim_at[r + 1] - t->dim_at[r] <= 0 || b->ffn <= 0) return -1;
    if (b->n_heads > 0) {
        if (b->n_kv <= 0 || b->n_heads % b->n_kv != 0) return -1;
        if (b->qkv.count < 1 || b->qkv.count > 8 || b->qkv.k != D || mats_rows(&b->qkv) != (b->n_heads + 2L * b->n_kv) * hd)
            return -1;
    } else if (b->n_kv != 0) return -1;
    const long rows = t->dim_at[r + 1] - t->dim_at[r];
    if (b->wo.count < 1 || b->wo.count > 8 || b->wo.k != H_all || mats_rows(&b->wo) != rows) return -1;
    if (b->gate_up.k != D || b->gate_up.count != 2 || b->gate_up.ns[0] != b->ffn || b->gate_up.ns[1] != b->ffn) return -1;
    if (b->down.count < 1 || b->down.count > 8 || b->down.k != F_all || mats_rows(&b->down) != rows) return -1;
    if (!b->attn_norm || !b->ffn_norm || (b->q_norm == NULL) != (b->k_norm == NULL)) return -1;
    return 0;
}

long fs_tp_work_floats(const fs_tp_block *t, int M, int max_cap) {
    if (tp_sizes_agree(t) != 0 || M < 1 || max_cap < 0) return -1;
    const fs_block *b = &t->b;
    const long D = b->dim, hl = (long)b->n_heads * b->hd, qkv = hl + 2L * b->n_kv * b->hd;
    const long H_all = t->heads_at[t->ranks], F_all = t->ffn_at[t->ranks];
    const long rows = t->dim_at[t->rank + 1] - t->dim_at[t->rank];
    long widest = H_all > F_all ? H_all : F_all;
    if (D > widest) widest = D;
    /* h, qkv, heads (mine, all), o (mine, all), gate_up, act (mine, all), the gather's scratch */
    return M * (D + qkv + hl + H_all + rows + D + 3L * b->ffn + F_all + widest) + (long)b->n_heads * max_cap;
}

int fs_tp_block_batch(const fs_tp_block *t, fs_mesh *mesh, int M, float *x, kv_t *const *kcs, kv_t *const *vcs,
                      const int *caps, const int *poss, const float *const *coss, const float *const *sins,
                      float *work, int nthreads, long work_floats) {
    if (M < 1 || (t->ranks > 1 && !mesh)) return -1;
    int max_cap = 0;
    for (int r = 0; r < M; r++) max_cap = caps[r] > max_cap ? caps[r] : max_cap;
    const long need = fs_tp_work_floats(t, M, max_cap);
    if (need < 0 || work_floats < need) return -1;
    const fs_block *b = &t->b;
    const long D = b->dim, hl = (long)b->n_heads * b->hd, qkv_dim = hl + 2L * b->n_kv * b->hd, F = b->ffn;
    const long H_all = t->heads_at[t->ranks], F_all = t->ffn_at[t->ranks];
    const long rows = t->dim_at[t->rank + 1] - t->dim_at[t->rank];
    float *h = work, *qkv = h + M * D, *heads = qkv + M * qkv_dim, *heads_all = heads + M * hl;
    float *o = heads_all + M * H_all, *o_all = o + M * rows, *gu = o_all + M * D, *act = gu + M * 2 * F;
    float *act_all = act + M * F, *scratch = act_all + M * F_all;
    long widest = H_all > F_all ? H_all : F_all;
    if (D > widest) widest = D;
    float *scores = scratch + M * widest;
    int rc;
    fs_rmsnorm(x, b->attn_norm, h, M, (int)D, b->eps);
    if (b->n_heads > 0) {
        if (run_mats(b, &b->qkv, h, M, qkv, nthreads) != 0) return -2;
        if (attend_each(b, M, qkv, kcs, vcs, caps, poss, coss, sins, heads, scores, nthreads) != 0) return -3;
    }
    if ((rc = fs_mesh_allgather_rows(mesh, heads, heads_all, M, t->heads_at, scratch, t->timeout_ms))) return rc * 10;
    if (run_mats(b, &b->wo, heads_all, M, o, nthreads) != 0) return -4;
    if ((rc = fs_mesh_allgather_rows(mesh, o, o_all, M, t->dim_at, scratch, t->timeout_ms))) return rc * 10;
    for (long i = 0; i < M * D; i++) x[i] += o_all[i];
    fs_rmsnorm(x, b->ffn_norm, h, M, (int)D, b->eps);
    if (run_mats(b, &b->gate_up, h, M, gu, nthreads) != 0) return -5;
    for (int r = 0; r < M; r++) fs_swiglu(gu + (size_t)r * 2 * F, act + (size_t)r * F, (int)F);
    if ((rc = fs_mesh_allgather_rows(mesh, act, act_all, M, t->ffn_at, scratch, t->timeout_ms))) return rc * 10;
    if (run_mats(b, &b->down, act_all, M, o, nthreads) != 0) return -6;
    if ((rc = fs_mesh_allgather_rows(mesh, o, o_all, M, t->dim_at, scratch, t->timeout_ms))) return rc * 10;
    for (long i = 0; i < M * D; i++) x[i] += o_all[i];
    return 0;
}

/* Every layer of a step, in one call: blocks[l] with the caches of row r at layer l in
 * kcs/vcs/caps[l M + r]. The exchanges run inside; Python sees the step once. */
int fs_tp_forward(const fs_tp_block *const *blocks, int L, fs_mesh *mesh, int M, float *x, kv_t *const *kcs,
                  kv_t *const *vcs, const int *caps, const int *poss, const float *const *coss,
                  const float *const *sins, float *work, int nthreads, long work_floats) {
    if (L < 1 || M < 1) return -1;
    for (int l = 0; l < L; l++) {
        const long at = (long)l * M;
        const int rc = fs_tp_block_batch(blocks[l], mesh, M, x, kcs + at, vcs + at, caps + at, poss, coss, sins,
                                         work, nthreads, work_floats);
        if (rc) return rc;
    }
    return 0;
}
