/* Causal attention of a prompt's rows over the KV cache (prefill), in C.
 *
 * torch's CPU flash attention ran a 1B model's 512-token prompt at ~38 GFLOP/s on one Zen 5
 * core (28 ms a layer, a tenth of the prefill). Here, per kv head, the cached keys are widened
 * once into a transposed fp32 panel [hd][T] and the values into [T][hd]; then each head's
 * queries, four rows at a time, take scores against sixteen keys a vector (q broadcast,
 * fused multiply-adds), a softmax with the max taken off, and the weighted sum of values.
 * Rows see keys 0 .. pos + their index (the causal mask of a prompt after a cached prefix).
 * Written with GCC vector types: 512-bit vectors where the build has AVX-512, 256-bit ones
 * elsewhere (AVX2; plain C in the portable build). The kernels' accumulators fill the vector
 * registers of their width: with 512-bit vectors on AVX2 (two registers each) they spilled to
 * the stack, and a 1B's 512-token prompt spent 5 of its 16.6 s here on a Zen 3 core.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(_OPENMP)
#include <omp.h>
#endif

typedef _Float16 kv_t;  /* as decode.c: kv_cache.KV_DTYPE */
#if defined(__AVX512F__)
#define LANES 16
#define PV_VECS 4  /* value vectors a pass: ROWS x PV_VECS accumulators (16 of 32 registers) */
#else
#define LANES 8
#define PV_VECS 2  /* 8 of 16 registers */
#endif
typedef float vf __attribute__((vector_size(4 * LANES)));  /* a vector of LANES floats */
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

int fs_workspace(const size_t *sizes, uint8_t **parts, int count);  /* qmatmul.c */
void fs_workspace_trim(void);

#define ROWS 4   /* query rows per pass: four score vectors, one key panel load feeds them all */

