/* Prefill products in fp32: y[M][ldy] (columns 0 .. count) = x[M][K] . W[n0 .. n0 + count][K]^T,
 * W dequantized on the fly, sixteen rows at a time, straight into the panels the inner
 * kernel reads.
 *
 * Before this, a long prompt dequantized each matrix into a 16 MiB scratch buffer and handed
 * it to torch's GEMM, which copied it again into its own packed layout (on Zen 3 the two
 * copies, the page faults of every fresh output and the waits between the calls were a third
 * of a 1B model's 512-token prefill). Here the dequantized weights never leave the cache:
 *   per thread, for each chunk of at most NC output columns (the same number of chunks each):
 *     dequantize its rows (fs_dequant_rows: exact to the format) and lay them out as panels
 *     B[p][K][16]: sixteen columns side by side per k;
 *     for each k block of KC: for each panel: for each six rows of x (packed once per call
 *     as A[kb][i][kc][6]): C[6][16] += A . B, in twelve 8-wide accumulators (AVX2 + FMA;
 *     plain C elsewhere).
 * Every row of y is the same chain of fused multiply-adds whatever M is and wherever the row
 * falls in a panel (the k order is fixed), so a prompt's rows come out bit for bit the same
 * alone or packed with another prompt's.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

int fs_dequant_rows(int fmt, int G, const uint8_t *w, long row_stride, int K, const int64_t *rows, int R,
                    float *out, int nthreads, long n_rows, long w_bytes);  /* qmatmul.c */

#define MR 6    /* rows of x per inner kernel call */
#define NR 16   /* output columns per panel */
#define KC 2048  /* k per block: a tile's partial sums leave the registers once per 2048 k (four times at
                     K = 8192, the next tile's prefetched); at 128 their reloads stalled the FMA
                     chains: 1B Q4_0 matrices ran ~10% slower */
#define NC 128  /* output columns a thread dequantizes at a time (NC x K floats: 1 MiB at K = 2048) */

/* c[MR][NR] (row stride ldc) = (first ? 0 : c) + a[kc][MR] . b[kc][NR] */
static void kernel_6x16(const float *a, const float *b, int kc, float *c, long ldc, int first) {
#if defined(__AVX2__) && defined(__FMA__)
    __m256 c0a, c0b, c1a, c1b, c2a, c2b, c3a, c3b, c4a, c4b, c5a, c5b;
    if (first) {
        c0a = c0b = c1a = c1b = c2a = c2b = c3a = c3b = c4a = c4b = c5a = c5b = _mm256_setzero_ps();
    } else {
        c0a = _mm256_loadu_ps(c + 0 * ldc), c0b = _mm256_loadu_ps(c + 0 * ldc + 8);
        c1a = _mm256_loadu_ps(c + 1 * ldc), c1b = _mm256_loadu_ps(c + 1 * ldc + 8);
        c2a = _mm256_loadu_ps(c + 2 * ldc), c2b = _mm256_loadu_ps(c + 2 * ldc + 8);
        c3a = _mm256_loadu_ps(c + 3 * ldc), c3b = _mm256_loadu_ps(c + 3 * ldc + 8);
        c4a = _mm256_loadu_ps(c + 4 * ldc), c4b = _mm256_loadu_ps(c + 4 * ldc + 8);
        c5a = _mm256_loadu_ps(c + 5 * ldc), c5b = _mm256_loadu_ps(c + 5 * ldc + 8);
    }
    for (int k = 0; k < kc; k++, a += MR, b += NR) {
        const __m256 ba = _mm256_load_ps(b), bb = _mm256_load_ps(b + 8);
        __m256 x = _mm256_broadcast_ss(a + 0);
        c0a = _mm256_fmadd_ps(x, ba, c0a), c0b = _mm256_fmadd_ps(x, bb, c0b);
        x = _mm256_broadcast_ss(a + 1);
        c1a = _mm256_fmadd_ps(x, ba, c1a), c1b = _mm256_fmadd_ps(x, bb, c1b);
        x = _mm256_broadcast_ss(a + 2);
        c2a = _mm256_fmadd_ps(x, ba, c2a), c2b = _mm256_fmadd_ps(x, bb, c2b);
        x = _mm256_broadcast_ss(a + 3);
        c3a = _mm256_fmadd_ps(x, ba, c3a), c3b = _mm256_fmadd_ps(x, bb, c3b);
        x = _mm256_broadcast_ss(a + 4);
        c4a = _mm256_fmadd_ps(x, ba, c4a), c4b = _mm256_fmadd_ps(x, bb, c4b);
        x = _mm256_broadcast_ss(a + 5);
        c5a = _mm256_fmadd_ps(x, ba, c5a), c5b = _mm256_fmadd_ps(x, bb, c5b);
    }
    _mm256_storeu_ps(c + 0 * ldc, c0a), _mm256_storeu_ps(c + 0 * ldc + 8, c0b);
    _mm256_storeu_ps(c + 1 * ldc, c1a), _mm256_storeu_ps(c + 1 * ldc + 8, c1b);
    _mm256_storeu_ps(c + 2 * ldc, c2a), _mm256_storeu_ps(c + 2 * ldc + 8, c2b);
    _mm256_storeu_ps(c + 3 * ldc, c3a), _mm256_storeu_ps(c + 3 * ldc + 8, c3b);
    _mm256_storeu_ps(c + 4 * ldc, c4a), _mm256_storeu_ps(c + 4 * ldc + 8, c4b);
    _mm256_storeu_ps(c + 5 * ldc, c5a), _mm256_storeu_ps(c + 5 * ldc + 8, c5b);
#else
    float acc[MR][NR];
    for (int r = 0; r < MR; r++)
        for (int j = 0; j < NR; j++) acc[r][j] = first ? 0.f : c[r * ldc + j];
    for (int k = 0; k < kc; k++, a += MR, b += NR)
        for (int r = 0; r < MR; r++)
            for (int j = 0; j < NR; j++) acc[r][j] += a[r] * b[j];
    for (int r = 0; r < MR; r++)
        for (int j = 0; j < NR; j++) c[r * ldc + j] = acc[r][j];
#endif
}

