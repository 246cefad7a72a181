/* Quantized matrix products for the CPU: y[M][N] = x[M][K] . W[N][K]^T.
 *
 * W stays in GGUF-style blocks (read in place from the memory-mapped file where it can):
 *   q4_0 : { fp16 d; u8 qs[16] }         w = d * (q - 8)         GGUF Q4_0
 *   q4_1 : { fp16 d; fp16 m; u8 qs[16] }  w = d * q + m           GGUF Q4_1
 *   q8   : { fp16 d; i8 qs[32] }          w = d * q               GGUF Q8_0; Q5_0 repacked
 *   q4_k : { fp16 d, dmin; u8 scales[12]; u8 qs[128] }, 256 weights in 8 sub-blocks j:
 *          w = d * sc_j * q - dmin * m_j (6-bit sc, m packed in `scales`)   GGUF Q4_K
 *   q6_k : { u8 ql[128]; u8 qh[64]; i8 scales[16]; fp16 d }, 256 weights, 16 per scale:
 *          w = d * sc_j * (q - 32), q = 4 low bits from ql | 2 high bits from qh    GGUF Q6_K
 *   q2_k : { u8 scales[16]; u8 qs[64]; fp16 d, dmin }, 256 weights, 16 per scale byte:
 *          w = d * (sc & 15) * q - dmin * (sc >> 4), q 2 bits                     GGUF Q2_K
 *   q3_k : { u8 hmask[32]; u8 qs[64]; u8 scales[12]; fp16 d }, 256 weights, 16 per scale:
 *          w = d * (sc - 32) * (q - 4), q = 2 bits from qs | bit from hmask << 2  GGUF Q3_K
 *   iq4_xs : { fp16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128] }, 256 weights, 32 per scale:
 *          w = d * (ls - 32) * KVALUES_IQ4[q], q a nibble, ls 6 bits             GGUF IQ4_XS
 * Nibble order as GGUF: in Q4_0/Q4_1 byte i holds weight i (low) and i + 16 (high); in Q4_K
 * each 32 bytes hold sub-block 2c (low nibbles) and 2c + 1 (high nibbles); IQ4_XS's 16 bytes
 * per 32 weights are Q4_0's order. Q2_K/Q3_K: weight 32t + l of each half of 128 is the 2-bit
 * field t of that half's qs byte l (bits 2t, 2t + 1); Q3_K's third bit of weight i is bit
 * i / 32 of hmask[i % 32].
 *
 * x is quantized per row in groups of 32 to int16 with one float scale, so the result stays
 * within ~1e-5 of the float product (int8 activations, llama.cpp's choice, give ~4e-2 on the
 * logits of SmolLM2). 256-bit vectors: vpmaddwd (AVX2), fused with vpdpwssd where AVX-512
 * VNNI/VL is there; 512-bit vectors measured no faster on the AMD EPYC we develop on
 * (double-pumped). Plain C as the portable fallback. Built on first use by kernels/__init__.py.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <sys/mman.h>
#include <unistd.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

static inline float fp16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else { exp = 113; while (!(man & 0x400)) { man <<= 1; exp--; } bits = sign | (exp << 23) | ((man & 0x3ff) << 13); }
    } else if (exp == 31) { bits = sign | 0x7f800000u | (man << 13); }
    else { bits = sign | ((exp + 112) << 23) | (man << 13); }
    float f; memcpy(&f, &bits, 4); return f;
#endif
}

enum { FMT_Q4_0 = 0, FMT_Q4_1 = 1, FMT_Q8 = 2, FMT_Q4_K = 3, FMT_Q6_K = 4,
       FMT_Q4_0X8 = 5, FMT_Q4_1X8 = 6, FMT_Q8X8 = 7, FMT_Q4_KX8 = 8,  /* eight rows interleaved: see fs_repack_x8 */
       FMT_F16 = 9, FMT_BF16 = 10,  /* rows of K 16-bit floats, against float activations (f16_rows_dot) */
       FMT_Q5_K = 11, FMT_Q5_1 = 12,  /* GGUF's 5-bit blocks in place, a row at a time (row_dot) */
       FMT_Q2_K = 13, FMT_Q3_K = 14, FMT_IQ4_XS = 15,  /* GGUF's 2-, 3- and 4-bit (non-linear) blocks in place, as Q5_K */
       FMT_Q5_KX8 = 16, FMT_Q6_KX8 = 17,  /* Q5_K, Q6_K eight rows interleaved (fs_repack_x8) */
       FMT_LAST = FMT_Q6_KX8 };

/* The layouts of eight rows interleaved: a matrix of them holds row groups, not rows */
static inline int is_x8(int fmt) {
    return (fmt >= FMT_Q4_0X8 && fmt <= FMT_Q4_KX8) || fmt == FMT_Q5_KX8 || fmt == FMT_Q6_KX8;
}

/* One activation row: q[K] int16, d[K/32] scale, s[K/32] = d * sum(q) (for the weights' offset
 * terms), t[K/32] = sum(q) (the 8-row kernels take Q4_0's 8 off in integers); where the AMX
 * kernel runs, also q's high bytes hi[K] and low bytes lo[K] in its order (amx_split_row), else NULL */
typedef struct { int16_t *q; float *d, *s; int32_t *t; int8_t *hi; uint8_t *lo; } qrow;

static void quantize_row(const float *x, int K, qrow r) {
    for (int g = 0; g < K / 32; g++) {
        const float *xg = x + g * 32;
#if defined(__AVX2__)
        /* the scalar loop below, 8 lanes at a time: cvtps rounds to nearest even as lrintf does
           (the same bits for finite x; a NaN or inf row is garbage either way) */
        const __m256 sign = _mm256_set1_ps(-0.f);
        __m256 v[4], m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) { v[i] = _mm256_loadu_ps(xg + 8 * i); m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i])); }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        const float d = amax / 32767.f, id = d > 0.f ? 1.f / d : 0.f;
        __m256i q[4], sum = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) {
            q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
            sum = _mm256_add_epi32(sum, q[i]);
        }
        /* packs interleaves 128-bit lanes; the permute puts the 16 values back in order */
        _mm256_storeu_si256((__m256i *)(r.q + g * 32), _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xd8));
        _mm256_storeu_si256((__m256i *)(r.q + g * 32 + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xd8));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        r.d[g] = d; r.t[g] = _mm_cvtsi128_si32(s4); r.s[g] = d * (float)r.t[g];
#else
        float amax = 0.f;
        for (int i = 0; i < 32; i++) { float a = fabsf(xg[i]); amax = a > amax ? a : amax; }
        float d = amax / 32767.f, id = d > 0.f ? 1.f / d : 0.f;
        int32_t sum = 0;
        for (int i = 0; i < 32; i++) { int v = (int)lrintf(xg[i] * id); r.q[g * 32 + i] = (int16_t)v; sum += v; }
        r.d[g] = d; r.t[g] = sum; r.s[g] = d * (float)sum;
#endif
    }
}

/* Integer partial sums of one group stay in a vector (ivec) and are scaled into a float
 * vector accumulator (facc); one horizontal sum per output value. */
#if defined(__AVX2__)
typedef __m256i ivec;
typedef __m256 facc;
static inline facc facc_zero(void) { return _mm256_setzero_ps(); }
static inline facc facc_add(facc acc, ivec v, float scale) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(scale), acc);
}
static inline facc facc_plus(facc a, facc b) { return _mm256_add_ps(a, b); }
static inline float facc_sum(facc a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else
typedef int32_t ivec;  /* |sum| <= 32 * 128 * 32767 < 2^31 */
typedef float facc;
static inline facc facc_zero(void) { return 0.f; }
static inline facc facc_add(facc acc, ivec v, float scale) { return acc + (float)v * scale; }
static inline float facc_sum(facc a) { return a; }
static inline facc facc_plus(facc a, facc b) { return a + b; }
#endif

/* 16 bytes widened to int16, then a nibble of each (and 0x0f, or shift right 4): weight
 * bytes go straight to int16 lanes without any cross-lane shuffles */
#if defined(__AVX2__)
static inline __m256i nibbles16(const uint8_t *qs, int high) {
    __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)qs));
    return high ? _mm256_srli_epi16(v, 4) : _mm256_and_si256(v, _mm256_set1_epi16(0x0f));
}
/* w0 . a[0..16) + w1 . a[16..32) as 8 int32 lanes */
static inline ivec dot2x16(__m256i w0, __m256i w1, const int16_t *a) {
    __m256i x0 = _mm256_loadu_si256((const __m256i *)a), x1 = _mm256_loadu_si256((const __m256i *)(a + 16));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(_mm256_madd_epi16(w0, x0), w1, x1);
#else
    return _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
#endif
}
#endif

/* q4 (0..15, Q4_0/Q4_1 order: byte i = weights i (low) and i + 16 (high)), less `zero`, . a[32].
 * Q4_0 subtracts its 8 here, in the integer lanes: no per-group offset term to add up. */
static inline ivec dot_q4_32(const uint8_t *qs, int zero, const int16_t *a) {
#if defined(__AVX2__)
    __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)qs)), z = _mm256_set1_epi16((short)zero);
    return dot2x16(_mm256_sub_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x0f)), z),
                   _mm256_sub_epi16(_mm256_srli_epi16(v, 4), z), a);
#else
    int32_t sum = 0;
    for (int i = 0; i < 16; i++) sum += ((qs[i] & 0x0f) - zero) * a[i] + ((qs[i] >> 4) - zero) * a[i + 16];
    return sum;
#endif
}

/* the low or high nibbles of 32 bytes (Q4_K's layout) . a[32] */
static inline ivec dot_q4k_32(const uint8_t *qs, int high, const int16_t *a) {
#if defined(__AVX2__)
    return dot2x16(nibbles16(qs, high), nibbles16(qs + 16, high), a);
#else
    int32_t sum = 0;
    for (int i = 0; i < 32; i++) sum += (high ? qs[i] >> 4 : qs[i] & 0x0f) * a[i];
    return sum;
#endif
}

/* Q5_K: the low or high nibbles of 32 bytes (Q4_K's layout) with bit j of each qh byte as
 * their fifth bit (sub-block j of the super-block) . a[32] */
static inline ivec dot_q5k_32(const uint8_t *qs, int high, const uint8_t *qh, int j, const int16_t *a) {
#if defined(__AVX2__)
    const __m256i v = _mm256_loadu_si256((const __m256i *)qs), h = _mm256_loadu_si256((const __m256i *)qh);
    const __m256i nib = _mm256_and_si256(high ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0x0f));
    /* per byte: (h >> j) & 1, moved to bit 4 (16-bit shifts; the masks keep each byte's own bits) */
    const __m256i hb = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, j), _mm256_set1_epi8(1)), 4);
    const __m256i q = _mm256_or_si256(nib, hb);
    return dot2x16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(q)), _mm256_cvtepu8_epi16(_mm256_extracti128_si256(q, 1)), a);
#else
    int32_t sum = 0;
    for (int i = 0; i < 32; i++) sum += ((high ? qs[i] >> 4 : qs[i] & 0x0f) | (((qh[i] >> j) & 1) << 4)) * a[i];
    return sum;
#endif
}

/* Q5_1/Q5_0 order (byte i: weights i (low nibble) and i + 16 (high)), bit i of qh the fifth
 * bit of weight i . a[32] */
static inline ivec dot_q5_32(const uint8_t *qs, uint32_t qh, const int16_t *a) {
#if defined(__AVX2__)
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)qs));
    const __m256i bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, (short)0x8000);
    const __m256i sixteen = _mm256_set1_epi16(16);
    const __m256i h0 = _mm256_and_si256(bit, _mm256_set1_epi16((short)(qh & 0xffff))), h1 = _mm256_and_si256(bit, _mm256_set1_epi16((short)(qh >> 16)));
    const __m256i w0 = _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi16(0x0f)), _mm256_and_si256(_mm256_cmpeq_epi16(h0, bit), sixteen));
    const __m256i w1 = _mm256_or_si256(_mm256_srli_epi16(v, 4), _mm256_and_si256(_mm256_cmpeq_epi16(h1, bit), sixteen));
    return dot2x16(w0, w1, a);
#else
    int32_t sum = 0;
    for (int i = 0; i < 16; i++)
        sum += ((qs[i] & 0x0f) | (((qh >> i) & 1) << 4)) * a[i] + ((qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) * a[i + 16];
    return sum;
#endif
}

/* 32 int8 weights . a[32] */
static inline ivec dot_q8(const int8_t *qs, const int16_t *a) {
#if defined(__AVX2__)
    return dot2x16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)qs)),
                   _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qs + 16))), a);
#else
    int32_t sum = 0;
    for (int i = 0; i < 32; i++) sum += qs[i] * a[i];
    return sum;
#endif
}

/* Q2_K/Q3_K: the 2-bit field `shift` / 2 of 32 bytes (sub-blocks 2t and 2t + 1 of a
 * super-block: weights 32t .. 32t + 31), for Q3_K (hm not NULL) with bit `hbit` of each hmask
 * byte as their third bit and less 4, times their sub-blocks' scales sc0 (the first 16) and sc1
 * (the last 16) in the int16 lanes (|sc q| <= 45 (Q2_K), 128 (Q3_K)) . a[32]. Inlined with hm a
 * constant NULL or not at each call: the Q3_K steps fold away for Q2_K. */
static inline ivec dot_q23k_32(const uint8_t *qs, int shift, const uint8_t *hm, int hbit, int sc0, int sc1,
                               const int16_t *a) {
#if defined(__AVX2__)
    __m256i q = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)qs), shift), _mm256_set1_epi8(3));
    if (hm) {  /* (h >> hbit) & 1 per byte, moved to bit 2 (16-bit shifts; the masks keep each byte's own bits) */
        const __m256i h = _mm256_loadu_si256((const __m256i *)hm);
        q = _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, hbit), _mm256_set1_epi8(1)), 2));
    }
    __m256i w0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(q)), w1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(q, 1));
    if (hm) {
        w0 = _mm256_sub_epi16(w0, _mm256_set1_epi16(4));
        w1 = _mm256_sub_epi16(w1, _mm256_set1_epi16(4));
    }
    return dot2x16(_mm256_mullo_epi16(w0, _mm256_set1_epi16((short)sc0)), _mm256_mullo_epi16(w1, _mm256_set1_epi16((short)sc1)), a);
#else
    int32_t s0 = 0, s1 = 0;
    for (int l = 0; l < 16; l++) {
        int q0 = (qs[l] >> shift) & 3, q1 = (qs[l + 16] >> shift) & 3;
        if (hm) { q0 |= ((hm[l] >> hbit) & 1) << 2; q1 |= ((hm[l + 16] >> hbit) & 1) << 2; q0 -= 4; q1 -= 4; }
        s0 += q0 * a[l];
        s1 += q1 * a[l + 16];
    }
    return sc0 * s0 + sc1 * s1;
#endif
}

/* m0 * sum(a[0..16)) + m1 * sum(a[16..32)): Q2_K's mins of sub-blocks 2t, 2t + 1 */
static inline ivec dot_mins_32(int m0, int m1, const int16_t *a) {
#if defined(__AVX2__)
    return dot2x16(_mm256_set1_epi16((short)m0), _mm256_set1_epi16((short)m1), a);
#else
    int32_t s0 = 0, s1 = 0;
    for (int l = 0; l < 16; l++) { s0 += a[l]; s1 += a[l + 16]; }
    return m0 * s0 + m1 * s1;
#endif
}

/* IQ4_XS's non-linear levels (ggml's kvalues_iq4nl): a nibble q stands for KVALUES_IQ4[q] */
static const int8_t KVALUES_IQ4[16] = { -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113 };

/* IQ4_XS: 16 bytes of nibbles in Q4_0's order (byte i: weights i (low) and i + 16 (high)),
 * each looked up in KVALUES_IQ4 (one byte shuffle per 16), . a[32] */
static inline ivec dot_iq4_32(const uint8_t *qs, const int16_t *a) {
#if defined(__AVX2__)
    const __m128i table = _mm_loadu_si128((const __m128i *)KVALUES_IQ4), low4 = _mm_set1_epi8(0x0f);
    const __m128i v = _mm_loadu_si128((const __m128i *)qs);
    const __m128i lo = _mm_shuffle_epi8(table, _mm_and_si128(v, low4));
    const __m128i hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(v, 4), low4));
    return dot2x16(_mm256_cvtepi8_epi16(lo), _mm256_cvtepi8_epi16(hi), a);
#else
    int32_t sum = 0;
    for (int i = 0; i < 16; i++) sum += KVALUES_IQ4[qs[i] & 0x0f] * a[i] + KVALUES_IQ4[qs[i] >> 4] * a[i + 16];
    return sum;
#endif
}

/* Q3_K's 16 six-bit scales, less 32 (-32..31): the low 4 bits of scale j in byte j % 8 (low
 * nibble for j < 8, high for j >= 8), its high 2 bits in byte 8 + j % 4 at bits 2 (j / 4).
 * Four scales a 32-bit word (little-endian): word w of the result takes the nibbles of bytes
 * 4 (w % 2) .. + 3 (high nibbles for w >= 2) and the 2-bit fields w of bytes 8..11; 16 bytes
 * at a time cost a tenth of a scale at a time, per 256 weights as much as the products. */
static inline void k3_scales(const uint8_t *s, int *sc) {
    uint32_t lo[2], hi, w[4];
    memcpy(lo, s, 8);
    memcpy(&hi, s + 8, 4);
    for (int q = 0; q < 4; q++)
        w[q] = ((lo[q % 2] >> (4 * (q / 2))) & 0x0f0f0f0fu) | (((hi >> (2 * q)) & 0x03030303u) << 4);
    for (int j = 0; j < 16; j++) sc[j] = (int)((w[j / 4] >> (8 * (j % 4))) & 0xff) - 32;
}

/* IQ4_XS's scale of sub-block j (32 weights), less 32: 4 low bits from scales_l, 2 high from scales_h */
static inline int iq4xs_scale(const uint8_t *b, int j) {
    const int scales_h = b[2] | (b[3] << 8);
    return (((b[4 + j / 2] >> (4 * (j % 2))) & 0x0f) | (((scales_h >> (2 * j)) & 3) << 4)) - 32;
}

static inline void k4_scales(const uint8_t *s, float *sc, float *mn) {
    for (int j = 0; j < 8; j++) {
        if (j < 4) { sc[j] = (float)(s[j] & 63); mn[j] = (float)(s[j + 4] & 63); }
        else {
            sc[j] = (float)((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4));
            mn[j] = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
        }
    }
}


/* Q6_K: one half super-block (128 weights) decoded to q - zero in weight order (zero 32:
 * -32..31, the weights' own values; zero 0: 0..63 for q6k_row_dot's unsigned bytes):
 * out[32 i + l] = weight 32 i + l of the half, from ql[64], qh[32]. Bits 2i, 2i + 1 of qh
 * go to bits 4, 5 of weight group i (16-bit shifts; the mask keeps each byte's own bits). */
#if defined(__AVX2__)
static inline void q6k_half_regs(const uint8_t *ql, const uint8_t *qh, int zero, __m256i out[4]) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m30 = _mm256_set1_epi8(0x30), z = _mm256_set1_epi8((char)zero);
    const __m256i l0 = _mm256_loadu_si256((const __m256i *)ql), l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
    const __m256i h = _mm256_loadu_si256((const __m256i *)qh);
    const __m256i lo4[4] = { _mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                             _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4) };
    const __m256i hi2[4] = { _mm256_slli_epi16(h, 4), _mm256_slli_epi16(h, 2), h, _mm256_srli_epi16(h, 2) };
    for (int i = 0; i < 4; i++) {
        out[i] = _mm256_or_si256(lo4[i], _mm256_and_si256(hi2[i], m30));
        if (zero) out[i] = _mm256_sub_epi8(out[i], z);
    }
}
#endif