static inline vf loadv(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void storev(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf splat(float x) { return (vf){0} + x; }

/* e^x for x <= 0 (scores less their max), Cephes' expf polynomial: ~1e-7 relative. Below
 * -87 (e^x under FLT_MIN) it returns e^-87; masked keys are zeroed by the caller. */
static inline vf exp_nonpositive(vf x) {
    const vi low = x < splat(-87.f);
    x = (vf)((low & (vi)splat(-87.f)) | (~low & (vi)x));
    const vf shifter = splat(12582912.f);  /* 1.5 * 2^23: adding it rounds to an integer */
    const vf t = x * 1.44269504f + shifter;
    const vi n = (vi)t - (vi)shifter;
    const vf nf = t - shifter;
    const vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    return (vf)((vi)p + (n << 23));
}

/* Rows i0 .. i0 + rows (rows <= ROWS) of one head: q [ROWS] rows q_stride apart (scaled by
 * 1/sqrt(hd); rows past `rows` are read but their results dropped), kt [hd][tp] and v [T][hd]
 * this head's kv group widened, s [ROWS][tp] scratch, out rows o_stride apart.
 * Row r sees keys 0 .. pos + i0 + r. */
static void head_rows(const float *q, long q_stride, int rows, int i0, int pos, int hd, const float *kt,
                      const float *v, int tp, float *s, float *out, long o_stride) {
    const int t_end = pos + i0 + rows;  /* keys the last of these rows sees */
    /* scores: two vectors of LANES keys x ROWS rows a pass, each key panel load feeding ROWS fmas */
    for (int t = 0; t < t_end; t += 2 * LANES) {
        vf a0[ROWS] = {0}, a1[ROWS] = {0};
        const int two = t + LANES < t_end;
        for (int d = 0; d < hd; d++) {
            const vf k0 = loadv(kt + (size_t)d * tp + t), k1 = two ? loadv(kt + (size_t)d * tp + t + LANES) : k0;
            for (int r = 0; r < ROWS; r++) {
                const vf qd = splat(q[(size_t)r * q_stride + d]);
                a0[r] += qd * k0;
                a1[r] += qd * k1;
            }
        }
        for (int r = 0; r < ROWS; r++) {
            storev(s + (size_t)r * tp + t, a0[r]);
            if (two) storev(s + (size_t)r * tp + t + LANES, a1[r]);
        }
    }
    const int t_pad = (t_end + LANES - 1) / LANES * LANES;
    float inv[ROWS];
    for (int r = 0; r < ROWS; r++) {  /* softmax of each row over the keys it sees; the rest zeroed */
        float *sr = s + (size_t)r * tp;
        const int n = r < rows ? pos + i0 + r + 1 : 0;
        float best = -INFINITY;
        for (int t = 0; t < n; t++) best = sr[t] > best ? sr[t] : best;
        vf sum = {0};
        for (int t = 0; t < t_pad; t += LANES) {
            vf e = exp_nonpositive(loadv(sr + t) - best);
            if (t + LANES > n) {  /* the masked keys (e^-87 from the polynomial) are exactly zero */
                for (int l = 0; l < LANES; l++) e[l] = t + l < n ? e[l] : 0.f;
            }
            storev(sr + t, e);
            sum += e;
        }
        float total = 0.f;
        for (int l = 0; l < LANES; l++) total += sum[l];
        inv[r] = n ? 1.f / total : 0.f;
    }
    /* out = p . v: PV_VECS vectors of columns of ROWS rows a pass, each value load feeding ROWS fmas */
    for (int j = 0; j < hd; j += PV_VECS * LANES) {
        const int vecs = hd - j < PV_VECS * LANES ? (hd - j) / LANES : PV_VECS;
        vf acc[ROWS][PV_VECS] = {{{0}}};
        for (int u = 0; u < t_end; u++) {
            const float *vu = v + (size_t)u * hd + j;
            for (int c = 0; c < vecs; c++) {
                const vf vv = loadv(vu + c * LANES);
                for (int r = 0; r < ROWS; r++) acc[r][c] += splat(s[(size_t)r * tp + u]) * vv;
            }
        }
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < vecs; c++) storev(out + (size_t)r * o_stride + j + c * LANES, acc[r][c] * inv[r]);
    }
}

/* Attention of S new tokens at positions pos .. pos + S - 1, whose keys and values are
 * already in the cache:
 *   q      [S] rows q_stride floats apart, each n_heads heads of hd (roped)
 *   kc, vc [n_kv][cap][hd] half floats, rows 0 .. pos + S - 1 filled
 *   out    [S][n_heads * hd]
 * Grouped-query: head h reads kv head h / (n_heads / n_kv). hd a multiple of 16.
 * Returns 0, -1 on bad sizes, -2 when memory runs out. */
int fs_attend_rows(const float *q, long q_stride, const kv_t *kc, const kv_t *vc, int cap, int pos, int S,
                   int n_heads, int n_kv, int hd, float *out, int nthreads) {
    if (S < 1 || pos < 0 || pos + S > cap || n_kv <= 0 || n_heads % n_kv != 0 || hd % 16 != 0
        || q_stride < (long)n_heads * hd) return -1;
    const int T = pos + S, tp = (T + LANES - 1) / LANES * LANES, group = n_heads / n_kv;
    const int threads = nthreads < 1 ? 1 : nthreads;
    const size_t per_kv = (size_t)hd * tp + (size_t)T * hd;
    const size_t sizes[3] = { sizeof(float) * per_kv * n_kv, sizeof(float) * (size_t)threads * ROWS * tp,
                              sizeof(float) * (size_t)((S + ROWS - 1) / ROWS * ROWS) * n_heads * hd };
    uint8_t *parts[3];
    if (!fs_workspace(sizes, parts, 3)) return -2;
    float *panels = (float *)parts[0], *scores = (float *)parts[1], *qs = (float *)parts[2];
    const float scale = 1.0f / sqrtf((float)hd);

    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int g = 0; g < n_kv; g++) {  /* widen kv head g: keys transposed (zero past T), values as they are */
            float *kt = panels + (size_t)g * per_kv, *v = kt + (size_t)hd * tp;
            const kv_t *kg = kc + (size_t)g * cap * hd, *vg = vc + (size_t)g * cap * hd;
            for (int d = 0; d < hd; d++) {
                for (int t = 0; t < T; t++) kt[(size_t)d * tp + t] = (float)kg[(size_t)t * hd + d];
                for (int t = T; t < tp; t++) kt[(size_t)d * tp + t] = 0.f;
            }
            for (size_t i = 0; i < (size_t)T * hd; i++) v[i] = (float)vg[i];
        }
        #pragma omp for schedule(static)
        for (int i = 0; i < (S + ROWS - 1) / ROWS * ROWS; i++)  /* queries scaled once, [S rounded up to ROWS][n_heads * hd] */
            for (int e = 0; e < n_heads * hd; e++)
                qs[(size_t)i * n_heads * hd + e] = i < S ? q[(size_t)i * q_stride + e] * scale : 0.f;
        const int blocks = (S + ROWS - 1) / ROWS;
        float *s = scores;
#if defined(_OPENMP)
        s += (size_t)omp_get_thread_num() * ROWS * tp;
#endif
        /* later rows see more keys: hand the (head, row block) pairs out one at a time, round robin */
        #pragma omp for schedule(static, 1)
        for (int item = 0; item < n_heads * blocks; item++) {
            const int h = item / blocks, b = item % blocks, i0 = b * ROWS;
            const int rows = S - i0 < ROWS ? S - i0 : ROWS;
            const float *kt = panels + (size_t)(h / group) * per_kv;
            head_rows(qs + (size_t)i0 * n_heads * hd + (size_t)h * hd, (long)n_heads * hd, rows, i0, pos, hd,
                      kt, kt + (size_t)hd * tp, tp, s, out + (size_t)i0 * n_heads * hd + (size_t)h * hd,
                      (long)n_heads * hd);
        }
    }
    fs_workspace_trim();
    return 0;
}