#if defined(__AVX512F__) && !defined(FS_NO_X16)
#define FS_GEMM_512 1  /* not where 512-bit vectors run as two halves (kernels/__init__.py half_width_512) */
/* Two tiles at once, rows 0..6 from a0 and 6..12 from a1 (two x panels), c[12][NR] at row
 * stride ldc: one 512-bit vector is a row's sixteen columns, twelve accumulators, so each
 * loaded panel row feeds twelve fmas (the 256-bit kernel: twelve fmas per two loads and six
 * broadcasts, at half the width). Each output is the same chain of fmas as kernel_6x16's. */
static void kernel_12x16(const float *a0, const float *a1, const float *b, int kc, float *c, long ldc, int first) {
    __m512 acc[2 * MR];
    for (int r = 0; r < 2 * MR; r++) acc[r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + r * ldc);
    for (int k = 0; k < kc; k++, a0 += MR, a1 += MR, b += NR) {
        const __m512 bv = _mm512_load_ps(b);
        for (int r = 0; r < MR; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(a0[r]), bv, acc[r]);
        for (int r = 0; r < MR; r++) acc[MR + r] = _mm512_fmadd_ps(_mm512_set1_ps(a1[r]), bv, acc[MR + r]);
    }
    for (int r = 0; r < 2 * MR; r++) _mm512_storeu_ps(c + r * ldc, acc[r]);
}
#endif

/* The tile of y at (m, n): whole, in place; at the edges of y through a full-size copy (the
 * same arithmetic, only the valid rows and columns written back). */
static void tile(const float *a, const float *b, int kc, float *y, long ldy, int rows, int cols, int first) {
    if (rows == MR && cols == NR) {
        kernel_6x16(a, b, kc, y, ldy, first);
        return;
    }
    float t[MR * NR];
    for (int r = 0; r < rows; r++) memcpy(t + r * NR, y + r * ldy, sizeof(float) * (first ? 0 : cols));
    kernel_6x16(a, b, kc, t, NR, first);
    for (int r = 0; r < rows; r++) memcpy(y + r * ldy, t + r * NR, sizeof(float) * cols);
}

/* A[kb][i][kc][MR] from x[M][K]: row 6i + r of x for r < MR (the last panel repeats row M - 1);
 * called by every thread of a parallel region */