static inline void q6k_decode_half(const uint8_t *ql, const uint8_t *qh, int8_t *out) {
#if defined(__AVX2__)
    __m256i w[4];
    q6k_half_regs(ql, qh, 32, w);
    for (int i = 0; i < 4; i++) _mm256_storeu_si256((__m256i *)(out + 32 * i), w[i]);
#else
    for (int l = 0; l < 32; l++) {
        out[l] = (int8_t)(((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32);
        out[l + 32] = (int8_t)(((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32);
        out[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
        out[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
    }
#endif
}

/* One weight row against one quantized activation row.
 * No sum runs through one register from group to group: a single fma chain (an offset term
 * added per group) costs its 4-cycle latency per 32 weights, more than the dot products. */
static float row_dot(int fmt, const uint8_t *wrow, int K, qrow a) {
    facc acc[4] = { facc_zero(), facc_zero(), facc_zero(), facc_zero() };
    float offsets[8] = { 0.f };  /* the weights' min terms, m * sum(x), in 8 independent sums */
    if (fmt == FMT_Q4_0) {  /* w = d * (q - 8) */
        for (int g = 0; g < K / 32; g++) {
            const uint8_t *b = wrow + g * 18;
            acc[g & 3] = facc_add(acc[g & 3], dot_q4_32(b + 2, 8, a.q + g * 32), fp16_to_f32(*(const uint16_t *)b) * a.d[g]);
        }
    } else if (fmt == FMT_Q4_1) {  /* sum (d*q + m) * x = d * sum(q * x) + m * sum(x) */
        for (int g = 0; g < K / 32; g++) {
            const uint8_t *b = wrow + g * 20;
            acc[g & 3] = facc_add(acc[g & 3], dot_q4_32(b + 4, 0, a.q + g * 32), fp16_to_f32(*(const uint16_t *)b) * a.d[g]);
            offsets[g & 7] += fp16_to_f32(*(const uint16_t *)(b + 2)) * a.s[g];
        }
    } else if (fmt == FMT_Q4_K) {
        for (int sb = 0; sb < K / 256; sb++) {
            const uint8_t *b = wrow + sb * 144, *qs = b + 16;
            float d = fp16_to_f32(*(const uint16_t *)b), dmin = fp16_to_f32(*(const uint16_t *)(b + 2)), sc[8], mn[8];
            k4_scales(b + 4, sc, mn);
            for (int j = 0; j < 8; j++) {
                int g = sb * 8 + j;
                acc[j & 3] = facc_add(acc[j & 3], dot_q4k_32(qs + 32 * (j / 2), j & 1, a.q + g * 32), d * sc[j] * a.d[g]);
            }
            for (int j = 0; j < 8; j++) offsets[j] -= dmin * mn[j] * a.s[sb * 8 + j];  /* one vector fma */
        }
    } else if (fmt == FMT_Q5_K) {  /* Q4_K with a fifth bit: { d, dmin, scales[12], qh[32], qs[128] } */
        for (int sb = 0; sb < K / 256; sb++) {
            const uint8_t *b = wrow + sb * 176, *qh = b + 16, *qs = b + 48;
            float d = fp16_to_f32(*(const uint16_t *)b), dmin = fp16_to_f32(*(const uint16_t *)(b + 2)), sc[8], mn[8];
            k4_scales(b + 4, sc, mn);
            for (int j = 0; j < 8; j++) {
                int g = sb * 8 + j;
                acc[j & 3] = facc_add(acc[j & 3], dot_q5k_32(qs + 32 * (j / 2), j & 1, qh, j, a.q + g * 32), d * sc[j] * a.d[g]);
            }
            for (int j = 0; j < 8; j++) offsets[j] -= dmin * mn[j] * a.s[sb * 8 + j];
        }
    } else if (fmt == FMT_Q2_K) {  /* { scales[16], qs[64], d, dmin }: products in acc[0..1], mins in acc[2..3] */
        for (int sb = 0; sb < K / 256; sb++) {
            const uint8_t *b = wrow + sb * 84, *sc = b, *qs = b + 16;
            const float d = fp16_to_f32(*(const uint16_t *)(b + 80)), dmin = fp16_to_f32(*(const uint16_t *)(b + 82));
            for (int t = 0; t < 8; t++) {
                const int g = sb * 8 + t, s0 = sc[2 * t], s1 = sc[2 * t + 1];
                acc[t & 1] = facc_add(acc[t & 1], dot_q23k_32(qs + 32 * (t / 4), 2 * (t % 4), NULL, 0, s0 & 15, s1 & 15,
                                                              a.q + g * 32), d * a.d[g]);
                acc[2 + (t & 1)] = facc_add(acc[2 + (t & 1)], dot_mins_32(s0 >> 4, s1 >> 4, a.q + g * 32), -dmin * a.d[g]);
            }
        }
    } else if (fmt == FMT_Q3_K) {  /* { hmask[32], qs[64], scales[12], d } */
        for (int sb = 0; sb < K / 256; sb++) {
            const uint8_t *b = wrow + sb * 110, *hm = b, *qs = b + 32;
            const float d = fp16_to_f32(*(const uint16_t *)(b + 108));
            int sc[16];
            k3_scales(b + 96, sc);
            for (int t = 0; t < 8; t++) {
                const int g = sb * 8 + t;
                acc[t & 3] = facc_add(acc[t & 3], dot_q23k_32(qs + 32 * (t / 4), 2 * (t % 4), hm, t, sc[2 * t], sc[2 * t + 1],
                                                              a.q + g * 32), d * a.d[g]);
            }
        }
    } else if (fmt == FMT_IQ4_XS) {  /* { d, scales_h, scales_l[4], qs[128] } */
        for (int sb = 0; sb < K / 256; sb++) {
            const uint8_t *b = wrow + sb * 136, *qs = b + 8;
            const float d = fp16_to_f32(*(const uint16_t *)b);
            float dl[8];
            for (int j = 0; j < 8; j++) dl[j] = d * (float)iq4xs_scale(b, j);
            for (int j = 0; j < 8; j++) {
                const int g = sb * 8 + j;
                acc[j & 3] = facc_add(acc[j & 3], dot_iq4_32(qs + 16 * j, a.q + g * 32), dl[j] * a.d[g]);
            }
        }
    } else if (fmt == FMT_Q5_1) {  /* { d, m, qh[4], qs[16] }: w = d * q + m */
        for (int g = 0; g < K / 32; g++) {
            const uint8_t *b = wrow + g * 24;
            uint32_t qh;
            memcpy(&qh, b + 4, 4);
            acc[g & 3] = facc_add(acc[g & 3], dot_q5_32(b + 8, qh, a.q + g * 32), fp16_to_f32(*(const uint16_t *)b) * a.d[g]);
            offsets[g & 7] += fp16_to_f32(*(const uint16_t *)(b + 2)) * a.s[g];
        }
    } else { /* FMT_Q8 */
        for (int g = 0; g < K / 32; g++) {
            const uint8_t *b = wrow + g * 34;
            acc[g & 3] = facc_add(acc[g & 3], dot_q8((const int8_t *)(b + 2), a.q + g * 32), fp16_to_f32(*(const uint16_t *)b) * a.d[g]);
        }
    }
    float off = 0.f;
    for (int j = 0; j < 8; j++) off += offsets[j];
    return facc_sum(facc_plus(facc_plus(acc[0], acc[1]), facc_plus(acc[2], acc[3]))) + off;
}

/* Q6_K rows take their activations in another form (q6row): int16 values X with one scale
 * per 256 (a super-block), each split into its high byte h = X >> 8 (int8) and low byte
 * l = X & 255 (uint8), X = 256 h + l; and per 16 values (one weight scale) the sums of h
 * and of l, for the weights' 32 offset. The product stays the exact integer one of int16
 * activations, but it takes vpmaddubsw's 32 byte products an instruction (the int16 form
 * takes 16 in vpmaddwd), every scale is applied in integers, and one float step is left
 * per 256 weights: a 1B's tied head (128256 x 2048 Q6_K) was a third of a decode step. */
typedef struct { int8_t *h; uint8_t *l; float *d; int16_t *sh, *sl; } q6row;

static q6row row6_of(q6row all, int m, int K) {
    q6row r = { all.h + (size_t)m * K, all.l + (size_t)m * K, all.d + (size_t)m * (K / 256),
                all.sh + (size_t)m * (K / 16), all.sl + (size_t)m * (K / 16) };
    return r;
}

/* once per row and call: lrintf rounds to nearest even, as the int16 form's cvtps does */
static void quantize_row6(const float *x, int K, q6row r) {
    for (int sb = 0; sb < K / 256; sb++) {
        const float *xs = x + sb * 256;
        float amax = 0.f;
        for (int i = 0; i < 256; i++) { float a = fabsf(xs[i]); amax = a > amax ? a : amax; }
        const float d = amax / 32767.f, id = d > 0.f ? 1.f / d : 0.f;
        r.d[sb] = d;
        for (int j = 0; j < 16; j++) {
            int sh = 0, sl = 0;
            for (int i = 16 * j; i < 16 * j + 16; i++) {
                const int v = (int)lrintf(xs[i] * id);  /* -32767 .. 32767 */
                r.h[sb * 256 + i] = (int8_t)(v >> 8);   /* arithmetic shift: floor(v / 256) */
                r.l[sb * 256 + i] = (uint8_t)(v & 255);
                sh += v >> 8;
                sl += v & 255;
            }
            r.sh[sb * 16 + j] = (int16_t)sh;  /* |sh| <= 16 * 128, sl <= 16 * 255 */
            r.sl[sb * 16 + j] = (int16_t)sl;
        }
    }
}

/* One Q6_K row . a: sum over super-blocks of d * d_x * sum_j sc_j sum_i (q_i - 32) X_i, with
 * q unsigned (0..63) and the 32 taken off per scale from the sums of h and l. */
static float q6k_row_dot(const uint8_t *wrow, int K, q6row a) {
#if defined(__AVX2__)
    /* Per 32 weights (scales 2k, 2k + 1: the two 128-bit lanes): vpmaddubsw of q with h
       (pairs <= 2 * 63 * 128) and of l with q (<= 2 * 255 * 63 < 2^15: no saturation), then
       vpmaddwd with the scales into int32. A super-block's sums stay below 2^27; the high
       bytes' sum is converted apart from the low bytes' (x 256 it could pass 2^31). */
    __m256 acc = _mm256_setzero_ps();
    const __m256i pick0 = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                           2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
    const __m256i step = _mm256_set1_epi8(4);
    for (int sb = 0; sb < K / 256; sb++) {
        const uint8_t *b = wrow + sb * 210;
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192)));
        const int8_t *xh = a.h + sb * 256;
        const uint8_t *xl = a.l + sb * 256;
        __m256i hi = _mm256_setzero_si256(), lo = _mm256_setzero_si256();
        for (int half = 0; half < 2; half++) {
            /* the half's 8 scales (int16) in both 128-bit lanes; pick: scale 2k in the low lane, 2k + 1 in the high */
            const __m256i sch = half ? _mm256_permute2x128_si256(sc16, sc16, 0x11) : _mm256_permute2x128_si256(sc16, sc16, 0x00);
            __m256i q[4], pick = pick0;
            q6k_half_regs(b + 64 * half, b + 128 + 32 * half, 0, q);
            for (int k = 0; k < 4; k++) {
                const int at = 128 * half + 32 * k;
                const __m256i s = _mm256_shuffle_epi8(sch, pick);
                pick = _mm256_add_epi8(pick, step);
                const __m256i ph = _mm256_maddubs_epi16(q[k], _mm256_loadu_si256((const __m256i *)(xh + at)));
                const __m256i pl = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(xl + at)), q[k]);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
                hi = _mm256_dpwssd_epi32(hi, ph, s);
                lo = _mm256_dpwssd_epi32(lo, pl, s);
#else
                hi = _mm256_add_epi32(hi, _mm256_madd_epi16(ph, s));
                lo = _mm256_add_epi32(lo, _mm256_madd_epi16(pl, s));
#endif
            }
        }
        /* the offset: 32 * sum_j sc_j * (sum of h, of l over scale j's 16 values) */
        const __m256i oh = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)(a.sh + sb * 16)));
        const __m256i ol = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)(a.sl + sb * 16)));
        hi = _mm256_sub_epi32(hi, _mm256_slli_epi32(oh, 5));
        lo = _mm256_sub_epi32(lo, _mm256_slli_epi32(ol, 5));
        const __m256 sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_set1_ps(256.f), _mm256_cvtepi32_ps(lo));
        acc = _mm256_fmadd_ps(sum, _mm256_set1_ps(fp16_to_f32(*(const uint16_t *)(b + 208)) * a.d[sb]), acc);
    }
    return facc_sum(acc);
#else
    int8_t q[128];
    float acc = 0.f;
    for (int sb = 0; sb < K / 256; sb++) {
        const uint8_t *b = wrow + sb * 210;
        const int8_t *sc = (const int8_t *)(b + 192);
        int64_t sum = 0;  /* |(q - 32) X| <= 2^20: 16 of them times a scale fit int32, 256 not */
        for (int half = 0; half < 2; half++) {
            q6k_decode_half(b + 64 * half, b + 128 + 32 * half, q);
            for (int j = 0; j < 8; j++) {
                int32_t part = 0;
                for (int i = 16 * j; i < 16 * j + 16; i++) {
                    const int at = sb * 256 + 128 * half + i;
                    part += q[i] * (256 * a.h[at] + a.l[at]);
                }
                sum += (int64_t)sc[8 * half + j] * part;
            }
        }
        acc += fp16_to_f32(*(const uint16_t *)(b + 208)) * a.d[sb] * (float)sum;
    }
    return acc;
#endif
}

#if defined(__AVX2__)
/* The 32 weights at qs (Q8: int8; Q4: nibbles less `eight`) . activations x0 | x1, as 8 int32 lanes */
static inline __m256i block32_dot(int fmt, const uint8_t *qs, __m256i x0, __m256i x1, __m256i low4, __m256i eight) {
    if (fmt == FMT_Q8)
        return _mm256_add_epi32(_mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)qs)), x0),
                                _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qs + 16))), x1));
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)qs));
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_sub_epi16(_mm256_and_si256(v, low4), eight), x0),
                            _mm256_madd_epi16(_mm256_sub_epi16(_mm256_srli_epi16(v, 4), eight), x1));
}
#endif

static qrow row_of(qrow all, int m, int K) {
    const int ng = K / 32;
    qrow r = { all.q + (size_t)m * K, all.d + (size_t)m * ng, all.s + (size_t)m * ng, all.t + (size_t)m * ng,
               all.hi ? all.hi + (size_t)m * K : NULL, all.lo ? all.lo + (size_t)m * K : NULL };
    return r;
}

#if defined(__AVX2__)
/* The 32 weights at qs as two int16 vectors (weights 0..15, 16..31), as block32_dot reads them */
static inline void block32_regs(int fmt, const uint8_t *qs, __m256i low4, __m256i eight, __m256i *lo, __m256i *hi) {
    if (fmt == FMT_Q8) {
        *lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)qs));
        *hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qs + 16)));
        return;
    }
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)qs));
    *lo = _mm256_sub_epi16(_mm256_and_si256(v, low4), eight);
    *hi = _mm256_sub_epi16(_mm256_srli_epi16(v, 4), eight);
}

/* Two weight rows of a 32-weight-block format (Q4_0, Q4_1, Q8; rows w0 and w0 + stride)
 * against N activation rows m0 .. m0 + N: each activation group is loaded once for both
 * rows, each weight block decoded once for all N, and every sum stays in a register (N is a
 * constant at every call). Each output takes the same operations in the same order for
 * any N, so a batched decode step gives every session the bits a step of its own gives. */
static inline __attribute__((always_inline)) void two_rows_dot_n(
        int fmt, const uint8_t *w0, long stride, int K, qrow all, int m0, const int N, float *y, int total) {
    const uint8_t *w1 = w0 + stride;
    const int bs = fmt == FMT_Q4_0 ? 18 : fmt == FMT_Q4_1 ? 20 : 34, at = fmt == FMT_Q4_1 ? 4 : 2;
    const __m256i low4 = _mm256_set1_epi16(0x0f), eight = _mm256_set1_epi16(fmt == FMT_Q4_0 ? 8 : 0);
    __m256 acc0[4], acc1[4];
    float off0[4], off1[4];
    for (int i = 0; i < N; i++) { acc0[i] = acc1[i] = _mm256_setzero_ps(); off0[i] = off1[i] = 0.f; }
    const int groups = K / 32;
    for (int g = 0; g < groups; g++) {
        const uint8_t *b0 = w0 + (size_t)g * bs, *b1 = w1 + (size_t)g * bs;
        __m256i a0, a1, c0, c1;
        block32_regs(fmt, b0 + at, low4, eight, &a0, &a1);
        block32_regs(fmt, b1 + at, low4, eight, &c0, &c1);
        const float d0 = fp16_to_f32(*(const uint16_t *)b0), d1 = fp16_to_f32(*(const uint16_t *)b1);
        const float mn0 = fmt == FMT_Q4_1 ? fp16_to_f32(*(const uint16_t *)(b0 + 2)) : 0.f;
        const float mn1 = fmt == FMT_Q4_1 ? fp16_to_f32(*(const uint16_t *)(b1 + 2)) : 0.f;
        for (int i = 0; i < N; i++) {
            const qrow a = row_of(all, m0 + i, K);
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(a.q + g * 32));
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(a.q + g * 32 + 16));
            const __m256i p0 = _mm256_add_epi32(_mm256_madd_epi16(a0, x0), _mm256_madd_epi16(a1, x1));
            const __m256i p1 = _mm256_add_epi32(_mm256_madd_epi16(c0, x0), _mm256_madd_epi16(c1, x1));
            if (fmt == FMT_Q4_1) {
                off0[i] += mn0 * a.s[g];
                off1[i] += mn1 * a.s[g];
            }
            const float ad = a.d[g];
            acc0[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d0 * ad), acc0[i]);
            acc1[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d1 * ad), acc1[i]);
        }
    }
    for (int i = 0; i < N; i++) {
        y[(size_t)(m0 + i) * total] = facc_sum(acc0[i]) + off0[i];
        y[(size_t)(m0 + i) * total + 1] = facc_sum(acc1[i]) + off1[i];
    }
}
#endif

/* Two weight rows (as two_rows_dot_n) against all M activation rows: y[m * total], y[m * total + 1].
 * Inlined into two_rows_dot_all once per format: with the format a constant, its block size,
 * offsets and branches fold away (measured 1.2-1.3x on a Q4_0 matrix in cache, 1.1-1.2x from
 * memory). */
static inline __attribute__((always_inline)) void two_rows_dot_fmt(
        int fmt, const uint8_t *w0, long stride, int K, qrow all, int M, float *y, int total) {
#if defined(__AVX2__)
    int m = 0;
    for (; m + 4 <= M; m += 4) two_rows_dot_n(fmt, w0, stride, K, all, m, 4, y, total);
    switch (M - m) {
        case 3: two_rows_dot_n(fmt, w0, stride, K, all, m, 3, y, total); break;
        case 2: two_rows_dot_n(fmt, w0, stride, K, all, m, 2, y, total); break;
        case 1: two_rows_dot_n(fmt, w0, stride, K, all, m, 1, y, total); break;
        default: break;
    }
#else
    for (int m = 0; m < M; m++) {
        y[(size_t)m * total] = row_dot(fmt, w0, K, row_of(all, m, K));
        y[(size_t)m * total + 1] = row_dot(fmt, w0 + stride, K, row_of(all, m, K));
    }
#endif
}

static void two_rows_dot_all(int fmt, const uint8_t *w0, long stride, int K, qrow all, int M, float *y, int total) {
    switch (fmt) {
        case FMT_Q4_0: two_rows_dot_fmt(FMT_Q4_0, w0, stride, K, all, M, y, total); break;
        case FMT_Q4_1: two_rows_dot_fmt(FMT_Q4_1, w0, stride, K, all, M, y, total); break;
        case FMT_Q8: default: two_rows_dot_fmt(FMT_Q8, w0, stride, K, all, M, y, total); break;
    }
}

/* ---- int8 activations (fmt | FMT_ACT8): llama.cpp's precision, for who asks for it --------
 * x per group of 32 to int8 with one float scale, as llama.cpp's Q8_0 activations. A weight
 * block as 32 bytes then goes through vpmaddubsw (32 u8 x s8 products an instruction, twice
 * vpmaddwd's), and a Q4 block unpacks without widening: its 16 bytes in both 128-bit lanes,
 * the upper lane shifted right by 4. Measured on a 8192 x 2048 Q4_0 matrix, one thread:
 * 1.2x the int16 kernels on Zen 5; on Zen 4 (x8 layout, below) the model ran 0.8-1.0x. The price: SmolLM2's logits move by ~4e-2 instead of ~6e-4 (even
 * 9-bit activations give 1.8e-2 there), so int16 stays the default. K-quants take int8 in their
 * x8 layouts (kx8_dot8_n, q6kx8_dot8_n); in the file's rows they keep int16. */
enum { FMT_ACT8 = 0x100, FMT_BASE = 0xff };

/* One int8 activation row: q[K]; d[K/32] scale; s[K/32] = d * sum(q) (Q4_1's offset term);
 * o[K/2] = 8 * (q[2i] + q[2i + 1]): Q4_0's 8, taken off in the int16 pair sums; for the x8
 * kernels t[K/32] = sum(q) and qi[K]: each group's q in the order q4 x8 chunks hold their
 * weights (x8_dot8_n): q[2c], q[2c + 1], q[16 + 2c], q[17 + 2c] for c = 0..7. For the K-quant
 * x8 kernels (kx8_dot8_n, q6kx8_dot8_n): t16[K/16] = sum(q) per 16, and e[8 K]: q expanded
 * for their 32-byte steps (expand_row8), filled per tile of rows by qmatmul_multi. */
typedef struct { int8_t *q; float *d, *s; int16_t *o; int32_t *t; int8_t *qi; int16_t *t16; int8_t *e; } q8row;

static q8row row8_of(q8row all, int m, int K) {
    const int ng = K / 32;
    q8row r = { all.q + (size_t)m * K, all.d + (size_t)m * ng, all.s + (size_t)m * ng, all.o + (size_t)m * (K / 2),
                all.t + (size_t)m * ng, all.qi + (size_t)m * K, all.t16 ? all.t16 + (size_t)m * (K / 16) : NULL,
                all.e ? all.e + (size_t)m * K * 8 : NULL };
    return r;
}

static void quantize_row8(const float *x, int K, q8row r) {
    for (int g = 0; g < K / 32; g++) {
        const float *xg = x + g * 32;
        int8_t *q = r.q + g * 32;
        float amax = 0.f;
        for (int i = 0; i < 32; i++) { float a = fabsf(xg[i]); amax = a > amax ? a : amax; }
        const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
#if defined(__AVX2__)
        /* cvtps rounds to nearest even as lrintf does; packs interleave 128-bit lanes, the
           permute puts the 32 values back in order */
        __m256i v[4];
        for (int i = 0; i < 4; i++) v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + 8 * i), _mm256_set1_ps(id)));
        const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
        for (int i = 0; i < 32; i++) q[i] = (int8_t)lrintf(xg[i] * id);
#endif
        int sum = 0;
        for (int i = 0; i < 32; i++) sum += q[i];
        for (int i = 0; i < 16; i++) r.o[g * 16 + i] = (int16_t)(8 * (q[2 * i] + q[2 * i + 1]));
        for (int c = 0; c < 8; c++) {
            int8_t *qi = r.qi + g * 32 + 4 * c;
            qi[0] = q[2 * c]; qi[1] = q[2 * c + 1]; qi[2] = q[16 + 2 * c]; qi[3] = q[17 + 2 * c];
        }
        r.d[g] = d; r.s[g] = d * (float)sum; r.t[g] = sum;
        if (r.t16)
            for (int h = 0; h < 2; h++) {
                int sum16 = 0;
                for (int i = 0; i < 16; i++) sum16 += q[16 * h + i];
                r.t16[2 * g + h] = (int16_t)sum16;
            }
    }
}

/* e: the row's q for the K-quant x8 kernels' steps: four values q[4u .. 4u + 4) become 32
 * bytes at e + 32 u, q[4u], q[4u + 1] eight times in the low 128 bits and q[4u + 2], q[4u + 3]
 * eight times in the high: each 128-bit lane's pair against every row's two weights there */
static void expand_row8(const int8_t *q, int K, int8_t *e) {
#if defined(__AVX2__)
    const __m256i pairs = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                           2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
    for (int u = 0; u < K / 4; u++) {
        int32_t x4;
        memcpy(&x4, q + 4 * u, 4);
        _mm256_storeu_si256((__m256i *)(e + 32 * u), _mm256_shuffle_epi8(_mm256_set1_epi32(x4), pairs));
    }
#else
    for (int u = 0; u < K / 4; u++)
        for (int b = 0; b < 32; b++) e[32 * u + b] = q[4 * u + 2 * (b / 16) + b % 2];
#endif
}

#if defined(__AVX2__)
/* A block's 32 weights as bytes, ready for maddubs: Q4 nibbles 0..15 (natural order) in *w;
 * Q8 |w| in *w and the signs in *sgn (maddubs takes one unsigned operand) */
static inline void block8_regs(int fmt, const uint8_t *qs, __m256i *w, __m256i *sgn) {
    if (fmt == FMT_Q8) {
        *sgn = _mm256_loadu_si256((const __m256i *)qs);
        *w = _mm256_sign_epi8(*sgn, *sgn);  /* |-128| reads as 128 unsigned */
        return;
    }
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    *w = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_set_epi64x(4, 4, 0, 0)), _mm256_set1_epi8(0x0f));
    *sgn = _mm256_setzero_si256();
}
/* those weights . x[32] (int8) as 8 int32 lanes; o: the row's Q4_0 pair offsets for this group.
 * Pair sums stay within int16: Q4 2 * 15 * 127 (+ 2032), Q8 2 * 128 * 127. */
static inline __m256i block8_dot(int fmt, __m256i w, __m256i sgn, __m256i x, const int16_t *o) {
    __m256i p = _mm256_maddubs_epi16(w, fmt == FMT_Q8 ? _mm256_sign_epi8(x, sgn) : x);
    if (fmt == FMT_Q4_0) p = _mm256_sub_epi16(p, _mm256_loadu_si256((const __m256i *)o));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* two_rows_dot_n with int8 activations: two weight rows against N activation rows, each
 * block unpacked once for all N */
static inline __attribute__((always_inline)) void two_rows_dot8_n(
        int fmt, const uint8_t *w0, long stride, int K, q8row all, int m0, const int N, float *y, int total) {
    const uint8_t *w1 = w0 + stride;
    const int bs = fmt == FMT_Q4_0 ? 18 : fmt == FMT_Q4_1 ? 20 : 34, at = fmt == FMT_Q4_1 ? 4 : 2;
    __m256 acc0[4], acc1[4];
    float off0[4], off1[4];
    for (int i = 0; i < N; i++) { acc0[i] = acc1[i] = _mm256_setzero_ps(); off0[i] = off1[i] = 0.f; }
    for (int g = 0; g < K / 32; g++) {
        const uint8_t *b0 = w0 + (size_t)g * bs, *b1 = w1 + (size_t)g * bs;
        __m256i u0, s0, u1, s1;
        block8_regs(fmt, b0 + at, &u0, &s0);
        block8_regs(fmt, b1 + at, &u1, &s1);
        const float d0 = fp16_to_f32(*(const uint16_t *)b0), d1 = fp16_to_f32(*(const uint16_t *)b1);
        const float mn0 = fmt == FMT_Q4_1 ? fp16_to_f32(*(const uint16_t *)(b0 + 2)) : 0.f;
        const float mn1 = fmt == FMT_Q4_1 ? fp16_to_f32(*(const uint16_t *)(b1 + 2)) : 0.f;
        for (int i = 0; i < N; i++) {
            const q8row a = row8_of(all, m0 + i, K);
            const __m256i x = _mm256_loadu_si256((const __m256i *)(a.q + g * 32));
            const __m256i p0 = block8_dot(fmt, u0, s0, x, a.o + g * 16), p1 = block8_dot(fmt, u1, s1, x, a.o + g * 16);
            if (fmt == FMT_Q4_1) {
                off0[i] += mn0 * a.s[g];
                off1[i] += mn1 * a.s[g];
            }
            acc0[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d0 * a.d[g]), acc0[i]);
            acc1[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d1 * a.d[g]), acc1[i]);
        }
    }
    for (int i = 0; i < N; i++) {
        y[(size_t)(m0 + i) * total] = facc_sum(acc0[i]) + off0[i];
        y[(size_t)(m0 + i) * total + 1] = facc_sum(acc1[i]) + off1[i];
    }
}
#endif

/* One weight row (Q4_0, Q4_1 or Q8) . one int8 activation row */
static float row_dot8(int fmt, const uint8_t *wrow, int K, q8row a) {
    const int bs = fmt == FMT_Q4_0 ? 18 : fmt == FMT_Q4_1 ? 20 : 34, at = fmt == FMT_Q4_1 ? 4 : 2;
    facc acc = facc_zero();
    float off = 0.f;
    for (int g = 0; g < K / 32; g++) {
        const uint8_t *b = wrow + (size_t)g * bs, *qs = b + at;
#if defined(__AVX2__)
        __m256i w, sgn;
        block8_regs(fmt, qs, &w, &sgn);
        const ivec p = block8_dot(fmt, w, sgn, _mm256_loadu_si256((const __m256i *)(a.q + g * 32)), a.o + g * 16);
#else
        ivec p = 0;
        for (int i = 0; i < 32; i++) {
            const int wq = fmt == FMT_Q8 ? (int)(int8_t)qs[i] : (i < 16 ? qs[i] & 0x0f : qs[i - 16] >> 4) - (fmt == FMT_Q4_0 ? 8 : 0);
            p += wq * a.q[g * 32 + i];
        }
#endif
        acc = facc_add(acc, p, fp16_to_f32(*(const uint16_t *)b) * a.d[g]);
        if (fmt == FMT_Q4_1) off += fp16_to_f32(*(const uint16_t *)(b + 2)) * a.s[g];
    }
    return facc_sum(acc) + off;
}

static inline __attribute__((always_inline)) void two_rows_dot8_fmt(
        int fmt, const uint8_t *w0, long stride, int K, q8row all, int M, float *y, int total) {
#if defined(__AVX2__)
    int m = 0;
    for (; m + 4 <= M; m += 4) two_rows_dot8_n(fmt, w0, stride, K, all, m, 4, y, total);
    switch (M - m) {
        case 3: two_rows_dot8_n(fmt, w0, stride, K, all, m, 3, y, total); break;
        case 2: two_rows_dot8_n(fmt, w0, stride, K, all, m, 2, y, total); break;
        case 1: two_rows_dot8_n(fmt, w0, stride, K, all, m, 1, y, total); break;
        default: break;
    }
#else
    for (int m = 0; m < M; m++) {
        y[(size_t)m * total] = row_dot8(fmt, w0, K, row8_of(all, m, K));
        y[(size_t)m * total + 1] = row_dot8(fmt, w0 + stride, K, row8_of(all, m, K));
    }
#endif
}

static void two_rows_dot8_all(int fmt, const uint8_t *w0, long stride, int K, q8row all, int M, float *y, int total) {
    switch (fmt) {
        case FMT_Q4_0: two_rows_dot8_fmt(FMT_Q4_0, w0, stride, K, all, M, y, total); break;
        case FMT_Q4_1: two_rows_dot8_fmt(FMT_Q4_1, w0, stride, K, all, M, y, total); break;
        case FMT_Q8: default: two_rows_dot8_fmt(FMT_Q8, w0, stride, K, all, M, y, total); break;
    }
}

/* ---- eight rows interleaved (q4_0x8, q4_1x8, q8x8): the layout decode runs fastest on -----
 * Q4_0/Q4_1/Q8 matrices whose row count is a multiple of 8 are repacked at load
 * (fs_repack_x8; the same bytes, reordered). Eight rows' blocks of one group of 32 weights
 * lie together:
 *   q4_0x8 : { fp16 d[8]; u8 qs[8 chunks][16] }             144 bytes = 8 x 18
 *   q4_1x8 : { fp16 d[8]; fp16 m[8]; u8 qs[8 chunks][16] }  160 bytes = 8 x 20
 *   q8x8   : { fp16 d[8]; i8 qs[16 chunks][16] }            272 bytes = 8 x 34
 * Chunk c holds bytes 2c and 2c + 1 of each row r's block at bytes 2r and 2r + 1. Widened to
 * int16, chunk c has row r's weights 2c, 2c + 1 in int32 lane r (the Q4 high nibbles:
 * weights 2c + 16, 2c + 17), so one vpmaddwd against that activation pair, broadcast, adds
 * to eight rows' sums at once: no horizontal sums, no per-row scale arithmetic (the eight
 * fp16 scales convert in one instruction), Q4_0's 8 taken off once per group (8 sum(q)).
 * The same integer sums as the two-row kernels in about half the operations. */
static inline int x8_block_bytes(int fmt) { return fmt == FMT_Q4_0X8 ? 144 : fmt == FMT_Q4_1X8 ? 160 : 272; }
static inline int x8_of(int fmt) { return fmt == FMT_Q4_0 ? FMT_Q4_0X8 : fmt == FMT_Q4_1 ? FMT_Q4_1X8 : FMT_Q8X8; }

#if defined(__AVX2__) && defined(__F16C__)
#define FS_X8_AVX2 1
#endif

/* Rows r .. r + 8 of one row group (w) . N activation rows m0 .. m0 + N, into
 * y[(m0 + i) * total + 0 .. 8]. Each output takes the same operations for any N. */
#if defined(FS_X8_AVX2)
#define X8_PREFETCH_BYTES 4096
/* The `lines` cache lines from p + X8_PREFETCH_BYTES on, asked for now: a kernel asks for its
 * block's share of them as it starts on the block, so the lines arrive while it works on
 * what is already in cache. */
static inline __attribute__((always_inline)) void prefetch_ahead(const uint8_t *p, const int lines) {
    for (int l = 0; l < lines; l++) _mm_prefetch((const char *)(p + X8_PREFETCH_BYTES + 64 * l), _MM_HINT_T0);
}

/* acc + each int32 lane's int16 weight pair w . the activation pair x: one vpdpwssd where
 * AVX-512 VNNI is (a chain of them waits on its latency, 5 cycles: for sums with other chains
 * between their steps, kx8_unpacked_dot's), else vpmaddwd and an add. In the one-row kernels
 * (kx8_dot_n, q6kx8_dot_n) it measured 0.95-1.10x on Zen 4 decode, within the A/B's noise: not used there. */
static inline __m256i dot_pairs_into(__m256i acc, __m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(acc, w, x);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x));
#endif
}

/* acc + each int32 lane's int16 weight pairs w0, w1 . the activation pairs a0, a1 (two int16
 * each). The running sum takes one add per call: a chain of vpdpwssd into it would wait on
 * that instruction's latency (5 cycles) at every step. */
static inline __m256i dot_pairs_acc(__m256i acc, __m256i w0, int32_t a0, __m256i w1, int32_t a1) {
    const __m256i p = _mm256_madd_epi16(w0, _mm256_set1_epi32(a0));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_add_epi32(acc, _mm256_dpwssd_epi32(p, w1, _mm256_set1_epi32(a1)));
#else
    return _mm256_add_epi32(acc, _mm256_add_epi32(p, _mm256_madd_epi16(w1, _mm256_set1_epi32(a1))));
#endif
}

static inline __attribute__((always_inline)) void x8_dot_n(
        int fmt, const uint8_t *w, int K, qrow all, int m0, const int N, float *y, int total) {
    const int bs = x8_block_bytes(fmt), at = fmt == FMT_Q4_1X8 ? 32 : 16;
    const __m256i low4 = _mm256_set1_epi16(0x0f);
    __m256 acc[4];
    for (int i = 0; i < N; i++) acc[i] = _mm256_setzero_ps();
    for (int g = 0; g < K / 32; g++) {
        const uint8_t *b = w + (size_t)g * bs, *qs = b + at;
        prefetch_ahead(b, (bs + 63) / 64);
        __m256i p[4];
        for (int i = 0; i < N; i++) p[i] = _mm256_setzero_si256();
        if (fmt == FMT_Q8X8) {
            for (int c = 0; c < 16; c += 2) {
                const __m256i v0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qs + 16 * c)));
                const __m256i v1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qs + 16 * c + 16)));
                for (int i = 0; i < N; i++) {
                    int32_t pa, pb;
                    memcpy(&pa, all.q + (size_t)(m0 + i) * K + g * 32 + 2 * c, 4);
                    memcpy(&pb, all.q + (size_t)(m0 + i) * K + g * 32 + 2 * c + 2, 4);
                    p[i] = dot_pairs_acc(p[i], v0, pa, v1, pb);
                }
            }
        } else {
            for (int c = 0; c < 8; c++) {
                const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qs + 16 * c)));
                const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_srli_epi16(v, 4);
                for (int i = 0; i < N; i++) {
                    const int16_t *x = all.q + (size_t)(m0 + i) * K + g * 32;
                    int32_t pa, pb;
                    memcpy(&pa, x + 2 * c, 4);
                    memcpy(&pb, x + 16 + 2 * c, 4);
                    p[i] = dot_pairs_acc(p[i], lo, pa, hi, pb);
                }
            }
        }
        const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b));
        for (int i = 0; i < N; i++) {
            const qrow a = row_of(all, m0 + i, K);
            __m256i pi = p[i];
            if (fmt == FMT_Q4_0X8) pi = _mm256_sub_epi32(pi, _mm256_set1_epi32(8 * a.t[g]));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pi), _mm256_mul_ps(d8, _mm256_set1_ps(a.d[g])), acc[i]);
            if (fmt == FMT_Q4_1X8)
                acc[i] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 16))), _mm256_set1_ps(a.s[g]), acc[i]);
        }
    }
    for (int i = 0; i < N; i++) _mm256_storeu_ps(y + (size_t)(m0 + i) * total, acc[i]);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(FS_NO_X16)
#define FS_X8_AVX512 1  /* not on CPUs that split 512-bit vectors in two (kernels/__init__.py half_width_512) */
/* Two row groups (w, w + stride: sixteen rows) at once in 512-bit vectors, where they are
 * whole (Zen 5 and recent Intel execute them at full width): each chunk of both groups
 * widened into one vector, one vpdpwssd per sixteen rows' pair of weights. The same
 * integer sums and the same float steps per row as x8_dot_n, so a row's output does not
 * depend on which of the two kernels computed it. */
#define X16_PREFETCH_BYTES 2048
#define X16_ROWS 4  /* activation rows per pass: 8 integer and 4 float accumulators. Eight rows (16 + 8 of
                      * the 32 registers) spilled under gcc 12: 53 GMAC/s a core against 140-150 with four on Zen 5 */
/* chunk c of two row groups' blocks side by side */
static inline __m256i x16_chunk(const uint8_t *q0, const uint8_t *q1, int c) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(q0 + 16 * c))),
                                   _mm_loadu_si128((const __m128i *)(q1 + 16 * c)), 1);
}

static inline __attribute__((always_inline)) void x16_dot_n(
        int fmt, const uint8_t *w, long stride, int K, qrow all, int m0, const int N, float *y, int total) {
    const int bs = x8_block_bytes(fmt), at = fmt == FMT_Q4_1X8 ? 32 : 16;
    const __m512i low4 = _mm512_set1_epi16(0x0f);
    __m512 acc[X16_ROWS];
    for (int i = 0; i < N; i++) acc[i] = _mm512_setzero_ps();
    for (int g = 0; g < K / 32; g++) {
        const uint8_t *b0 = w + (size_t)g * bs, *b1 = b0 + stride, *q0 = b0 + at, *q1 = b1 + at;
        /* two streams a row group apart: the hardware prefetcher follows one well, not both */
        for (int l = 0; l < bs; l += 64) {
            _mm_prefetch((const char *)(b0 + X16_PREFETCH_BYTES + l), _MM_HINT_T0);
            _mm_prefetch((const char *)(b1 + X16_PREFETCH_BYTES + l), _MM_HINT_T0);
        }
        /* two running sums a row (weights w0, w1), each a chain of vpdpwssd: 2 N chains hide
           its latency once N is 4 (8 chains); the activation pairs come as broadcast memory operands */
        __m512i p[X16_ROWS], p1[X16_ROWS];
        for (int i = 0; i < N; i++) p[i] = p1[i] = _mm512_setzero_si512();
        for (int c = 0; c < (fmt == FMT_Q8X8 ? 16 : 8); c += (fmt == FMT_Q8X8 ? 2 : 1)) {
            __m512i w0, w1;  /* the weight pairs of activation pairs (c0, c1): Q4 low and high nibbles, Q8 chunks c, c + 1 */
            int c0 = 2 * c, c1 = 16 + 2 * c;
            if (fmt == FMT_Q8X8) {
                w0 = _mm512_cvtepi8_epi16(x16_chunk(q0, q1, c));
                w1 = _mm512_cvtepi8_epi16(x16_chunk(q0, q1, c + 1));
                c1 = 2 * c + 2;
            } else {
                const __m512i v = _mm512_cvtepu8_epi16(x16_chunk(q0, q1, c));
                w0 = _mm512_and_si512(v, low4);
                w1 = _mm512_srli_epi16(v, 4);
            }
            for (int i = 0; i < N; i++) {
                const int16_t *x = all.q + (size_t)(m0 + i) * K + g * 32;
                int32_t pa, pb;
                memcpy(&pa, x + c0, 4);
                memcpy(&pb, x + c1, 4);
                if (N >= 4) {
                    p[i] = _mm512_dpwssd_epi32(p[i], w0, _mm512_set1_epi32(pa));
                    p1[i] = _mm512_dpwssd_epi32(p1[i], w1, _mm512_set1_epi32(pb));
                } else {  /* too few chains: one add into the running sum instead (see dot_pairs_acc) */
                    p[i] = _mm512_add_epi32(p[i], _mm512_dpwssd_epi32(_mm512_madd_epi16(w0, _mm512_set1_epi32(pa)),
                                                                      w1, _mm512_set1_epi32(pb)));
                }
            }
        }
        if (N >= 4)
            for (int i = 0; i < N; i++) p[i] = _mm512_add_epi32(p[i], p1[i]);
        const __m512 d16 = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)b0)),
                                                                   _mm_loadu_si128((const __m128i *)b1), 1));
        for (int i = 0; i < N; i++) {
            const qrow a = row_of(all, m0 + i, K);
            __m512i pi = p[i];
            if (fmt == FMT_Q4_0X8) pi = _mm512_sub_epi32(pi, _mm512_set1_epi32(8 * a.t[g]));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pi), _mm512_mul_ps(d16, _mm512_set1_ps(a.d[g])), acc[i]);
            if (fmt == FMT_Q4_1X8) {
                const __m512 m16 = _mm512_cvtph_ps(_mm256_inserti128_si256(
                    _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(b0 + 16))), _mm_loadu_si128((const __m128i *)(b1 + 16)), 1));
                acc[i] = _mm512_fmadd_ps(m16, _mm512_set1_ps(a.s[g]), acc[i]);
            }
        }
    }
    for (int i = 0; i < N; i++) _mm512_storeu_ps(y + (size_t)(m0 + i) * total, acc[i]);
}
#endif
#else
/* Row `r` (0..7) of a row group . one activation row, in plain C (the portable build): int16
 * activations q16 or int8 q8 (the other NULL), with their rows' scales d, offset terms s, sums t */