static void pack_x(const float *x, int M, int K, int panels, float *A) {
    for (int k0 = 0; k0 < K; k0 += KC) {
        const int kc = K - k0 < KC ? K - k0 : KC;
        #pragma omp for schedule(static) nowait
        for (int i = 0; i < panels; i++) {
            float *dst = A + (size_t)k0 * panels * MR + (size_t)i * kc * MR;
            for (int r = 0; r < MR; r++) {
                const int m = MR * i + r < M ? MR * i + r : M - 1;
                const float *src = x + (size_t)m * K + k0;
                for (int k = 0; k < kc; k++) dst[k * MR + r] = src[k];
            }
        }
    }
}

enum { Q4_0X8 = 5, Q4_1X8 = 6, Q8X8 = 7, Q4_KX8 = 8, Q5_KX8 = 16, Q6_KX8 = 17 };  /* qmatmul.c's x8 formats */

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
/* Panel dst[K][NR] of the sixteen rows in x8 groups g0 and g1 (qmatmul.c's x8 layout: chunk
 * c holds bytes 2c, 2c + 1 of row r's block at 2r, 2r + 1, so a chunk's even bytes are eight
 * rows' weight 2c, its odd bytes their weight 2c + 1), eight rows per vector as they lie:
 * the values fs_dequant_rows gives (d * q + m is exact in float for 4-bit q), no transpose. */
static void pack_x8_panel(int fmt, const uint8_t *g0, const uint8_t *g1, int K, float *dst) {
    const __m128i even_odd = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    if (fmt == Q6_KX8) {  /* 1680 bytes per 256: d[8], scales[16][8], per half of 128: qa, qb, qh [16][16] */
        const __m128i m4 = _mm_set1_epi8(0x0f), m30 = _mm_set1_epi8(0x30), z = _mm_set1_epi8(32);
        for (int sb = 0; sb < K / 256; sb++)
            for (int half = 0; half < 2; half++) {
                const uint8_t *b = (half ? g1 : g0) + (size_t)sb * 1680;
                const __m256 dd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b));
                for (int h = 0; h < 2; h++) {
                    const uint8_t *qa = b + 144 + 768 * h;
                    for (int c = 0; c < 16; c++) {
                        const __m128i va = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(qa + 16 * c)), even_odd);
                        const __m128i vb = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(qa + 256 + 16 * c)), even_odd);
                        const __m128i hv = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(qa + 512 + 16 * c)), even_odd);
                        const __m128i q[4] = {
                            _mm_sub_epi8(_mm_or_si128(_mm_and_si128(va, m4), _mm_and_si128(_mm_slli_epi16(hv, 4), m30)), z),
                            _mm_sub_epi8(_mm_or_si128(_mm_and_si128(vb, m4), _mm_and_si128(_mm_slli_epi16(hv, 2), m30)), z),
                            _mm_sub_epi8(_mm_or_si128(_mm_and_si128(_mm_srli_epi16(va, 4), m4), _mm_and_si128(hv, m30)), z),
                            _mm_sub_epi8(_mm_or_si128(_mm_and_si128(_mm_srli_epi16(vb, 4), m4), _mm_and_si128(_mm_srli_epi16(hv, 2), m30)), z) };
                        for (int i = 0; i < 4; i++) {
                            const __m256 scale = _mm256_mul_ps(dd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                _mm_loadl_epi64((const __m128i *)(b + 16 + 8 * (8 * h + 2 * i + c / 8))))));
                            float *o = dst + ((size_t)sb * 256 + 128 * h + 32 * i + 2 * c) * NR + 8 * half;
                            _mm256_store_ps(o, _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q[i]))));
                            _mm256_store_ps(o + NR, _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q[i], 8)))));
                        }
                    }
                }
            }
        return;
    }
    if (fmt == Q4_KX8 || fmt == Q5_KX8) {  /* 1184 bytes per 256: d[8], dmin[8], scales[8][8], mins[8][8], qs[4][16][16]; Q5_KX8 then qh[16][16] */
        const int five = fmt == Q5_KX8;
        for (int sb = 0; sb < K / 256; sb++)
            for (int half = 0; half < 2; half++) {
                const uint8_t *b = (half ? g1 : g0) + (size_t)sb * (five ? 1440 : 1184);
                const __m256 dd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b));
                const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 16)));
                for (int j = 0; j < 8; j++) {
                    const __m256 scale = _mm256_mul_ps(dd, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 32 + 8 * j)))));
                    const __m256 min = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 96 + 8 * j)))));
                    const uint8_t *qs = b + 160 + 256 * (j / 2);
                    float *o = dst + ((size_t)sb * 256 + 32 * j) * NR + 8 * half;
                    for (int c = 0; c < 16; c++) {
                        __m128i v = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(qs + 16 * c)), even_odd);
                        v = _mm_and_si128(j & 1 ? _mm_srli_epi16(v, 4) : v, _mm_set1_epi8(0x0f));
                        if (five) {  /* bit j of qh: 16 in each byte */
                            const __m128i h = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(b + 1184 + 16 * c)), even_odd);
                            v = _mm_or_si128(v, _mm_and_si128(_mm_slli_epi16(_mm_srl_epi16(h, _mm_cvtsi32_si128(j)), 4), _mm_set1_epi8(16)));
                        }
                        _mm256_store_ps(o + (2 * c) * NR, _mm256_fmsub_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), min));
                        _mm256_store_ps(o + (2 * c + 1) * NR,
                                        _mm256_fmsub_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8))), min));
                    }
                }
            }
        return;
    }
    const int bs = fmt == Q4_0X8 ? 144 : fmt == Q4_1X8 ? 160 : 272, at = fmt == Q4_1X8 ? 32 : 16;
    const __m128i low4 = _mm_set1_epi8(0x0f);
    for (int g = 0; g < K / 32; g++) {
        float *o = dst + (size_t)g * 32 * NR;
        for (int half = 0; half < 2; half++) {
            const uint8_t *b = (half ? g1 : g0) + (size_t)g * bs, *qs = b + at;
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b));
            const __m256 m = fmt == Q4_1X8 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 16)))
                                           : _mm256_mul_ps(d, _mm256_set1_ps(-8.f));
            float *oh = o + 8 * half;
            for (int c = 0; c < (fmt == Q8X8 ? 16 : 8); c++) {
                const __m128i v = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(qs + 16 * c)), even_odd);
                if (fmt == Q8X8) {
                    _mm256_store_ps(oh + (2 * c) * NR, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))));
                    _mm256_store_ps(oh + (2 * c + 1) * NR,
                                    _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)))));
                    continue;
                }
                const __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
                const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
                const int ks[4] = {2 * c, 2 * c + 1, 16 + 2 * c, 17 + 2 * c};
                for (int j = 0; j < 4; j++)
                    _mm256_store_ps(oh + ks[j] * NR, _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j])), m));
            }
        }
    }
}
#endif