static inline int act_at(const int16_t *q16, const int8_t *q8, size_t i) { return q16 ? q16[i] : q8[i]; }

static float x8_row_dot(int fmt, const uint8_t *w, int K, int r, const int16_t *q16, const int8_t *q8,
                        const float *d, const float *s, const int32_t *t) {
    const int bs = x8_block_bytes(fmt), at = fmt == FMT_Q4_1X8 ? 32 : 16;
    float acc = 0.f;
    for (int g = 0; g < K / 32; g++) {
        const uint8_t *b = w + (size_t)g * bs, *qs = b + at;
        const size_t x = (size_t)g * 32;
        int32_t p = 0;
        if (fmt == FMT_Q8X8) {
            for (int c = 0; c < 16; c++)
                for (int e = 0; e < 2; e++) p += (int8_t)qs[16 * c + 2 * r + e] * act_at(q16, q8, x + 2 * c + e);
        } else {
            for (int c = 0; c < 8; c++)
                for (int e = 0; e < 2; e++) {
                    const int byte = qs[16 * c + 2 * r + e];
                    p += (byte & 0x0f) * act_at(q16, q8, x + 2 * c + e) + (byte >> 4) * act_at(q16, q8, x + 16 + 2 * c + e);
                }
            if (fmt == FMT_Q4_0X8) p -= 8 * t[g];
        }
        acc += (float)p * (fp16_to_f32(*(const uint16_t *)(b + 2 * r)) * d[g]);
        if (fmt == FMT_Q4_1X8) acc += fp16_to_f32(*(const uint16_t *)(b + 16 + 2 * r)) * s[g];
    }
    return acc;
}
#endif

static inline __attribute__((always_inline)) void x8_dot_fmt(int fmt, const uint8_t *w, int K, qrow all, int M,
                                                             float *y, int total) {
#if defined(FS_X8_AVX2)
    int m = 0;
    for (; m + 4 <= M; m += 4) x8_dot_n(fmt, w, K, all, m, 4, y, total);
    switch (M - m) {
        case 3: x8_dot_n(fmt, w, K, all, m, 3, y, total); break;
        case 2: x8_dot_n(fmt, w, K, all, m, 2, y, total); break;
        case 1: x8_dot_n(fmt, w, K, all, m, 1, y, total); break;
        default: break;
    }
#else
    for (int m = 0; m < M; m++)
        for (int r = 0; r < 8; r++) {
            const qrow a = row_of(all, m, K);
            y[(size_t)m * total + r] = x8_row_dot(fmt, w, K, r, a.q, NULL, a.d, a.s, a.t);
        }
#endif
}

#if defined(FS_X8_AVX512)
static inline __attribute__((always_inline)) void x16_dot_fmt(int fmt, const uint8_t *w, long stride, int K, qrow all,
                                                              int M, float *y, int total) {
    int m = 0;
    for (; m + X16_ROWS <= M; m += X16_ROWS) x16_dot_n(fmt, w, stride, K, all, m, X16_ROWS, y, total);
    switch (M - m) {  /* fewer than X16_ROWS (4) left */
        case 3: x16_dot_n(fmt, w, stride, K, all, m, 3, y, total); break;
        case 2: x16_dot_n(fmt, w, stride, K, all, m, 2, y, total); break;
        case 1: x16_dot_n(fmt, w, stride, K, all, m, 1, y, total); break;
        default: break;
    }
}
#endif

/* x8 blocks . int8 activations (fmt | FMT_ACT8 with a q4_0x8/q4_1x8/q8x8 matrix): four
 * weights of a row in each 32-bit lane, one u8 x s8 dot product of four (vpdpbusd where
 * AVX-512 VNNI is; vpmaddubsw + vpmaddwd elsewhere) per eight rows' four weights, twice
 * the int16 kernels' products per instruction. From a q4 chunk c (rows' bytes 2c, 2c + 1)
 * lane r gets the nibbles lo(2c), lo(2c + 1), hi(2c), hi(2c + 1): weights 2c, 2c + 1,
 * 16 + 2c, 17 + 2c, the order of the activations' qi; q8 chunks c, c + 1 give weights
 * 2c .. 2c + 3, in q's order. vpdpbusd wants the unsigned operand first: the q4 nibbles are;
 * q8 weights are read as w + 128 and 128 sum(q) taken off (Q4_0's 8 likewise: 8 sum(q)). */
#if defined(FS_X8_AVX2)
static inline __m256i dot4_acc(__m256i acc, __m256i w, __m256i x, int q8) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    (void)q8;
    return _mm256_dpbusd_epi32(acc, w, x);
#else  /* pair sums within int16: q4 2 * 15 * 128; q8 as |w| and sign(x, w): 2 * 128 * 128 ... - 1 */
    if (q8) return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)),
                                                          _mm256_set1_epi16(1)));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}

/* the eight rows' lanes of two 128-bit halves: rows 0..3 from unpacklo, 4..7 from unpackhi */
static inline __m256i lanes_of(__m128i a, __m128i b) {
    return _mm256_set_m128i(_mm_unpackhi_epi16(a, b), _mm_unpacklo_epi16(a, b));
}

#define X8_ROWS8 4  /* activation rows per pass: 8 integer and 4 float sums; eight rows (16 + 8 of 32
                      * AVX-512 registers) spilled under gcc 12: 49-64 GMAC/s against 81-83 on Zen 5 */
static inline __attribute__((always_inline)) void x8_dot8_n(
        int fmt, const uint8_t *w, int K, q8row all, int m0, const int N, float *y, int total) {
    const int bs = x8_block_bytes(fmt), at = fmt == FMT_Q4_1X8 ? 32 : 16, q8 = fmt == FMT_Q8X8;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    const __m128i flip = _mm_set1_epi8(q8 ? (char)0x80 : 0);  /* q8 weights w + 128 as unsigned */
#else
    const __m128i flip = _mm_setzero_si128();  /* dot4_acc takes signed q8 weights */
#endif
    const __m128i low4 = _mm_set1_epi8(0x0f);
    __m256 acc[X8_ROWS8];
    for (int i = 0; i < N; i++) acc[i] = _mm256_setzero_ps();
    for (int g = 0; g < K / 32; g++) {
        const uint8_t *b = w + (size_t)g * bs, *qs = b + at;
        prefetch_ahead(b, (bs + 63) / 64);
        __m256i p[X8_ROWS8], p1[X8_ROWS8];  /* two chains a row (even, odd steps) */
        for (int i = 0; i < N; i++) p[i] = p1[i] = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++) {  /* q4: chunk c; q8: chunks 2c, 2c + 1 */
            __m256i wv;
            if (q8) {
                wv = lanes_of(_mm_xor_si128(_mm_loadu_si128((const __m128i *)(qs + 32 * c)), flip),
                              _mm_xor_si128(_mm_loadu_si128((const __m128i *)(qs + 32 * c + 16)), flip));
            } else {
                const __m128i v = _mm_loadu_si128((const __m128i *)(qs + 16 * c));
                wv = lanes_of(_mm_and_si128(v, low4), _mm_and_si128(_mm_srli_epi16(v, 4), low4));
            }
            for (int i = 0; i < N; i++) {
                const q8row a = row8_of(all, m0 + i, K);
                int32_t x4;
                memcpy(&x4, (q8 ? a.q : a.qi) + g * 32 + 4 * c, 4);
                if (c & 1) p1[i] = dot4_acc(p1[i], wv, _mm256_set1_epi32(x4), q8);
                else p[i] = dot4_acc(p[i], wv, _mm256_set1_epi32(x4), q8);
            }
        }
        const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        const int offset = fmt == FMT_Q4_0X8 ? 8 : q8 ? 128 : 0;
#else
        const int offset = fmt == FMT_Q4_0X8 ? 8 : 0;
#endif
        for (int i = 0; i < N; i++) {
            const q8row a = row8_of(all, m0 + i, K);
            const __m256i pi = _mm256_sub_epi32(_mm256_add_epi32(p[i], p1[i]), _mm256_set1_epi32(offset * a.t[g]));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pi), _mm256_mul_ps(d8, _mm256_set1_ps(a.d[g])), acc[i]);
            if (fmt == FMT_Q4_1X8)
                acc[i] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 16))), _mm256_set1_ps(a.s[g]), acc[i]);
        }
    }
    for (int i = 0; i < N; i++) _mm256_storeu_ps(y + (size_t)(m0 + i) * total, acc[i]);
}

static inline __attribute__((always_inline)) void x8_dot8_fmt(int fmt, const uint8_t *w, int K, q8row all, int M,
                                                              float *y, int total) {
    int m = 0;
    for (; m + X8_ROWS8 <= M; m += X8_ROWS8) x8_dot8_n(fmt, w, K, all, m, X8_ROWS8, y, total);
    switch (M - m) {
        case 3: x8_dot8_n(fmt, w, K, all, m, 3, y, total); break;
        case 2: x8_dot8_n(fmt, w, K, all, m, 2, y, total); break;
        case 1: x8_dot8_n(fmt, w, K, all, m, 1, y, total); break;
        default: break;
    }
}
#else
static inline void x8_dot8_fmt(int fmt, const uint8_t *w, int K, q8row all, int M, float *y, int total) {
    for (int m = 0; m < M; m++)
        for (int r = 0; r < 8; r++) {
            const q8row a = row8_of(all, m, K);
            y[(size_t)m * total + r] = x8_row_dot(fmt, w, K, r, NULL, a.q, a.d, a.s, a.t);
        }
}
#endif

static void kx8_dot8_all(int five, const uint8_t *w, int K, q8row all, int M, float *y, int total);
static void q6kx8_dot8_all(const uint8_t *w, int K, q8row all, int M, float *y, int total);

/* `groups` (1 or 2) row groups from w (stride bytes apart) . all M int8 activation rows */
static void x8_dot8_all(int fmt, const uint8_t *w, long stride, int groups, int K, q8row all, int M, float *y, int total) {
    for (int h = 0; h < groups; h++) {
        const uint8_t *wg = w + (size_t)h * stride;
        float *yg = y + 8 * h;
        switch (fmt) {
            case FMT_Q4_KX8: kx8_dot8_all(0, wg, K, all, M, yg, total); break;
            case FMT_Q5_KX8: kx8_dot8_all(1, wg, K, all, M, yg, total); break;
            case FMT_Q6_KX8: q6kx8_dot8_all(wg, K, all, M, yg, total); break;
            case FMT_Q4_0X8: x8_dot8_fmt(FMT_Q4_0X8, wg, K, all, M, yg, total); break;
            case FMT_Q4_1X8: x8_dot8_fmt(FMT_Q4_1X8, wg, K, all, M, yg, total); break;
            case FMT_Q8X8: default: x8_dot8_fmt(FMT_Q8X8, wg, K, all, M, yg, total); break;
        }
    }
}

/* q4_kx8 (Q4_K, eight rows): per super-block of 256 weights
 *   { fp16 d[8], dmin[8]; u8 sc[8 sub-blocks][8 rows], m[8][8]; u8 qs[4 pairs][16 chunks][16] }
 * 1184 bytes = 8 x 148: the 6-bit scales and mins decoded (4 bytes a row more than Q4_K's
 * 144); chunk c of pair p holds bytes 2c, 2c + 1 of row r's 32 bytes for sub-blocks 2p (low
 * nibbles) and 2p + 1 (high nibbles) at bytes 2r, 2r + 1, as in q4_0x8.
 * q5_kx8 (Q5_K): the same 1184 bytes, then u8 qh[16 chunks][16]: chunk c holds bytes 2c, 2c + 1
 * of row r's 32 qh bytes at 2r, 2r + 1 (bit j: the fifth bit of sub-block j's weight), so a
 * pair's chunk c and qh's chunk c hold the same weights; 1440 bytes = 8 x 180. */
#define Q4KX8_BYTES 1184
#define Q5KX8_BYTES 1440
#if !defined(FS_X8_AVX2)
/* Row r (0..7) of a q4_kx8 / q5_kx8 matrix . one activation row (int16 q16 or int8 q8, the
 * other NULL; d, s its scales and offset terms), in plain C */
static float kx8_row_dot(int five, const uint8_t *w, int K, int r, const int16_t *q16, const int8_t *q8,
                         const float *d, const float *s) {
    const int bytes = five ? Q5KX8_BYTES : Q4KX8_BYTES;
    float acc = 0.f;
    for (int sb = 0; sb < K / 256; sb++) {
        const uint8_t *b = w + (size_t)sb * bytes;
        const float dsb = fp16_to_f32(*(const uint16_t *)(b + 2 * r)), dmin = fp16_to_f32(*(const uint16_t *)(b + 16 + 2 * r));
        for (int j = 0; j < 8; j++) {
            const uint8_t *qs = b + 160 + 256 * (j / 2);
            const size_t x = (size_t)(sb * 8 + j) * 32;
            int32_t p = 0;
            for (int c = 0; c < 16; c++)
                for (int e = 0; e < 2; e++) {
                    const int byte = qs[16 * c + 2 * r + e];
                    const int fifth = five ? ((b[1184 + 16 * c + 2 * r + e] >> j) & 1) << 4 : 0;
                    p += (((j & 1) ? byte >> 4 : byte & 0x0f) | fifth) * act_at(q16, q8, x + 2 * c + e);
                }
            const int g = sb * 8 + j;
            acc += (float)p * (dsb * (float)b[32 + 8 * j + r] * d[g]) - dmin * (float)b[96 + 8 * j + r] * s[g];
        }
    }
    return acc;
}
#endif

#if defined(FS_X8_AVX2)
/* Sub-blocks 2 pr, 2 pr + 1 of super-block sb (its bytes b) into N activation rows' sums acc:
 * w = d sc_j q - dmin m_j, so each row's integer sums (plo, phi) times d sc_j and its scale
 * d[g], less dmin m_j times its offset term s[g] (rows ng groups apart in d and s) */
static inline __attribute__((always_inline)) void kx8_pair_into(__m256 *acc, const uint8_t *b, __m256 d8, __m256 dmin8,
                                                                int pr, int sb, const int N, const __m256i *plo,
                                                                const __m256i *phi, const float *d, const float *s, int ng) {
    for (int h = 0; h < 2; h++) {
        const int j = 2 * pr + h, g = sb * 8 + j;
        const __m256 sc = _mm256_mul_ps(d8, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 32 + 8 * j)))));
        const __m256 mn = _mm256_mul_ps(dmin8, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 96 + 8 * j)))));
        for (int i = 0; i < N; i++) {
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h ? phi[i] : plo[i]), _mm256_mul_ps(sc, _mm256_set1_ps(d[(size_t)i * ng + g])), acc[i]);
            acc[i] = _mm256_fnmadd_ps(mn, _mm256_set1_ps(s[(size_t)i * ng + g]), acc[i]);
        }
    }
}
#endif

static inline __attribute__((always_inline)) void kx8_dot_n(const int five, const uint8_t *w, int K, qrow all, int m0,
                                                            const int N, float *y, int total) {
#if defined(FS_X8_AVX2)
    const int bytes = five ? Q5KX8_BYTES : Q4KX8_BYTES;
    const __m256i low4 = _mm256_set1_epi16(0x0f), sixteen = _mm256_set1_epi16(16);
    __m256 acc[4];
    for (int i = 0; i < N; i++) acc[i] = _mm256_setzero_ps();
    for (int sb = 0; sb < K / 256; sb++) {
        const uint8_t *b = w + (size_t)sb * bytes;
        const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b));
        const __m256 dmin8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 16)));
        for (int pr = 0; pr < 4; pr++) {
            const uint8_t *qs = b + 160 + 256 * pr;
            prefetch_ahead(b + 384 * pr, 6);
            const __m128i bit = _mm_cvtsi32_si128(2 * pr);  /* qh's bits 2 pr, 2 pr + 1: this pair's fifth bits */
            __m256i plo[4], phi[4];
            for (int i = 0; i < N; i++) plo[i] = phi[i] = _mm256_setzero_si256();
            for (int c = 0; c < 16; c++) {
                const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qs + 16 * c)));
                __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_srli_epi16(v, 4);
                if (five) {
                    const __m256i h = _mm256_srl_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + 1184 + 16 * c))), bit);
                    lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(h, 4), sixteen));
                    hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(h, 3), sixteen));
                }
                for (int i = 0; i < N; i++) {
                    const int16_t *x = all.q + (size_t)(m0 + i) * K + (size_t)(sb * 8 + 2 * pr) * 32;
                    int32_t pa, pb;
                    memcpy(&pa, x + 2 * c, 4);
                    memcpy(&pb, x + 32 + 2 * c, 4);
                    plo[i] = _mm256_add_epi32(plo[i], _mm256_madd_epi16(lo, _mm256_set1_epi32(pa)));
                    phi[i] = _mm256_add_epi32(phi[i], _mm256_madd_epi16(hi, _mm256_set1_epi32(pb)));
                    __asm__("" : "+x"(plo[i]), "+x"(phi[i]));  /* one add a product: as in kx8_unpacked_dot */
                }
            }
            kx8_pair_into(acc, b, d8, dmin8, pr, sb, N, plo, phi, all.d + (size_t)m0 * (K / 32), all.s + (size_t)m0 * (K / 32), K / 32);
        }
    }
    for (int i = 0; i < N; i++) _mm256_storeu_ps(y + (size_t)(m0 + i) * total, acc[i]);
#else
    for (int i = 0; i < N; i++) {
        const qrow a = row_of(all, m0 + i, K);
        for (int r = 0; r < 8; r++) y[(size_t)(m0 + i) * total + r] = kx8_row_dot(five, w, K, r, a.q, NULL, a.d, a.s);
    }
#endif
}

static void kx8_dot_all(int five, const uint8_t *w, int K, qrow all, int M, float *y, int total) {
    int m = 0;
    if (five) {
        for (; m + 4 <= M; m += 4) kx8_dot_n(1, w, K, all, m, 4, y, total);
        for (; m < M; m++) kx8_dot_n(1, w, K, all, m, 1, y, total);
        return;
    }
    for (; m + 4 <= M; m += 4) kx8_dot_n(0, w, K, all, m, 4, y, total);
    switch (M - m) {
        case 3: kx8_dot_n(0, w, K, all, m, 3, y, total); break;
        case 2: kx8_dot_n(0, w, K, all, m, 2, y, total); break;
        case 1: kx8_dot_n(0, w, K, all, m, 1, y, total); break;
        default: break;
    }
}

/* q6_kx8 (Q6_K, eight rows): per super-block of 256 weights
 *   { fp16 d[8]; i8 sc[16 scales][8 rows]; then per half h (128 weights): u8 qa[16][16],
 *     qb[16][16], qh[16][16] }
 * where chunk c of qa, qb, qh holds bytes 2c, 2c + 1 of row r's ql[0..32), ql[32..64) and
 * qh[0..32) of that half at 2r, 2r + 1 (Q6_K: weight 32 i + l of a half is ql[l] (i = 0, 2)
 * or ql[32 + l] (i = 1, 3), low nibble for i < 2, high for i >= 2, with bits 2i, 2i + 1 of
 * qh[l] above them). 1680 bytes = 8 x 210, the file's own size. Activations are the int16
 * rows of the other formats (one scale per 32); each 16 weights' integer sum takes its scale
 * in float. */
#define Q6KX8_BYTES 1680
#if !defined(FS_X8_AVX2)
/* Row r (0..7) of a q6_kx8 matrix . one activation row (int16 q16 or int8 q8, the other NULL;
 * d its scales per 32), in plain C */
static float q6kx8_row_dot(const uint8_t *w, int K, int r, const int16_t *q16, const int8_t *q8, const float *d) {
    float acc = 0.f;
    for (int sb = 0; sb < K / 256; sb++) {
        const uint8_t *b = w + (size_t)sb * Q6KX8_BYTES;
        const float dsb = fp16_to_f32(*(const uint16_t *)(b + 2 * r));
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 4; i++)
                for (int half16 = 0; half16 < 2; half16++) {
                    int32_t p = 0;
                    for (int l = 16 * half16; l < 16 * half16 + 16; l++) {
                        const int at = 16 * (l / 2) + 2 * r + l % 2;
                        const uint8_t *qa = b + 144 + 768 * h;
                        const int byte = (i & 1) ? qa[256 + at] : qa[at];
                        const int q = (i < 2 ? byte & 0x0f : byte >> 4) | (((qa[512 + at] >> (2 * i)) & 3) << 4);
                        p += (q - 32) * act_at(q16, q8, (size_t)sb * 256 + 128 * h + 32 * i + l);
                    }
                    const int8_t sc = (int8_t)b[16 + 8 * (8 * h + 2 * i + half16) + r];
                    acc += (float)p * (dsb * (float)sc * d[sb * 8 + 4 * h + i]);
                }
    }
    return acc;
}
#endif

static inline __attribute__((always_inline)) void q6kx8_dot_n(const uint8_t *w, int K, qrow all, int m0, const int N,
                                                              float *y, int total) {
#if defined(FS_X8_AVX2)
    const __m256i m4 = _mm256_set1_epi16(0x0f), m30 = _mm256_set1_epi16(0x30), z = _mm256_set1_epi16(32);
    __m256 acc[2];
    for (int n = 0; n < N; n++) acc[n] = _mm256_setzero_ps();
    for (int sb = 0; sb < K / 256; sb++) {
        const uint8_t *b = w + (size_t)sb * Q6KX8_BYTES;
        const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b));
        for (int h = 0; h < 2; h++) {
            const uint8_t *qa = b + 144 + 768 * h, *qb = qa + 256, *qh = qa + 512;
            for (int half16 = 0; half16 < 2; half16++) {  /* weights l = 16 half16 .. + 16 of each i: one scale */
                prefetch_ahead(b + 448 * (2 * h + half16), 7);
                __m256i p[2][4];
                for (int n = 0; n < N; n++)
                    for (int i = 0; i < 4; i++) p[n][i] = _mm256_setzero_si256();
                for (int c = 8 * half16; c < 8 * half16 + 8; c++) {
                    const __m256i va = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qa + 16 * c)));
                    const __m256i vb = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qb + 16 * c)));
                    const __m256i hv = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qh + 16 * c)));
                    const __m256i q[4] = {
                        _mm256_sub_epi16(_mm256_or_si256(_mm256_and_si256(va, m4), _mm256_and_si256(_mm256_slli_epi16(hv, 4), m30)), z),
                        _mm256_sub_epi16(_mm256_or_si256(_mm256_and_si256(vb, m4), _mm256_and_si256(_mm256_slli_epi16(hv, 2), m30)), z),
                        _mm256_sub_epi16(_mm256_or_si256(_mm256_srli_epi16(va, 4), _mm256_and_si256(hv, m30)), z),
                        _mm256_sub_epi16(_mm256_or_si256(_mm256_srli_epi16(vb, 4), _mm256_and_si256(_mm256_srli_epi16(hv, 2), m30)), z) };
                    for (int n = 0; n < N; n++) {
                        const int16_t *x = all.q + (size_t)(m0 + n) * K + (size_t)sb * 256 + 128 * h + 2 * c;
                        for (int i = 0; i < 4; i++) {
                            int32_t pair;
                            memcpy(&pair, x + 32 * i, 4);
                            p[n][i] = _mm256_add_epi32(p[n][i], _mm256_madd_epi16(q[i], _mm256_set1_epi32(pair)));
                            __asm__("" : "+x"(p[n][i]));  /* one add a product: as in kx8_unpacked_dot */
                        }
                    }
                }
                for (int i = 0; i < 4; i++) {  /* scale 8 h + 2 i + half16 of the eight rows */
                    const __m256 sc = _mm256_mul_ps(d8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                        _mm_loadl_epi64((const __m128i *)(b + 16 + 8 * (8 * h + 2 * i + half16))))));
                    for (int n = 0; n < N; n++) {
                        const float ad = all.d[(size_t)(m0 + n) * (K / 32) + sb * 8 + 4 * h + i];
                        acc[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[n][i]), _mm256_mul_ps(sc, _mm256_set1_ps(ad)), acc[n]);
                    }
                }
            }
        }
    }
    for (int n = 0; n < N; n++) _mm256_storeu_ps(y + (size_t)(m0 + n) * total, acc[n]);
#else
    for (int n = 0; n < N; n++) {
        const qrow a = row_of(all, m0 + n, K);
        for (int r = 0; r < 8; r++) y[(size_t)(m0 + n) * total + r] = q6kx8_row_dot(w, K, r, a.q, NULL, a.d);
    }
#endif
}

static void q6kx8_dot_all(const uint8_t *w, int K, qrow all, int M, float *y, int total) {
    int m = 0;
    for (; m + 2 <= M; m += 2) q6kx8_dot_n(w, K, all, m, 2, y, total);
    if (m < M) q6kx8_dot_n(w, K, all, m, 1, y, total);
}

/* ---- K-quants in x8 layouts . many int16 activation rows: each super-block unpacked once ----
 * kx8_dot_n and q6kx8_dot_n widen and unpack a super-block again for every four (two)
 * activation rows, which over a prompt is most of their work. kx8_rows_dot unpacks each
 * super-block of one or two row groups once into int16 chunks in L1 (kx8_unpack), with its
 * rows' scales, and runs every activation row over it: per chunk and row one broadcast and
 * one vpmaddwd per group. A unit is what one float step takes: Q4_K/Q5_K sub-block j (16
 * chunks), Q6_K's sixteen weights of scale 8 h + 2 i + half16 (8 chunks), in the order the
 * decode kernels take them, with the same integer sums and float steps: each output is
 * theirs bit for bit, whichever kernel ran it. */
#if defined(FS_X8_AVX2)
#define KX8_GEMM_ROWS 8    /* from this many activation rows on (fewer: the decode kernels) */
#define KX8_GEMM_BLOCK 64  /* activation rows per unpacking (their sums: a 4 KiB buffer) */
typedef struct {
    __m256i w[128];         /* unit q's chunk c at q * chunks + c: weights 2c, 2c + 1 of its rows at lanes 2r, 2r + 1 */
    __m256 sc[16], mn[16];  /* per unit: d x scale and dmin x min of the eight rows (mn: Q4_K/Q5_K) */
} kx8_unpacked;

static inline __attribute__((always_inline)) void kx8_unpack(const int fmt, const uint8_t *b, kx8_unpacked *u) {
    const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b));
    if (fmt == FMT_Q6_KX8) {
        const __m256i m4 = _mm256_set1_epi16(0x0f), m30 = _mm256_set1_epi16(0x30), z = _mm256_set1_epi16(32);
        for (int h = 0; h < 2; h++) {
            const uint8_t *qa = b + 144 + 768 * h, *qb = qa + 256, *qh = qa + 512;
            for (int c = 0; c < 16; c++) {
                const __m256i va = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qa + 16 * c)));
                const __m256i vb = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qb + 16 * c)));
                const __m256i hv = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qh + 16 * c)));
                const int q0 = 8 * h + 4 * (c / 8);  /* unit (h, half16, i) = 8 h + 4 half16 + i */
                u->w[8 * q0 + c % 8] = _mm256_sub_epi16(_mm256_or_si256(_mm256_and_si256(va, m4), _mm256_and_si256(_mm256_slli_epi16(hv, 4), m30)), z);
                u->w[8 * (q0 + 1) + c % 8] = _mm256_sub_epi16(_mm256_or_si256(_mm256_and_si256(vb, m4), _mm256_and_si256(_mm256_slli_epi16(hv, 2), m30)), z);
                u->w[8 * (q0 + 2) + c % 8] = _mm256_sub_epi16(_mm256_or_si256(_mm256_srli_epi16(va, 4), _mm256_and_si256(hv, m30)), z);
                u->w[8 * (q0 + 3) + c % 8] = _mm256_sub_epi16(_mm256_or_si256(_mm256_srli_epi16(vb, 4), _mm256_and_si256(_mm256_srli_epi16(hv, 2), m30)), z);
            }
            for (int half16 = 0; half16 < 2; half16++)
                for (int i = 0; i < 4; i++)
                    u->sc[8 * h + 4 * half16 + i] = _mm256_mul_ps(d8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                        _mm_loadl_epi64((const __m128i *)(b + 16 + 8 * (8 * h + 2 * i + half16))))));
        }
        return;
    }
    const int five = fmt == FMT_Q5_KX8;
    const __m256i low4 = _mm256_set1_epi16(0x0f), sixteen = _mm256_set1_epi16(16);
    const __m256 dmin8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 16)));
    for (int j = 0; j < 8; j++) {
        u->sc[j] = _mm256_mul_ps(d8, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 32 + 8 * j)))));
        u->mn[j] = _mm256_mul_ps(dmin8, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 96 + 8 * j)))));
    }
    for (int pr = 0; pr < 4; pr++) {
        const uint8_t *qs = b + 160 + 256 * pr;
        const __m128i bit = _mm_cvtsi32_si128(2 * pr);
        for (int c = 0; c < 16; c++) {
            const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qs + 16 * c)));
            __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_srli_epi16(v, 4);
            if (five) {
                const __m256i h = _mm256_srl_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + 1184 + 16 * c))), bit);
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(h, 4), sixteen));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(h, 3), sixteen));
            }
            u->w[16 * (2 * pr) + c] = lo;
            u->w[16 * (2 * pr + 1) + c] = hi;
        }
    }
}

/* activation rows per kx8_unpacked_dot pass: with AVX-512 VNNI each product is one vpdpwssd
 * into its row's sum, a chain that waits on the instruction's latency (5 cycles), so four rows
 * (eight chains with two groups; 32 vector registers under AVX-512) keep both multipliers busy;
 * without it vpmaddwd and an add, two rows (16 registers) */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define KX8_UNPACKED_ROWS 4
#else
#define KX8_UNPACKED_ROWS 2
#endif

/* N (1 .. KX8_UNPACKED_ROWS) activation rows (m0 ..) over super-block sb of G (1, 2) unpacked
 * row groups u[g], their running sums in acc[(n * G + g) * 8 ..] */
static inline __attribute__((always_inline)) void kx8_unpacked_dot(const kx8_unpacked *u, const int G, const int six,
                                                                   int K, int sb, qrow all, int m0, const int N, float *acc) {
    const int units = six ? 16 : 8, chunks = six ? 8 : 16, ng = K / 32;
    const int16_t *x[KX8_UNPACKED_ROWS];
    const float *d[KX8_UNPACKED_ROWS], *s[KX8_UNPACKED_ROWS];
    __m256 a[KX8_UNPACKED_ROWS][2];
    for (int n = 0; n < N; n++) {
        x[n] = all.q + (size_t)(m0 + n) * K + (size_t)sb * 256;
        d[n] = all.d + (size_t)(m0 + n) * ng + (size_t)sb * 8;
        s[n] = all.s + (size_t)(m0 + n) * ng + (size_t)sb * 8;
        for (int g = 0; g < G; g++) a[n][g] = _mm256_loadu_ps(acc + (n * G + g) * 8);
    }
    for (int q = 0; q < units; q++) {
        const int xoff = six ? 128 * (q / 8) + 32 * (q % 4) + 16 * ((q / 4) % 2) : 32 * q;
        const int gi = six ? 4 * (q / 8) + q % 4 : q;
        __m256i p[KX8_UNPACKED_ROWS][2];
        for (int n = 0; n < N; n++)
            for (int g = 0; g < G; g++) p[n][g] = _mm256_setzero_si256();
        #pragma GCC unroll 16
        for (int c = 0; c < chunks; c++) {
            for (int n = 0; n < N; n++) {
                int32_t pair;
                memcpy(&pair, x[n] + xoff + 2 * c, 4);
                const __m256i bn = _mm256_set1_epi32(pair);
                for (int g = 0; g < G; g++) {
                    p[n][g] = dot_pairs_into(p[n][g], u[g].w[q * chunks + c], bn);
                    /* one add a product into its sum, as written: left to itself gcc kept every
                       product of the unrolled loop for a tree of adds, spilling them to the stack */
                    __asm__("" : "+x"(p[n][g]));
                }
            }
        }
        for (int n = 0; n < N; n++)
            for (int g = 0; g < G; g++) {
                a[n][g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[n][g]), _mm256_mul_ps(u[g].sc[q], _mm256_set1_ps(d[n][gi])), a[n][g]);
                if (!six) a[n][g] = _mm256_fnmadd_ps(u[g].mn[q], _mm256_set1_ps(s[n][gi]), a[n][g]);
            }
    }
    for (int n = 0; n < N; n++)
        for (int g = 0; g < G; g++) _mm256_storeu_ps(acc + (n * G + g) * 8, a[n][g]);
}

static inline __attribute__((always_inline)) void kx8_rows_dot_fmt(const int fmt, const uint8_t *w, long stride, const int G,
                                                                   int K, qrow all, int M, float *y, int total) {
    const int six = fmt == FMT_Q6_KX8, bytes = six ? Q6KX8_BYTES : fmt == FMT_Q5_KX8 ? Q5KX8_BYTES : Q4KX8_BYTES;
    kx8_unpacked u[2];
    float acc[KX8_GEMM_BLOCK * 2 * 8];
    for (int m0 = 0; m0 < M; m0 += KX8_GEMM_BLOCK) {
        const int mb = M - m0 < KX8_GEMM_BLOCK ? M - m0 : KX8_GEMM_BLOCK;
        memset(acc, 0, sizeof(float) * (size_t)mb * G * 8);
        for (int sb = 0; sb < K / 256; sb++) {
            for (int g = 0; g < G; g++) {
                const uint8_t *b = w + (size_t)g * stride + (size_t)sb * bytes;
                prefetch_ahead(b, (bytes + 63) / 64);
                kx8_unpack(fmt, b, &u[g]);
            }
            int m = 0;
            for (; m + KX8_UNPACKED_ROWS <= mb; m += KX8_UNPACKED_ROWS)
                kx8_unpacked_dot(u, G, six, K, sb, all, m0 + m, KX8_UNPACKED_ROWS, acc + (size_t)m * G * 8);
            switch (mb - m) {
#if KX8_UNPACKED_ROWS > 2
                case 3: kx8_unpacked_dot(u, G, six, K, sb, all, m0 + m, 3, acc + (size_t)m * G * 8); break;
                case 2: kx8_unpacked_dot(u, G, six, K, sb, all, m0 + m, 2, acc + (size_t)m * G * 8); break;
#endif
                case 1: kx8_unpacked_dot(u, G, six, K, sb, all, m0 + m, 1, acc + (size_t)m * G * 8); break;
                default: break;
            }
        }
        for (int m = 0; m < mb; m++)
            for (int g = 0; g < G; g++) memcpy(y + (size_t)(m0 + m) * total + 8 * g, acc + (size_t)(m * G + g) * 8, 8 * sizeof(float));
    }
}

static long kx8_unpacked_products = 0;  /* activation rows x row groups done by kx8_rows_dot (fs_kx8_unpacked_products) */

long fs_kx8_unpacked_products(void) { return __atomic_load_n(&kx8_unpacked_products, __ATOMIC_RELAXED); }

/* `groups` (1 or 2) row groups of a K-quant x8 matrix (w, stride bytes apart) . M int16 activation rows */
static void kx8_rows_dot(int fmt, const uint8_t *w, long stride, int groups, int K, qrow all, int M, float *y, int total) {
    __atomic_fetch_add(&kx8_unpacked_products, (long)M * groups, __ATOMIC_RELAXED);
    switch (fmt) {
        case FMT_Q4_KX8: groups == 2 ? kx8_rows_dot_fmt(FMT_Q4_KX8, w, stride, 2, K, all, M, y, total)
                                     : kx8_rows_dot_fmt(FMT_Q4_KX8, w, stride, 1, K, all, M, y, total); break;
        case FMT_Q5_KX8: groups == 2 ? kx8_rows_dot_fmt(FMT_Q5_KX8, w, stride, 2, K, all, M, y, total)
                                     : kx8_rows_dot_fmt(FMT_Q5_KX8, w, stride, 1, K, all, M, y, total); break;
        default: groups == 2 ? kx8_rows_dot_fmt(FMT_Q6_KX8, w, stride, 2, K, all, M, y, total)
                             : kx8_rows_dot_fmt(FMT_Q6_KX8, w, stride, 1, K, all, M, y, total); break;
    }
}
#else
long fs_kx8_unpacked_products(void) { return 0; }
#endif

/* ---- K-quants in x8 layouts . int8 activations (fmt | FMT_ACT8): llama.cpp's precision ----
 * A 32-byte load of chunks 2u, 2u + 1 holds, in 128-bit lane L, bytes 4u + 2L, 4u + 2L + 1 of
 * each row r at 2r, 2r + 1: as nibbles (with Q5_K's fifth bits, Q6_K's high two), weights in
 * bytes 0..31, unwidened. vpmaddubsw against the activation row's e (expand_row8: lane L holds
 * x[4u + 2L], x[4u + 2L + 1] eight times) gives row r's two products in int16 lane r of each
 * 128-bit lane. Those add in int16 while they cannot overflow (|q| <= 127: Q4_K 8 steps of
 * 2 x 15 x 127, Q5_K 4 of 2 x 31 x 127, Q6_K 2 of 2 x 63 x 127), then both lanes' rows widen
 * into int32. About half the int16 kernels' operations a weight: Q5_K's decode was bound by
 * them (7.3 GB/s against Q4_K's 11 on one core). Q6_K's -32 is taken off per 16 as 32 sum(q). */
#if defined(FS_X8_AVX2)
static inline __m256i rows_widened(__m256i s) {  /* int16 rows 0..7 of both lanes -> their int32 sums */
    return _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(s)),
                            _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s, 1)));
}

/* bit `bit` of each byte of h at bit 4 (other bits to be masked off): shifts of 16-bit lanes
 * keep it within its byte for bit 0..7 (left by at most 4, right by at most 3) */
static inline __m256i bit_at4(__m256i h, const int bit) {
    return bit < 4 ? _mm256_slli_epi16(h, 4 - bit) : bit > 4 ? _mm256_srli_epi16(h, bit - 4) : h;
}
#endif