/* Panels B[p][K][NR] of W's rows n0 .. n0 + cols (the last panel repeats the last row);
 * `rows` is room for NR row indices, `t` for NR x K floats; W: n_rows rows in w_bytes bytes */
static int pack_w(int fmt, int G, const uint8_t *w, long row_stride, int K, int n0, int cols, int64_t *rows,
                  float *t, float *B, long n_rows, long w_bytes) {
    for (int p = 0; p * NR < cols; p++) {
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
        if (((fmt >= Q4_0X8 && fmt <= Q4_KX8) || fmt == Q5_KX8 || fmt == Q6_KX8) && n0 % 8 == 0 && (p + 1) * NR <= cols) {
            const uint8_t *g0 = w + (size_t)((n0 + p * NR) / 8) * row_stride;
            pack_x8_panel(fmt, g0, g0 + row_stride, K, B + (size_t)p * K * NR);
            continue;
        }
#endif
        for (int j = 0; j < NR; j++) rows[j] = n0 + (p * NR + j < cols ? p * NR + j : cols - 1);
        const int rc = fs_dequant_rows(fmt, G, w, row_stride, K, rows, NR, t, 1, n_rows, w_bytes);
        if (rc != 0) return rc;
        float *dst = B + (size_t)p * K * NR;
        for (int k = 0; k < K; k++)
            for (int j = 0; j < NR; j++) dst[(size_t)k * NR + j] = t[(size_t)j * K + k];
    }
    return 0;
}