static inline __attribute__((always_inline)) void kx8_dot8_n(const int five, const uint8_t *w, int K, q8row all,
                                                             int m0, const int N, float *y, int total) {
#if defined(FS_X8_AVX2)
    const int bytes = five ? Q5KX8_BYTES : Q4KX8_BYTES;
    const __m256i low4 = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(0x10);
    const int steps = five ? 4 : 8;  /* 32-byte steps a sub-block pair adds in int16 */
    __m256 acc[4];
    for (int i = 0; i < N; i++) acc[i] = _mm256_setzero_ps();
    for (int sb = 0; sb < K / 256; sb++) {
        const uint8_t *b = w + (size_t)sb * bytes;
        const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b));
        const __m256 dmin8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 16)));
        #pragma GCC unroll 4
        for (int pr = 0; pr < 4; pr++) {  /* sub-blocks 2 pr (low nibbles), 2 pr + 1 (high) */
            const uint8_t *qs = b + 160 + 256 * pr, *qh = b + 1184;
            prefetch_ahead(b + 384 * pr, 6);
            __m256i plo[4], phi[4];
            for (int i = 0; i < N; i++) plo[i] = phi[i] = _mm256_setzero_si256();
            for (int u0 = 0; u0 < 8; u0 += steps) {
                __m256i slo[4], shi[4];
                for (int i = 0; i < N; i++) slo[i] = shi[i] = _mm256_setzero_si256();
                for (int u = u0; u < u0 + steps; u++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * u));
                    __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                    if (five) {
                        const __m256i h = _mm256_loadu_si256((const __m256i *)(qh + 32 * u));
                        lo = _mm256_or_si256(lo, _mm256_and_si256(bit_at4(h, 2 * pr), bit4));
                        hi = _mm256_or_si256(hi, _mm256_and_si256(bit_at4(h, 2 * pr + 1), bit4));
                    }
                    for (int i = 0; i < N; i++) {
                        const int8_t *e = all.e + (size_t)(m0 + i) * K * 8 + (size_t)8 * (sb * 256 + 64 * pr + 4 * u);
                        slo[i] = _mm256_add_epi16(slo[i], _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)e)));
                        shi[i] = _mm256_add_epi16(shi[i], _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(e + 256))));
                    }
                }
                for (int i = 0; i < N; i++) {
                    plo[i] = _mm256_add_epi32(plo[i], rows_widened(slo[i]));
                    phi[i] = _mm256_add_epi32(phi[i], rows_widened(shi[i]));
                }
            }
            kx8_pair_into(acc, b, d8, dmin8, pr, sb, N, plo, phi, all.d + (size_t)m0 * (K / 32), all.s + (size_t)m0 * (K / 32), K / 32);
        }
    }
    for (int i = 0; i < N; i++) _mm256_storeu_ps(y + (size_t)(m0 + i) * total, acc[i]);
#else
    for (int i = 0; i < N; i++) {
        const q8row a = row8_of(all, m0 + i, K);
        for (int r = 0; r < 8; r++) y[(size_t)(m0 + i) * total + r] = kx8_row_dot(five, w, K, r, NULL, a.q, a.d, a.s);
    }
#endif
}

static void kx8_dot8_all(int five, const uint8_t *w, int K, q8row all, int M, float *y, int total) {
    int m = 0;
    if (five) {  /* two rows at a time: Q5_K's int16 and int32 sums of four take all 16 registers */
        for (; m + 2 <= M; m += 2) kx8_dot8_n(1, w, K, all, m, 2, y, total);
        if (m < M) kx8_dot8_n(1, w, K, all, m, 1, y, total);
        return;
    }
    for (; m + 4 <= M; m += 4) kx8_dot8_n(0, w, K, all, m, 4, y, total);
    switch (M - m) {
        case 3: kx8_dot8_n(0, w, K, all, m, 3, y, total); break;
        case 2: kx8_dot8_n(0, w, K, all, m, 2, y, total); break;
        case 1: kx8_dot8_n(0, w, K, all, m, 1, y, total); break;
        default: break;
    }
}

#if defined(FS_X8_AVX2)
/* the 32 bytes of 6-bit weights (0..63) of step u for i (q6kx8_dot_n's qa, qb, qh) */
static inline __m256i q6_weights(const uint8_t *qa, const uint8_t *qb, const uint8_t *qh, int u, const int i) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m30 = _mm256_set1_epi8(0x30);
    const __m256i v = _mm256_loadu_si256((const __m256i *)((i & 1 ? qb : qa) + 32 * u));
    const __m256i hv = _mm256_loadu_si256((const __m256i *)(qh + 32 * u));
    const __m256i low = _mm256_and_si256(i < 2 ? v : _mm256_srli_epi16(v, 4), m4);
    const __m256i high = i == 0 ? _mm256_slli_epi16(hv, 4) : i == 1 ? _mm256_slli_epi16(hv, 2) : i == 2 ? hv : _mm256_srli_epi16(hv, 2);
    return _mm256_or_si256(low, _mm256_and_si256(high, m30));
}
#endif

static inline __attribute__((always_inline)) void q6kx8_dot8_n(const uint8_t *w, int K, q8row all, int m0, const int N,
                                                               float *y, int total) {
#if defined(FS_X8_AVX2)
    __m256 acc[2];
    for (int n = 0; n < N; n++) acc[n] = _mm256_setzero_ps();
    for (int sb = 0; sb < K / 256; sb++) {
        const uint8_t *b = w + (size_t)sb * Q6KX8_BYTES;
        const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b));
        for (int h = 0; h < 2; h++) {
            const uint8_t *qa = b + 144 + 768 * h, *qb = qa + 256, *qh = qa + 512;
            for (int half16 = 0; half16 < 2; half16++) {  /* weights l = 16 half16 .. + 16 of each i: one scale */
                prefetch_ahead(b + 448 * (2 * h + half16), 7);
                #pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                    __m256i p[2];
                    #pragma GCC unroll 2
                    for (int pair = 0; pair < 2; pair++) {  /* steps u, u + 1: their int16 sums stay in range */
                        const int u = 4 * half16 + 2 * pair;
                        const __m256i q0 = q6_weights(qa, qb, qh, u, i), q1 = q6_weights(qa, qb, qh, u + 1, i);
                        for (int n = 0; n < N; n++) {
                            const int8_t *e = all.e + (size_t)(m0 + n) * K * 8 + (size_t)8 * (sb * 256 + 128 * h + 32 * i + 4 * u);
                            const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(q0, _mm256_loadu_si256((const __m256i *)e)),
                                                               _mm256_maddubs_epi16(q1, _mm256_loadu_si256((const __m256i *)(e + 32))));
                            p[n] = pair ? _mm256_add_epi32(p[n], rows_widened(s)) : rows_widened(s);
                        }
                    }
                    /* scale 8 h + 2 i + half16 of the eight rows */
                    const __m256 sc = _mm256_mul_ps(d8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                        _mm_loadl_epi64((const __m128i *)(b + 16 + 8 * (8 * h + 2 * i + half16))))));
                    for (int n = 0; n < N; n++) {
                        const q8row a = row8_of(all, m0 + n, K);
                        const int g16 = sb * 16 + 8 * h + 2 * i + half16;
                        const __m256i pi = _mm256_sub_epi32(p[n], _mm256_set1_epi32(32 * a.t16[g16]));
                        acc[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pi), _mm256_mul_ps(sc, _mm256_set1_ps(a.d[g16 / 2])), acc[n]);
                    }
                }
            }
        }
    }
    for (int n = 0; n < N; n++) _mm256_storeu_ps(y + (size_t)(m0 + n) * total, acc[n]);
#else
    for (int n = 0; n < N; n++) {
        const q8row a = row8_of(all, m0 + n, K);
        for (int r = 0; r < 8; r++) y[(size_t)(m0 + n) * total + r] = q6kx8_row_dot(w, K, r, NULL, a.q, a.d);
    }
#endif
}

static void q6kx8_dot8_all(const uint8_t *w, int K, q8row all, int M, float *y, int total) {
    int m = 0;
    for (; m + 2 <= M; m += 2) q6kx8_dot8_n(w, K, all, m, 2, y, total);
    if (m < M) q6kx8_dot8_n(w, K, all, m, 1, y, total);
}

/* ---- 16-bit float rows (GGUF F16, BF16): kept as the file has them, half the memory of fp32 ----
 * Nothing to quantize: the activations stay float and each product is an fp32 fma of the
 * widened weights (exact to the file's values; only the float sums round). Two weight rows
 * at a time against each activation row, four partial sums a row to hide the fma latency. */
static inline float bf16_to_f32(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#if defined(__AVX2__) && defined(__F16C__)
static inline __m256 widen8(int fmt, const uint16_t *w) {
    const __m128i v = _mm_loadu_si128((const __m128i *)w);
    if (fmt == FMT_F16) return _mm256_cvtph_ps(v);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
#endif

/* rows w0 and w0 + stride bytes (`two` of them: 1 or 2) . x[M][K] into y[m * total + 0 .. two] */
static void f16_rows_dot(int fmt, const uint8_t *w0, long stride, int two, int K, const float *x, int M, float *y,
                         int total) {
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * K;
        for (int e = 0; e < two; e++) {
            const uint16_t *w = (const uint16_t *)(w0 + (size_t)e * stride);
            float sum = 0.f;
            int i = 0;
#if defined(__AVX2__) && defined(__F16C__)
            __m256 acc[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps() };
            for (; i + 32 <= K; i += 32)
                for (int u = 0; u < 4; u++)
                    acc[u] = _mm256_fmadd_ps(widen8(fmt, w + i + 8 * u), _mm256_loadu_ps(xm + i + 8 * u), acc[u]);
            sum = facc_sum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#endif
            for (; i < K; i++) sum += (fmt == FMT_F16 ? fp16_to_f32(w[i]) : bf16_to_f32(w[i])) * xm[i];
            y[(size_t)m * total + e] = sum;
        }
    }
}

/* 1 where the x8 kernels take vpdpwssd (AVX-512 VNNI, 512- or 256-bit vectors): then they beat
 * dequantize + GEMM at any prompt length (quant.py reads this). */
int fs_x8_vnni(void) {
#if defined(FS_X8_AVX2) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return 1;
#else
    return 0;
#endif
}

/* The widest vectors the x8 kernels use in this build: 512, 256 (AVX2), 0 (plain C). */
int fs_simd_bits(void) {
#if defined(FS_X8_AVX512)
    return 512;
#elif defined(FS_X8_AVX2)
    return 256;
#else
    return 0;
#endif
}

/* Sixteen weight rows (two x8 row groups) . sixteen activation rows at a time on AMX's
 * tiles (Sapphire Rapids and later), the same numbers as x16_dot_n's vpdpwssd: int8 tiles
 * take int16 activations exactly as two planes, q = 256 hi + lo (hi = q >> 8 signed, lo =
 * q & 255 unsigned), so per 32-weight block tdpbssd(hi, w) x 256 + tdpbusd(lo, w) is the
 * integer sum x16_dot_n gets, and the float steps after it are x16_dot_n's too: the same
 * bits. B (weights) is one 8 x 64-byte tile a block: row c holds, per matrix row (4 bytes),
 * the weights 2c, 2c + 1, 16 + 2c, 17 + 2c (q4: the chunk's low and high nibbles, as the
 * int8 kernel's lanes_of, Q4_0's less 8; q8: chunks c and c + 8), and the activation planes
 * follow that order (amx_split_row). The per-block scales keep this from AMX's peak: each
 * block's two 16 x 16 int32 sums go through memory to AVX-512 float steps. One 512 x 2048 x
 * 8192 Q4_0 product on one Xeon core: ~77 ms, of which ~40 ms tile loads, products and
 * stores and ~28 ms float steps; x16_dot_n ~100 ms. */
#if defined(FS_X8_AVX512) && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define FS_AMX 1
#include <sys/syscall.h>
static int amx_on = 0;  /* fs_set_amx: the process may use the tiles, and the kernels should */
static long amx_products = 0;  /* activation rows x 16 weight rows done on the tiles (fs_amx_products) */

long fs_amx_products(void) { return __atomic_load_n(&amx_products, __ATOMIC_RELAXED); }

/* the tile configuration (palette 1): a constant, so no store to it can be dropped (GCC 12
 * drops the stores to a stack copy only ldtilecfg reads: llama.cpp's crash at ldtilecfg) */
typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } amx_config;
static const amx_config AMX_CONFIG __attribute__((aligned(64))) = {
    .palette = 1,
    .colsb = { 32, 32, 64, 64, 64, 64, 64 },  /* 0, 1: activation planes hi, lo (16 rows x 32 bytes); 2: B; 3-6: sums */
    .rows = { 16, 16, 8, 16, 16, 16, 16 },
};

int fs_set_amx(int on) {
    if (on && !amx_on) {  /* Linux hands out the tiles' state only on request (XFEATURE_XTILEDATA = 18) */
        amx_on = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) == 0;
        return amx_on;
    }
    amx_on = on != 0 && amx_on;
    return amx_on;
}

/* the activation row's int16 values as the planes hi, lo in AMX's order (32 per block) */
static void amx_split_row(const int16_t *q, int K, int8_t *hi, uint8_t *lo) {
    for (int g = 0; g < K; g += 32)
        for (int c = 0; c < 8; c++) {
            const int from[4] = { g + 2 * c, g + 2 * c + 1, g + 16 + 2 * c, g + 17 + 2 * c };
            for (int e = 0; e < 4; e++) {
                const int v = q[from[e]];
                hi[g + 4 * c + e] = (int8_t)(v >> 8);
                lo[g + 4 * c + e] = (uint8_t)(v & 255);
            }
        }
}

static __thread uint8_t *amx_b;  /* a thread's B tiles for one pair of row groups: K / 32 x 512 bytes */
static __thread size_t amx_b_bytes;

/* the weights of two row groups (w, w + stride) as B tiles, block after block */
static int amx_weights(int fmt, const uint8_t *w, long stride, int K) {
    const size_t need = (size_t)K * 16;
    if (amx_b_bytes < need) {
        free(amx_b);
        amx_b_bytes = 0;
        if (posix_memalign((void **)&amx_b, 64, need) != 0) { amx_b = NULL; return 0; }
        amx_b_bytes = need;
    }
    const int bs = x8_block_bytes(fmt), at = fmt == FMT_Q4_1X8 ? 32 : 16;
    const __m128i low4 = _mm_set1_epi8(0x0f);
    const __m256i eight = _mm256_set1_epi8(8);
    for (int g = 0; g < K / 32; g++)
        for (int h = 0; h < 2; h++) {
            const uint8_t *qs = w + (size_t)h * stride + (size_t)g * bs + at;
            uint8_t *out = amx_b + (size_t)g * 512 + 32 * h;
            for (int c = 0; c < 8; c++) {
                __m256i lanes;
                if (fmt == FMT_Q8X8) {
                    lanes = lanes_of(_mm_loadu_si128((const __m128i *)(qs + 16 * c)),
                                     _mm_loadu_si128((const __m128i *)(qs + 16 * (c + 8))));
                } else {
                    const __m128i v = _mm_loadu_si128((const __m128i *)(qs + 16 * c));
                    lanes = lanes_of(_mm_and_si128(v, low4), _mm_and_si128(_mm_srli_epi16(v, 4), low4));
                    if (fmt == FMT_Q4_0X8) lanes = _mm256_sub_epi8(lanes, eight);  /* -8 .. 7: no 8 sum(q) to take off */
                }
                _mm256_storeu_si256((__m256i *)(out + 64 * c), lanes);
            }
        }
    return 1;
}

/* block g's tile products into sums (two tiles: hi, lo): tiles 3, 4 for even blocks and 5, 6
 * for odd ones, so the float steps of one block run while the next one's sums are stored */
#define AMX_BLOCK(C_HI, C_LO, hi, lo, b, K, out) do {                                     \
        _tile_loadd(0, hi, K); _tile_loadd(1, lo, K); _tile_loadd(2, b, 64);             \
        _tile_zero(C_HI); _tile_zero(C_LO);                                              \
        _tile_dpbssd(C_HI, 0, 2); _tile_dpbusd(C_LO, 1, 2);                              \
        _tile_stored(C_HI, (out)[0], 64); _tile_stored(C_LO, (out)[1], 64);              \
    } while (0)

/* rows m0 .. m0 + 16 of `all` . the 16 weight rows in amx_b, into y as x16_dot_n */
static inline __attribute__((always_inline)) void amx_dot16(int fmt, const uint8_t *w, long stride, int K, qrow all,
                                                            int m0, float *y, int total) {
    const int bs = x8_block_bytes(fmt), ng = K / 32;
    int32_t sums[2][2][16][16] __attribute__((aligned(64)));  /* [block parity][hi, lo][row][column] */
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    const qrow a = row_of(all, m0, K);
    AMX_BLOCK(3, 4, a.hi, a.lo, amx_b, K, sums[0]);
    for (int g = 0; g < ng; g++) {
        if (g + 1 < ng) {
            const size_t at = 32 * (size_t)(g + 1);
            if (g & 1) AMX_BLOCK(3, 4, a.hi + at, a.lo + at, amx_b + (size_t)(g + 1) * 512, K, sums[0]);
            else AMX_BLOCK(5, 6, a.hi + at, a.lo + at, amx_b + (size_t)(g + 1) * 512, K, sums[1]);
        }
        int32_t (*s)[16][16] = sums[g & 1];
        const uint8_t *b0 = w + (size_t)g * bs, *b1 = b0 + stride;
        const __m512 d16 = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)b0)),
                                                                   _mm_loadu_si128((const __m128i *)b1), 1));
        __m512 m16 = _mm512_setzero_ps();
        if (fmt == FMT_Q4_1X8)
            m16 = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(b0 + 16))),
                                                          _mm_loadu_si128((const __m128i *)(b1 + 16)), 1));
        for (int i = 0; i < 16; i++) {  /* Q4_0's 8 is in the tiles' weights already (amx_weights) */
            const __m512i p = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(s[0][i]), 8), _mm512_load_si512(s[1][i]));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(d16, _mm512_set1_ps(a.d[(size_t)i * ng + g])), acc[i]);
            if (fmt == FMT_Q4_1X8) acc[i] = _mm512_fmadd_ps(m16, _mm512_set1_ps(a.s[(size_t)i * ng + g]), acc[i]);
        }
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_ps(y + (size_t)(m0 + i) * total, acc[i]);
}

/* Rows 0 .. M / 16 * 16 of `all` through the tiles (when they hold the planes and AMX is on);
 * returns how many, the rest left to x16_dot_fmt */
static int amx_dot_fmt(int fmt, const uint8_t *w, long stride, int K, qrow all, int M, float *y, int total) {
    if (!amx_on || !all.hi || M < 16 || K > 64 * 1024 || !amx_weights(fmt, w, stride, K)) return 0;
    _tile_loadconfig(&AMX_CONFIG);  /* per call: torch's oneDNN may use (and release) this thread's tiles between */
    int m = 0;
    for (; m + 16 <= M; m += 16) {
        switch (fmt) {
            case FMT_Q4_0X8: amx_dot16(FMT_Q4_0X8, w, stride, K, all, m, y, total); break;
            case FMT_Q4_1X8: amx_dot16(FMT_Q4_1X8, w, stride, K, all, m, y, total); break;
            default: amx_dot16(FMT_Q8X8, w, stride, K, all, m, y, total); break;
        }
    }
    _tile_release();
    __atomic_fetch_add(&amx_products, m, __ATOMIC_RELAXED);
    return m;
}
#else
int fs_set_amx(int on) { (void)on; return 0; }
long fs_amx_products(void) { return 0; }
#endif

/* One activation row (decode) through x16_dot_n as well (fs_set_single_row_x16), or a group
 * at a time through x8_dot_n. Where decode is bound by memory (Zen 5) a single stream ran
 * 1.2-1.3x faster than x16_dot_n's two; where it is bound by the core (an Intel Xeon with AVX-512
 * at 13 GB/s a core, 2026-12), x16_dot_n's half the instructions a weight won: a 1B Q4_0's
 * decode 1.46x (1 thread) and 1.59x (2 threads) in one process (bench/kernels_ab.py). */
static int single_row_x16 = 0;

void fs_set_single_row_x16(int on) { single_row_x16 = on != 0; }

/* `groups` (1 or 2) row groups from w (stride bytes apart) . all M activation rows. */
static void x8_dot_all(int fmt, const uint8_t *w, long stride, int groups, int K, qrow all, int M, float *y, int total) {
#if defined(FS_X8_AVX2)
    if (M >= KX8_GEMM_ROWS && (fmt == FMT_Q4_KX8 || fmt == FMT_Q5_KX8 || fmt == FMT_Q6_KX8)) {
        kx8_rows_dot(fmt, w, stride, groups, K, all, M, y, total);
        return;
    }
#endif
    if (fmt == FMT_Q4_KX8 || fmt == FMT_Q5_KX8) {
        for (int h = 0; h < groups; h++) kx8_dot_all(fmt == FMT_Q5_KX8, w + (size_t)h * stride, K, all, M, y + 8 * h, total);
        return;
    }
    if (fmt == FMT_Q6_KX8) {
        for (int h = 0; h < groups; h++) q6kx8_dot_all(w + (size_t)h * stride, K, all, M, y + 8 * h, total);
        return;
    }
#if defined(FS_X8_AVX512)
    if (groups == 2 && (M >= 2 || single_row_x16)) {
#if defined(FS_AMX)
        const int done = amx_dot_fmt(fmt, w, stride, K, all, M, y, total);
        if (done == M) return;
        all = row_of(all, done, K);
        y += (size_t)done * total;
        M -= done;
#endif
        switch (fmt) {
            case FMT_Q4_0X8: x16_dot_fmt(FMT_Q4_0X8, w, stride, K, all, M, y, total); break;
            case FMT_Q4_1X8: x16_dot_fmt(FMT_Q4_1X8, w, stride, K, all, M, y, total); break;
            case FMT_Q8X8: default: x16_dot_fmt(FMT_Q8X8, w, stride, K, all, M, y, total); break;
        }
        return;
    }
#endif
    for (int h = 0; h < groups; h++) {
        const uint8_t *wg = w + (size_t)h * stride;
        float *yg = y + 8 * h;
        switch (fmt) {
            case FMT_Q4_0X8: x8_dot_fmt(FMT_Q4_0X8, wg, K, all, M, yg, total); break;
            case FMT_Q4_1X8: x8_dot_fmt(FMT_Q4_1X8, wg, K, all, M, yg, total); break;
            case FMT_Q8X8: default: x8_dot_fmt(FMT_Q8X8, wg, K, all, M, yg, total); break;
        }
    }
}

/* The x8 layouts' step: eight rows' 16 bytes (in, in + stride, ...) -> 128 bytes at out whose
 * chunk c (16 bytes) holds bytes 2c, 2c + 1 of each row in row order: a transpose of 8 x 8
 * two-byte values. A repack touches every byte of the model once: two-byte copies took
 * 0.22 s of a 1B load at one thread, this 0.13 s (page faults apart: huge_pages). */
static inline void interleave8(const uint8_t *in, long stride, uint8_t *out) {
#if defined(__AVX2__)
    __m128i a[8], t[8], u[8];
    for (int r = 0; r < 8; r++) a[r] = _mm_loadu_si128((const __m128i *)(in + (size_t)r * stride));
    for (int i = 0; i < 4; i++) {  /* rows 2i, 2i + 1 paired per value */
        t[2 * i] = _mm_unpacklo_epi16(a[2 * i], a[2 * i + 1]);
        t[2 * i + 1] = _mm_unpackhi_epi16(a[2 * i], a[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++)  /* rows 4i .. 4i + 3: values (0, 1), (2, 3), (4, 5), (6, 7) */
        for (int h = 0; h < 2; h++) {
            u[4 * i + 2 * h] = _mm_unpacklo_epi32(t[4 * i + h], t[4 * i + 2 + h]);
            u[4 * i + 2 * h + 1] = _mm_unpackhi_epi32(t[4 * i + h], t[4 * i + 2 + h]);
        }
    for (int v = 0; v < 4; v++) {  /* values 2v, 2v + 1 of all eight rows */
        _mm_storeu_si128((__m128i *)(out + 32 * v), _mm_unpacklo_epi64(u[v], u[4 + v]));
        _mm_storeu_si128((__m128i *)(out + 32 * v + 16), _mm_unpackhi_epi64(u[v], u[4 + v]));
    }
#else
    for (int r = 0; r < 8; r++)
        for (int c = 0; c < 8; c++) memcpy(out + 16 * c + 2 * r, in + (size_t)r * stride + 2 * c, 2);
#endif
}

/* ---- sizes ---------------------------------------------------------------------------------
 * The weights come from model files and from other machines. Every entry point that reads a
 * matrix is told how many bytes lie behind its pointer (w_bytes) and how many rows it holds,
 * and refuses (returns < 0) a row, a K or a stride that would read outside them. The sizes
 * are its last arguments: an older revision's build (bench/kernels_ab.py) ignores them. */

/* Formats of 256-weight super-blocks (K a multiple of 256; group 256) */
static inline int super_block(int fmt) {
    return fmt == FMT_Q4_K || fmt == FMT_Q6_K || fmt == FMT_Q5_K || fmt == FMT_Q4_KX8 || fmt == FMT_Q2_K
        || fmt == FMT_Q3_K || fmt == FMT_IQ4_XS || fmt == FMT_Q5_KX8 || fmt == FMT_Q6_KX8;
}

/* Bytes of one row of K weights in fmt (the x8 formats: of one group of eight rows), or -1
 * for an unknown format or a K that is no whole number of its blocks. */
long fs_row_bytes(int fmt, long K) {
    fmt &= FMT_BASE;
    if (K <= 0 || K > (1L << 30) || K % (super_block(fmt) ? 256 : 32) != 0) return -1;
    switch (fmt) {
    case FMT_Q4_0: return K / 32 * 18;
    case FMT_Q4_1: return K / 32 * 20;
    case FMT_Q8: return K / 32 * 34;
    case FMT_Q5_1: return K / 32 * 24;
    case FMT_Q4_K: return K / 256 * 144;
    case FMT_Q5_K: return K / 256 * 176;
    case FMT_Q6_K: return K / 256 * 210;
    case FMT_Q2_K: return K / 256 * 84;
    case FMT_Q3_K: return K / 256 * 110;
    case FMT_IQ4_XS: return K / 256 * 136;
    case FMT_F16: case FMT_BF16: return 2 * K;
    case FMT_Q4_0X8: case FMT_Q4_1X8: case FMT_Q8X8: return K / 32 * x8_block_bytes(fmt);
    case FMT_Q4_KX8: return K / 256 * Q4KX8_BYTES;
    case FMT_Q5_KX8: return K / 256 * Q5KX8_BYTES;
    case FMT_Q6_KX8: return K / 256 * Q6KX8_BYTES;
    default: return -1;
    }
}

/* 0 when n rows of K weights in fmt (x8: n / 8 row groups), rows (groups) row_stride bytes
 * apart from w, lie inside the w_bytes bytes at w; -1 otherwise. */
static int matrix_fits(int fmt, const uint8_t *w, long row_stride, long n, long K, long w_bytes) {
    const long rb = fs_row_bytes(fmt, K);
    const int x8 = is_x8(fmt & FMT_BASE);
    if (rb < 0 || w == NULL || n <= 0 || (x8 && n % 8 != 0) || row_stride < rb) return -1;
    long end;
    if (__builtin_mul_overflow((x8 ? n / 8 : n) - 1, row_stride, &end) || __builtin_add_overflow(end, rb, &end))
        return -1;
    return end <= w_bytes ? 0 : -1;
}

/* Ask for 2 MiB pages where [p, p + bytes) covers them whole, before anything is written
 * there: the copy of a 1B model then takes ~300 page faults instead of ~140k (0.2 s of its
 * load at one thread), and decoding walks fewer page tables. Pages partly outside stay
 * 4 KiB, so no memory is added. A hint: kernels without transparent huge pages ignore it. */
static void huge_pages(uint8_t *p, size_t bytes) {
#if defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20;
    const uintptr_t a = ((uintptr_t)p + huge - 1) & ~(huge - 1), e = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (e > a) (void)madvise((void *)a, e - a, MADV_HUGEPAGE);
#else
    (void)p; (void)bytes;
#endif
}

/* Q4_0/Q4_1/Q8/Q4_K/Q5_K/Q6_K rows (src, src_stride bytes apart; n % 8 == 0; src_bytes bytes at src) -> the x8
 * layout of the same format at dst: [n / 8] row groups of K / 32 x8 blocks. Returns 0, or -1
 * on bad arguments. */
int fs_repack_x8(int fmt, const uint8_t *src, long src_stride, int n, int K, uint8_t *dst, int nthreads,
                 long src_bytes) {
    if ((fmt != FMT_Q4_K && fmt != FMT_Q5_K && fmt != FMT_Q6_K && fmt != FMT_Q4_0 && fmt != FMT_Q4_1 && fmt != FMT_Q8)
        || matrix_fits(fmt, src, src_stride, n, K, src_bytes) != 0) return -1;
    if (fmt == FMT_Q4_K || fmt == FMT_Q5_K) {  /* Q5_K: { d, dmin, scales[12], qh[32], qs[128] } */
        const int five = fmt == FMT_Q5_K, in_bytes = five ? 176 : 144, out_bytes = five ? Q5KX8_BYTES : Q4KX8_BYTES;
        const int qs_at = five ? 48 : 16;
        if (n <= 0 || n % 8 != 0 || K <= 0 || K % 256 != 0) return -1;
        huge_pages(dst, (size_t)n / 8 * (K / 256) * out_bytes);
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int rg = 0; rg < n / 8; rg++)
            for (int sb = 0; sb < K / 256; sb++) {
                uint8_t *out = dst + ((size_t)rg * (K / 256) + sb) * out_bytes;
                for (int r = 0; r < 8; r++) {
                    const uint8_t *in = src + (size_t)(8 * rg + r) * src_stride + (size_t)sb * in_bytes;
                    float sc[8], mn[8];
                    memcpy(out + 2 * r, in, 2);
                    memcpy(out + 16 + 2 * r, in + 2, 2);
                    k4_scales(in + 4, sc, mn);
                    for (int j = 0; j < 8; j++) { out[32 + 8 * j + r] = (uint8_t)sc[j]; out[96 + 8 * j + r] = (uint8_t)mn[j]; }
                }
                const uint8_t *in0 = src + (size_t)(8 * rg) * src_stride + (size_t)sb * in_bytes;
                for (int pr = 0; pr < 4; pr++)  /* chunk c of pair pr: bytes 2c, 2c + 1 of each row's 32 */
                    for (int half = 0; half < 2; half++)
                        interleave8(in0 + qs_at + 32 * pr + 16 * half, src_stride, out + 160 + 256 * pr + 128 * half);
                for (int half = 0; five && half < 2; half++)  /* qh's chunk c: the same weights as a pair's */
                    interleave8(in0 + 16 + 16 * half, src_stride, out + 1184 + 128 * half);
            }
        return 0;
    }
    if (fmt == FMT_Q6_K) {  /* Q6_K: { ql[128], qh[64], scales[16], d } */
        if (n <= 0 || n % 8 != 0 || K <= 0 || K % 256 != 0) return -1;
        huge_pages(dst, (size_t)n / 8 * (K / 256) * Q6KX8_BYTES);
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int rg = 0; rg < n / 8; rg++)
            for (int sb = 0; sb < K / 256; sb++) {
                uint8_t *out = dst + ((size_t)rg * (K / 256) + sb) * Q6KX8_BYTES;
                for (int r = 0; r < 8; r++) {
                    const uint8_t *in = src + (size_t)(8 * rg + r) * src_stride + (size_t)sb * 210;
                    memcpy(out + 2 * r, in + 208, 2);
                    for (int s = 0; s < 16; s++) out[16 + 8 * s + r] = in[192 + s];
                }
                const uint8_t *in0 = src + (size_t)(8 * rg) * src_stride + (size_t)sb * 210;
                for (int h = 0; h < 2; h++)  /* qa = ql[0..32), qb = ql[32..64), qh: 16 bytes of each row at a time */
                    for (int part = 0; part < 6; part++) {
                        const uint8_t *from = part < 4 ? in0 + 64 * h + 16 * part : in0 + 128 + 32 * h + 16 * (part - 4);
                        interleave8(from, src_stride, out + 144 + 768 * h + 128 * part);
                    }
            }
        return 0;
    }
    if ((fmt != FMT_Q4_0 && fmt != FMT_Q4_1 && fmt != FMT_Q8) || n <= 0 || n % 8 != 0 || K <= 0 || K % 32 != 0) return -1;
    const int bs = fmt == FMT_Q4_0 ? 18 : fmt == FMT_Q4_1 ? 20 : 34, head = fmt == FMT_Q4_1 ? 4 : 2;
    const int chunks = (bs - head) / 2, groups = K / 32;
    huge_pages(dst, (size_t)n / 8 * groups * 8 * bs);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int rg = 0; rg < n / 8; rg++) {
        for (int g = 0; g < groups; g++) {
            uint8_t *out = dst + ((size_t)rg * groups + g) * 8 * bs, *qs = out + 8 * head;
            const uint8_t *in0 = src + (size_t)(8 * rg) * src_stride + (size_t)g * bs;
            for (int r = 0; r < 8; r++) {
                const uint8_t *in = in0 + (size_t)r * src_stride;
                memcpy(out + 2 * r, in, 2);                             /* d */
                if (fmt == FMT_Q4_1) memcpy(out + 16 + 2 * r, in + 2, 2);  /* m */
            }
            for (int c = 0; c < chunks; c += 8) interleave8(in0 + head + 2 * c, src_stride, qs + 16 * c);
        }
    }
    return 0;
}

/* Drop this process's pages of a read-only file mapping (the page-aligned part of p .. p +
 * bytes): a repacked copy took their place. The file keeps them in the page cache, and a
 * later read maps them back. Never for anonymous memory, which this would zero. */
int fs_release_file_pages(const uint8_t *p, long bytes) {
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t a = ((uintptr_t)p + page - 1) & ~(page - 1), e = ((uintptr_t)p + (uintptr_t)bytes) & ~(page - 1);
    return e > a ? madvise((void *)a, e - a, MADV_DONTNEED) : 0;
}

/* Weight rows are short streams (1-2 KiB) that the hardware prefetcher learns too late:
 * each thread asks for the rows it takes PREFETCH_ROWS rows from now (measured: Q4_0 from
 * memory 6 -> 7.5 GB/s on one core; reading two rows at once without it falls to 3.6). */
#define PREFETCH_ROWS 4
#define ACT_TILE_BYTES (1L << 19)  /* int16 activation rows per pass over the weights: half of a Zen 4/5 L2 (1 MiB) */
static inline void prefetch(const uint8_t *p, long bytes) {
#if defined(__AVX2__)
    for (long i = 0; i < bytes; i += 64) _mm_prefetch((const char *)(p + i), _MM_HINT_T0);
#else
    (void)p; (void)bytes;
#endif
}

/* The activations' quantized forms (and attend.c's panels), kept between calls, one buffer
 * per calling thread (the serving threads may call at once). Allocated afresh, a 512-token
 * prompt's took a page fault per 4 KiB at every matmul, as this process hands large blocks
 * back to the system when they are freed (engine/memory.py). Up to WORK_KEEP_BYTES stays
 * (a 1B model's 512 tokens take 11 MiB, live at that point of the prefill anyway); a longer
 * prompt's larger buffer is handed back after its call (fs_workspace_trim). */
#define WORK_KEEP_BYTES (16L << 20)
static pthread_key_t work_key;
static pthread_once_t work_once = PTHREAD_ONCE_INIT;
typedef struct { uint8_t *buf; size_t cap; } work_buf;
static void work_free(void *p) { free(((work_buf *)p)->buf); free(p); }
static void work_key_make(void) { pthread_key_create(&work_key, work_free); }

/* After a call: this thread's workspace goes back to the system if it is over WORK_KEEP_BYTES. */
void fs_workspace_trim(void) {
    pthread_once(&work_once, work_key_make);
    work_buf *w = (work_buf *)pthread_getspecific(work_key);
    if (w && w->cap > (size_t)WORK_KEEP_BYTES) {
        free(w->buf);
        w->buf = NULL;
        w->cap = 0;
    }
}

/* parts[i] = sizes[i] bytes of this thread's workspace (NULL where sizes[i] is 0), each
 * 64-byte aligned; 0 when memory runs out. */
int fs_workspace(const size_t *sizes, uint8_t **parts, int count) {
    size_t total = 0;
    for (int i = 0; i < count; i++) total += (sizes[i] + 63) / 64 * 64;
    pthread_once(&work_once, work_key_make);
    work_buf *w = (work_buf *)pthread_getspecific(work_key);
    if (!w) {
        if (!(w = (work_buf *)calloc(1, sizeof(work_buf))) || pthread_setspecific(work_key, w) != 0) { free(w); return 0; }
    }
    if (w->cap < total) {
        free(w->buf);
        w->buf = (uint8_t *)aligned_alloc(64, total);
        w->cap = w->buf ? total : 0;
        if (!w->buf) return 0;
    }
    for (size_t i = 0, at = 0; i < (size_t)count; at += (sizes[i] + 63) / 64 * 64, i++)
        parts[i] = sizes[i] ? w->buf + at : NULL;
    return 1;
}

#define MAX_MATS 32  /* matrices in one call: a mixture's chosen experts' gates and ups (2 k) */

/* Several matrices that read the same x (q/k/v, gate/up): x is quantized once and one
 * parallel region covers all their rows. Matrix j: format fmts[j] (| FMT_ACT8 for int8
 * activations: Q4_0/Q4_1/Q8 and the x8 layouts), group groups[j], blocks ws[j] (rows strides[j] bytes
 * apart), ns[j] rows. x's rows are x_stride floats apart (>= K; 16-bit float matrices take
 * them packed, x_stride == K). y is [M][sum ns], matrix j's outputs in columns [off_j, off_j + ns[j]).
 * With `each`, matrix j reads x's row j alone instead (M == count, every ns[j] the same N) and
 * y is [M][N]: a mixture's chosen experts' downs, each on its own expert's row, in one region.
 * w_bytes[j]: the bytes at ws[j] (matrix_fits). Returns 0, or < 0 on bad arguments. */