static inline float *aligned64(float *p) { return (float *)(((uintptr_t)p + 63) & ~(uintptr_t)63); }

/* Room fs_gemm needs for M rows of length K on nthreads threads (x packed, and per thread
 * one chunk of panels and its sixteen rows): the caller keeps it between calls, so no call
 * pays for fresh pages. */
long fs_gemm_work_floats(int M, int K, int nthreads) {
    const long panels = (M + MR - 1) / MR;
    return 16 + panels * MR * K + (long)nthreads * (NC + NR) * K;
}

/* y[m][j] = sum_k x[m][k] W[n0 + j][k] for m < M, j < count (row stride ldy); W as for
 * fs_dequant_rows (rows of blocks, or groups of eight rows for the x8 formats; K a multiple
 * of 32, of 256 for the K-quants; n_rows rows in the w_bytes bytes at w), work:
 * fs_gemm_work_floats(M, K, nthreads) floats. Returns 0, or < 0 on bad arguments. */
int fs_gemm(int fmt, int G, const uint8_t *w, long row_stride, int n0, int count, int K,
            const float *x, int M, float *y, long ldy, float *work, int nthreads, long n_rows, long w_bytes) {
    if (M < 1 || count < 1 || K < 1 || K % 32 != 0 || ldy < count || nthreads < 1) return -2;
    if (n0 < 0 || (long)n0 + count > n_rows) return -2;
    /* the sizes of W: a call that reads no row at all still checks them (fs_dequant_rows) */
    if (fs_dequant_rows(fmt, G, w, row_stride, K, NULL, 0, NULL, 1, n_rows, w_bytes) != 0) return -2;
    /* chunks of at most NC columns, as many per thread (576 columns on two threads: 6 x 96, not 128 + 128 + 128 against 128 + 64) */
    const int panels = (M + MR - 1) / MR, even = ((count + NC - 1) / NC + nthreads - 1) / nthreads * nthreads;
    const int nc = ((count + even - 1) / even + NR - 1) / NR * NR, chunks = (count + nc - 1) / nc;
    float *A = aligned64(work);
    int failed = 0;
    #pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        pack_x(x, M, K, panels, A);
        #pragma omp barrier
        float *B = A + (size_t)panels * MR * K + (size_t)omp_get_thread_num() * (NC + NR) * K, *t = B + (size_t)NC * K;
        int64_t rows[NR];
        #pragma omp for schedule(static)
        for (int ch = 0; ch < chunks; ch++) {
            if (failed) continue;
            const int c0 = ch * nc, cols = count - c0 < nc ? count - c0 : nc;
            if (pack_w(fmt, G, w, row_stride, K, n0 + c0, cols, rows, t, B, n_rows, w_bytes) != 0) {
                failed = 1;
                continue;
            }
            for (int k0 = 0; k0 < K; k0 += KC) {
                const int kc = K - k0 < KC ? K - k0 : KC;
                const float *Ak = A + (size_t)k0 * panels * MR;
                for (int p = 0; p * NR < cols; p++) {
                    const float *Bp = B + (size_t)p * K * NR + (size_t)k0 * NR;
                    const int pc = cols - p * NR < NR ? cols - p * NR : NR;
                    for (int i = 0; i < panels; i++) {
#if defined(FS_GEMM_512)
                        if (pc == NR && (i + 2) * MR <= M) {  /* two whole tiles at once */
                            kernel_12x16(Ak + (size_t)i * kc * MR, Ak + (size_t)(i + 1) * kc * MR, Bp, kc,
                                         y + (size_t)i * MR * ldy + c0 + p * NR, ldy, k0 == 0);
                            i++;
                            continue;
                        }
#endif
                        if (k0 > 0 && i + 1 < panels)  /* the next tile's partial sums, while this one runs */
                            for (int r = 0; r < MR && (i + 1) * MR + r < M; r++)
                                __builtin_prefetch(y + (size_t)((i + 1) * MR + r) * ldy + c0 + p * NR);
                        tile(Ak + (size_t)i * kc * MR, Bp, kc, y + (size_t)i * MR * ldy + c0 + p * NR, ldy,
                             M - i * MR < MR ? M - i * MR : MR, pc, k0 == 0);
                    }
                }
            }
        }
    }
    return failed ? -1 : 0;
}