static int qmatmul_multi(int count, const int *fmts, const int *groups, const uint8_t *const *ws,
                         const long *strides, const int *ns, int K, const float *x, long x_stride, int M, float *y,
                         int nthreads, const long *w_bytes, int each) {
    if (count < 1 || count > MAX_MATS || M <= 0 || K <= 0 || K % 32 != 0 || x_stride < K || w_bytes == NULL) return -1;
    if (each && M != count) return -1;
    /* matrix j: rows offs[j] .. offs[j + 1] of y's columns, pairs of rows pairs[j] .. pairs[j + 1] */
    int total = 0, offs[MAX_MATS + 1], pairs[MAX_MATS + 1], fmt[MAX_MATS], act8[MAX_MATS], x8[MAX_MATS];
    int any8 = 0, any8k = 0, any16 = 0, any6 = 0, tiles = 0;
    pairs[0] = 0;
    for (int j = 0; j < count; j++) {
        fmt[j] = fmts[j] & FMT_BASE;
        act8[j] = (fmts[j] & FMT_ACT8) != 0;
        const int k_quant = super_block(fmt[j]);
        x8[j] = is_x8(fmt[j]);
        const int k_x8 = fmt[j] == FMT_Q4_KX8 || fmt[j] == FMT_Q5_KX8 || fmt[j] == FMT_Q6_KX8;
        const int f16 = fmt[j] == FMT_F16 || fmt[j] == FMT_BF16, int16_only = (k_quant && !k_x8) || f16 || fmt[j] == FMT_Q5_1;
        if ((fmts[j] & ~(FMT_BASE | FMT_ACT8)) || fmt[j] > FMT_LAST || (act8[j] && int16_only)) return -1;
        if (ns[j] <= 0 || K % (k_quant ? 256 : 32) != 0 || groups[j] != (k_quant ? 256 : 32)) return -1;
        if ((x8[j] && ns[j] % 8 != 0) || (f16 && x_stride != K)) return -1;
        if (matrix_fits(fmt[j], ws[j], strides[j], ns[j], K, w_bytes[j]) != 0 || total > (1 << 30) - ns[j]) return -1;
        if (each && ns[j] != ns[0]) return -1;
        any8 |= act8[j];
        any8k |= act8[j] && k_x8;
        any6 |= fmt[j] == FMT_Q6_K;
#if defined(FS_AMX)
        tiles |= amx_on && !each && M >= 16 && !act8[j] && (fmt[j] == FMT_Q4_0X8 || fmt[j] == FMT_Q4_1X8 || fmt[j] == FMT_Q8X8);
#endif
        any16 |= !act8[j] && !f16 && fmt[j] != FMT_Q6_K;  /* 16-bit float rows take x as it is; Q6_K a q6row */
        offs[j] = total;
        total += ns[j];
        pairs[j + 1] = pairs[j] + (ns[j] + 1) / 2;
    }
    offs[count] = total;
    const int y_stride = each ? ns[0] : total;  /* floats from one row of y to the next */
    const size_t ng = (size_t)M * (K / 32);
    /* q6row: h and l bytes, then the sums of 16 (K / 16 each of h and l), then the scales */
    const size_t mk = (size_t)M * K, b6_bytes = mk * 2 + sizeof(int16_t) * (mk / 8) + sizeof(float) * (mk / 256);
    /* the tile of activation rows the weights are read once for (a multiple of the kernels' 4 or 8 rows): its
       int16 rows (ACT_TILE_BYTES) stay in L2; a 512-token prompt's activations streamed from memory for every
       weight row would cost more than the weights */
    int tile = (int)(ACT_TILE_BYTES / (2 * (long)K)) / 8 * 8;
    tile = each ? M : tile < 8 ? 8 : tile;  /* each matrix's own row: all rows in one pass */
    const size_t tile_rows = M < tile ? (size_t)M : (size_t)tile;
    const size_t sizes[10] = { any16 ? sizeof(int16_t) * mk : 0, any8 ? mk : 0, any8 ? sizeof(int16_t) * (mk / 2) : 0,
                               any8 ? mk : 0, sizeof(float) * ng * 4, sizeof(int32_t) * ng * 2, any6 ? b6_bytes : 0,
                               tiles ? 2 * mk : 0, any8k ? sizeof(int16_t) * (mk / 16) : 0, any8k ? tile_rows * K * 8 : 0 };
    uint8_t *parts[10];
    if (!fs_workspace(sizes, parts, 10)) return -2;
    int16_t *q = (int16_t *)parts[0], *o8 = (int16_t *)parts[2];
    int8_t *q8 = (int8_t *)parts[1], *qi8 = (int8_t *)parts[3];
    float *f = (float *)parts[4];
    int32_t *t = (int32_t *)parts[5];
    uint8_t *b6 = parts[6];
    qrow all = { q, f, f + ng, t, tiles ? (int8_t *)parts[7] : NULL, tiles ? parts[7] + mk : NULL };
    q8row all8 = { q8, f + 2 * ng, f + 3 * ng, o8, t + ng, qi8, (int16_t *)parts[8], NULL };
    int8_t *expanded = (int8_t *)parts[9];  /* e of the tile's rows (expand_row8) */
    int16_t *sums6 = any6 ? (int16_t *)(b6 + (size_t)M * K * 2) : NULL;
    q6row all6 = { (int8_t *)b6, b6 + (size_t)M * K, any6 ? (float *)(sums6 + (size_t)M * (K / 8)) : NULL,
                   sums6, any6 ? sums6 + (size_t)M * (K / 16) : NULL };
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 1)
    for (int m = 0; m < M; m++) {
        if (any16) quantize_row(x + (size_t)m * x_stride, K, row_of(all, m, K));
#if defined(FS_AMX)
        if (tiles) amx_split_row(all.q + (size_t)m * K, K, all.hi + (size_t)m * K, all.lo + (size_t)m * K);
#endif
        if (any8) quantize_row8(x + (size_t)m * x_stride, K, row8_of(all8, m, K));
        if (any6) quantize_row6(x + (size_t)m * x_stride, K, row6_of(all6, m, K));
    }
    /* Each thread takes a slice of all weight rows, two at a time (an x8 matrix: the pair
       that starts a row group does its eight or sixteen rows); a weight row is read from
       memory once per tile of activation rows and reused from cache for each of them. */
    for (int m0 = 0; m0 < M; m0 += tile) {
        const int mt = M - m0 < tile ? M - m0 : tile;
        const qrow at = row_of(all, m0, K);
        q8row at8 = any8 ? row8_of(all8, m0, K) : all8;
        if (any8k) {
            at8.e = expanded;
            #pragma omp parallel for num_threads(nthreads) schedule(static) if (mt > 1)
            for (int m = 0; m < mt; m++) expand_row8(at8.q + (size_t)m * K, K, expanded + (size_t)m * K * 8);
        }
        const q6row at6 = any6 ? row6_of(all6, m0, K) : all6;
        float *yt = y + (size_t)m0 * y_stride;
        #pragma omp parallel num_threads(nthreads)
        {
            int j = 0;  /* a thread's pairs come in order (one static chunk): its matrix only moves on */
            #pragma omp for schedule(static)
            for (int pair = 0; pair < pairs[count]; pair++) {
                if (pair < pairs[j]) j = 0;
                while (pair >= pairs[j + 1]) j++;
                const int i = 2 * (pair - pairs[j]);
                if (x8[j] && i % 16 != 0) continue;  /* an x8 matrix's sixteen rows go with the pair at a multiple of 16 */
                /* row i of matrix j, column r of y's rows from `own` (each: matrix j's row j alone) */
                const int own = each ? j : 0, rows = each ? 1 : mt, r = (each ? 0 : offs[j]) + i;
                const qrow a = any16 && each ? row_of(at, own, K) : at;
                const q8row a8 = any8 && each ? row8_of(at8, own, K) : at8;
                const q6row a6 = any6 && each ? row6_of(at6, own, K) : at6;
                float *yr = yt + (size_t)own * y_stride;
                if (fmt[j] == FMT_F16 || fmt[j] == FMT_BF16) {
                    f16_rows_dot(fmt[j], ws[j] + (size_t)i * strides[j], strides[j], i + 1 < ns[j] ? 2 : 1, K,
                                 x + (size_t)(m0 + own) * K, rows, yr + r, y_stride);
                    continue;
                }
                if (x8[j]) {  /* sixteen rows from the pair at a multiple of 16; the last eight alone */
                    const uint8_t *wg = ws[j] + (size_t)(i / 8) * strides[j];
                    const int groups = i + 16 <= ns[j] ? 2 : 1;
                    if (act8[j]) x8_dot8_all(fmt[j], wg, strides[j], groups, K, a8, rows, yr + r, y_stride);
                    else x8_dot_all(fmt[j], wg, strides[j], groups, K, a, rows, yr + r, y_stride);
                    continue;
                }
                const uint8_t *wrow = ws[j] + (size_t)i * strides[j];
                if (i + PREFETCH_ROWS + 1 < ns[j]) prefetch(wrow + PREFETCH_ROWS * strides[j], 2 * strides[j]);
                if (i + 1 < ns[j] && (fmt[j] == FMT_Q4_0 || fmt[j] == FMT_Q4_1 || fmt[j] == FMT_Q8)) {  /* two rows at once */
                    if (act8[j]) two_rows_dot8_all(fmt[j], wrow, strides[j], K, a8, rows, yr + r, y_stride);
                    else two_rows_dot_all(fmt[j], wrow, strides[j], K, a, rows, yr + r, y_stride);
                    continue;
                }
                for (int e = 0; e < 2 && i + e < ns[j]; e++) {  /* K-quants, IQ4_XS, Q5_1 a row at a time; an odd last row */
                    const uint8_t *w = wrow + (size_t)e * strides[j];
                    for (int m = 0; m < rows; m++)
                        yr[(size_t)m * y_stride + r + e] = fmt[j] == FMT_Q6_K ? q6k_row_dot(w, K, row6_of(a6, m, K))
                                                         : act8[j] ? row_dot8(fmt[j], w, K, row8_of(a8, m, K))
                                                                   : row_dot(fmt[j], w, K, row_of(a, m, K));
                }
            }
        }
    }
    fs_workspace_trim();
    return 0;
}

int fs_qmatmul_multi(int count, const int *fmts, const int *groups, const uint8_t *const *ws,
                     const long *strides, const int *ns, int K, const float *x, int M, float *y, int nthreads,
                     const long *w_bytes) {
    return qmatmul_multi(count, fmts, groups, ws, strides, ns, K, x, K, M, y, nthreads, w_bytes, 0);
}

/* Matrix j . x's row j alone, into y's row j (y: [count][N], every ns[j] == N; x's rows
 * x_stride floats apart): a mixture's chosen experts' downs, each on its expert's hidden row,
 * in one parallel region. Returns as fs_qmatmul_multi. */
int fs_qmatmul_each(int count, const int *fmts, const int *groups, const uint8_t *const *ws, const long *strides,
                    const int *ns, int K, const float *x, long x_stride, float *y, int nthreads, const long *w_bytes) {
    return qmatmul_multi(count, fmts, groups, ws, strides, ns, K, x, x_stride, count, y, nthreads, w_bytes, 1);
}

/* y[M][N] = x[M][K] . W^T for one matrix (G: weights per block, 32 or 256 for K-quants);
 * w_bytes: the bytes at w. */
int fs_qmatmul(int fmt, int G, const uint8_t *w, long row_stride, int N, int K,
               const float *x, int M, float *y, int nthreads, long w_bytes) {
    return qmatmul_multi(1, &fmt, &G, &w, &row_stride, &N, K, x, K, M, y, nthreads, &w_bytes, 0);
}

/* fs_qmatmul with x's rows x_stride floats apart: a column slice of a wider matrix (prefill's
 * SwiGLU product, left in the gate columns of the fused gate/up output) without a copy. */
int fs_qmatmul_strided(int fmt, int G, const uint8_t *w, long row_stride, int N, int K,
                       const float *x, long x_stride, int M, float *y, int nthreads, long w_bytes) {
    return qmatmul_multi(1, &fmt, &G, &w, &row_stride, &N, K, x, x_stride, M, y, nthreads, &w_bytes, 0);
}

/* Dequantize rows `rows[0..R)` of W (rows 0..R when `rows` is NULL) into out[R][K]. W holds
 * n_rows rows in the w_bytes bytes at w. Returns 0, -1 on bad sizes, -3 when a row index is
 * outside [0, n_rows) (a token id outside the vocabulary: nothing is written). */
int fs_dequant_rows(int fmt, int G, const uint8_t *w, long row_stride, int K, const int64_t *rows, int R,
                    float *out, int nthreads, long n_rows, long w_bytes) {
    (void)G;
    fmt &= FMT_BASE;  /* the activations' precision does not matter here */
    if (R < 0 || matrix_fits(fmt, w, row_stride, n_rows, K, w_bytes) != 0) return -1;
    if (rows == NULL && R > n_rows) return -3;
    for (int r = 0; rows != NULL && r < R; r++)
        if (rows[r] < 0 || rows[r] >= n_rows) return -3;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (R > 64)
    for (int r = 0; r < R; r++) {
        float *o = out + (size_t)r * K;
        if (fmt == FMT_F16 || fmt == FMT_BF16) {
            const uint16_t *w16 = (const uint16_t *)(w + (size_t)(rows ? rows[r] : r) * row_stride);
            for (int i = 0; i < K; i++) o[i] = fmt == FMT_F16 ? fp16_to_f32(w16[i]) : bf16_to_f32(w16[i]);
            continue;
        }
        if (fmt == FMT_Q6_KX8) {  /* row_stride: bytes per row group of eight */
            const int64_t row = rows ? rows[r] : r, lane = row % 8;
            const uint8_t *grp = w + (size_t)(row / 8) * row_stride;
            for (int sb = 0; sb < K / 256; sb++) {
                const uint8_t *b = grp + (size_t)sb * Q6KX8_BYTES;
                const float dd = fp16_to_f32(*(const uint16_t *)(b + 2 * lane));
                for (int h = 0; h < 2; h++) {
                    const uint8_t *qa = b + 144 + 768 * h;
                    for (int l = 0; l < 32; l++) {
                        const int at = 16 * (l / 2) + 2 * (int)lane + l % 2;
                        for (int i = 0; i < 4; i++) {
                            const int byte = (i & 1) ? qa[256 + at] : qa[at];
                            const int q = (i < 2 ? byte & 0x0f : byte >> 4) | (((qa[512 + at] >> (2 * i)) & 3) << 4);
                            const int8_t sc = (int8_t)b[16 + 8 * (8 * h + 2 * i + l / 16) + lane];
                            o[sb * 256 + 128 * h + 32 * i + l] = dd * (float)sc * (float)(q - 32);
                        }
                    }
                }
            }
            continue;
        }
        if (fmt == FMT_Q4_KX8 || fmt == FMT_Q5_KX8) {  /* row_stride: bytes per row group of eight */
            const int64_t row = rows ? rows[r] : r, lane = row % 8;
            const uint8_t *grp = w + (size_t)(row / 8) * row_stride;
            const int five = fmt == FMT_Q5_KX8;
            for (int sb = 0; sb < K / 256; sb++) {
                const uint8_t *b = grp + (size_t)sb * (five ? Q5KX8_BYTES : Q4KX8_BYTES);
                const float dd = fp16_to_f32(*(const uint16_t *)(b + 2 * lane)), dmin = fp16_to_f32(*(const uint16_t *)(b + 16 + 2 * lane));
                for (int j = 0; j < 8; j++) {
                    const float scale = dd * (float)b[32 + 8 * j + lane], min = dmin * (float)b[96 + 8 * j + lane];
                    const uint8_t *qs = b + 160 + 256 * (j / 2);
                    for (int c = 0; c < 16; c++)
                        for (int e = 0; e < 2; e++) {
                            const uint8_t byte = qs[16 * c + 2 * lane + e];
                            const int fifth = five ? ((b[1184 + 16 * c + 2 * lane + e] >> j) & 1) << 4 : 0;
                            o[sb * 256 + j * 32 + 2 * c + e] = scale * (float)(((j & 1) ? byte >> 4 : byte & 0x0f) | fifth) - min;
                        }
                }
            }
            continue;
        }
        if (is_x8(fmt)) {  /* Q4_0X8, Q4_1X8, Q8X8; row_stride: bytes per row group of eight */
            const int64_t row = rows ? rows[r] : r, lane = row % 8;
            const uint8_t *grp = w + (size_t)(row / 8) * row_stride;
            const int bs = x8_block_bytes(fmt), at = fmt == FMT_Q4_1X8 ? 32 : 16;
            for (int g = 0; g < K / 32; g++) {
                const uint8_t *b = grp + (size_t)g * bs, *qs = b + at;
                const float dd = fp16_to_f32(*(const uint16_t *)(b + 2 * lane));
                const float mm = fmt == FMT_Q4_1X8 ? fp16_to_f32(*(const uint16_t *)(b + 16 + 2 * lane))
                                                   : fmt == FMT_Q4_0X8 ? -8.f * dd : 0.f;
                for (int c = 0; c < (fmt == FMT_Q8X8 ? 16 : 8); c++)
                    for (int e = 0; e < 2; e++) {
                        const uint8_t byte = qs[16 * c + 2 * lane + e];
                        if (fmt == FMT_Q8X8) { o[g * 32 + 2 * c + e] = dd * (float)(int8_t)byte; continue; }
                        o[g * 32 + 2 * c + e] = dd * (float)(byte & 0x0f) + mm;
                        o[g * 32 + 16 + 2 * c + e] = dd * (float)(byte >> 4) + mm;
                    }
            }
            continue;
        }
        const uint8_t *wrow = w + (size_t)(rows ? rows[r] : r) * row_stride;
        if (fmt == FMT_Q6_K) {
            int8_t q[128];
            for (int sb = 0; sb < K / 256; sb++) {
                const uint8_t *b = wrow + sb * 210;
                const int8_t *sc = (const int8_t *)(b + 192);
                float dd = fp16_to_f32(*(const uint16_t *)(b + 208));
                for (int half = 0; half < 2; half++) {
                    q6k_decode_half(b + 64 * half, b + 128 + 32 * half, q);
                    for (int i = 0; i < 128; i++)
                        o[sb * 256 + half * 128 + i] = dd * (float)sc[8 * half + i / 16] * (float)q[i];
                }
            }
        } else if (fmt == FMT_Q5_K) {
            for (int sb = 0; sb < K / 256; sb++) {
                const uint8_t *b = wrow + sb * 176, *qh = b + 16, *qs = b + 48;
                float dd = fp16_to_f32(*(const uint16_t *)b), dmin = fp16_to_f32(*(const uint16_t *)(b + 2)), sc[8], mn[8];
                k4_scales(b + 4, sc, mn);
                for (int j = 0; j < 8; j++) {
                    const uint8_t *q = qs + 32 * (j / 2);
                    float scale = dd * sc[j], min = dmin * mn[j];
                    for (int i = 0; i < 32; i++)
                        o[sb * 256 + j * 32 + i] = scale * (float)(((j & 1) ? q[i] >> 4 : q[i] & 0x0f) | (((qh[i] >> j) & 1) << 4)) - min;
                }
            }
        } else if (fmt == FMT_Q2_K || fmt == FMT_Q3_K) {
            for (int sb = 0; sb < K / 256; sb++) {
                const uint8_t *b = wrow + sb * (fmt == FMT_Q2_K ? 84 : 110);
                const uint8_t *qs = b + (fmt == FMT_Q2_K ? 16 : 32), *hm = b;
                int sc[16], mn[16];
                float dd, dmin = 0.f;
                if (fmt == FMT_Q2_K) {
                    dd = fp16_to_f32(*(const uint16_t *)(b + 80));
                    dmin = fp16_to_f32(*(const uint16_t *)(b + 82));
                    for (int j = 0; j < 16; j++) { sc[j] = b[j] & 15; mn[j] = b[j] >> 4; }
                } else {
                    dd = fp16_to_f32(*(const uint16_t *)(b + 108));
                    k3_scales(b + 96, sc);
                    for (int j = 0; j < 16; j++) mn[j] = 0;
                }
                for (int i = 0; i < 256; i++) {
                    const int l = i % 32, t = i / 32;
                    int q = (qs[32 * (t / 4) + l] >> (2 * (t % 4))) & 3;
                    if (fmt == FMT_Q3_K) q = (q | (((hm[l] >> t) & 1) << 2)) - 4;
                    o[sb * 256 + i] = dd * (float)sc[i / 16] * (float)q - dmin * (float)mn[i / 16];
                }
            }
        } else if (fmt == FMT_IQ4_XS) {
            for (int sb = 0; sb < K / 256; sb++) {
                const uint8_t *b = wrow + sb * 136, *qs = b + 8;
                const float dd = fp16_to_f32(*(const uint16_t *)b);
                for (int j = 0; j < 8; j++) {
                    const float scale = dd * (float)iq4xs_scale(b, j);
                    for (int i = 0; i < 16; i++) {
                        o[sb * 256 + j * 32 + i] = scale * (float)KVALUES_IQ4[qs[16 * j + i] & 0x0f];
                        o[sb * 256 + j * 32 + i + 16] = scale * (float)KVALUES_IQ4[qs[16 * j + i] >> 4];
                    }
                }
            }
        } else if (fmt == FMT_Q5_1) {
            for (int g = 0; g < K / 32; g++) {
                const uint8_t *b = wrow + g * 24, *q = b + 8;
                const float dd = fp16_to_f32(*(const uint16_t *)b), mm = fp16_to_f32(*(const uint16_t *)(b + 2));
                uint32_t qh;
                memcpy(&qh, b + 4, 4);
                for (int i = 0; i < 16; i++) {
                    o[g * 32 + i] = dd * (float)((q[i] & 0x0f) | (((qh >> i) & 1) << 4)) + mm;
                    o[g * 32 + i + 16] = dd * (float)((q[i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) + mm;
                }
            }
        } else if (fmt == FMT_Q4_K) {
            for (int sb = 0; sb < K / 256; sb++) {
                const uint8_t *b = wrow + sb * 144, *qs = b + 16;
                float dd = fp16_to_f32(*(const uint16_t *)b), dmin = fp16_to_f32(*(const uint16_t *)(b + 2)), sc[8], mn[8];
                k4_scales(b + 4, sc, mn);
                for (int j = 0; j < 8; j++) {
                    const uint8_t *q = qs + 32 * (j / 2);
                    float scale = dd * sc[j], min = dmin * mn[j];
                    for (int i = 0; i < 32; i++)
                        o[sb * 256 + j * 32 + i] = scale * (float)((j & 1) ? q[i] >> 4 : q[i] & 0x0f) - min;
                }
            }
        } else if (fmt == FMT_Q8) {
            for (int g = 0; g < K / 32; g++) {
                const uint8_t *b = wrow + g * 34;
                float dd = fp16_to_f32(*(const uint16_t *)b);
                for (int j = 0; j < 32; j++) o[g * 32 + j] = dd * (float)((const int8_t *)(b + 2))[j];
            }
        } else {
            const int bs = fmt == FMT_Q4_0 ? 18 : 20;
            for (int g = 0; g < K / 32; g++) {
                const uint8_t *b = wrow + g * bs;
                float dd = fp16_to_f32(*(const uint16_t *)b);
                float mm = fmt == FMT_Q4_0 ? -8.f * dd : fp16_to_f32(*(const uint16_t *)(b + 2));
                const uint8_t *q = b + (fmt == FMT_Q4_0 ? 2 : 4);
                for (int i = 0; i < 16; i++) {
                    o[g * 32 + i] = dd * (float)(q[i] & 0x0f) + mm;
                    o[g * 32 + i + 16] = dd * (float)(q[i] >> 4) + mm;
                }
            }
        }
    }
    return 0;
}
