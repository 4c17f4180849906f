/* Inference kernels of sotcore._kernels: the fused multi-sample forward pass
 * of a network with one hidden layer of devices.  Uses the generator of
 * _sotrng.h.  (Optimiser steps: _sot_optim.h; training step: _sot_train.h.)
 *
 * ==========================================================================
 * Fused inference (one hidden layer, H devices, C classes, T samples)
 *
 * The caller computes Z = X W1 (BLAS) and hands the kernel, per block of rows:
 *
 * 1. Thresholds, once per (input, device).  The 4096 x grid coordinate
 *        s = z * A[j] + B[j]             float32, product then sum (no FMA)
 *        s = min(max(s, 0), 4096 (G-1))  NaN -> 0
 *        q = trunc(s), g = q >> 12, f = q & 4095
 *        thr = (t[g] (4096 - f) + t[min(g+1, G-1)] f) >> 12     exact, in 64 bits
 *    is the device's uint32 table linearly interpolated (fraction quantised to
 *    1/4096 as in the table sampler), so P(bit) = thr / 2**32 is within
 *    1/2**32 + d/4096 of the interpolated table (d: the largest table step
 *    near x; < 1.2e-6 for the default tables).  Rows are processed one tile
 *    of 16 devices at a time so the tile's tables stay in L1/L2.
 *
 * 2. Bits, T per (input, device), from 16 random bits each.  With
 *    thr = 65536 th + tl (th, tl < 65536) and w16 a uniform 16-bit word,
 *        bit = w16 < th,  or, if w16 == th (probability 2**-16), lo16 < tl
 *    with lo16 a further uniform 16-bit word.  Then
 *        P(bit) = th / 2**16 + 2**-16 tl / 2**16 = thr / 2**32
 *    exactly, as a 32-bit compare, for half the random bits: one 512-bit
 *    SplitMix64 vector gives the words of 32 devices, compared in one
 *    instruction.  The words are counter-based:
 *        q      = row_key + t * GAMMA               (per input and sample)
 *        u      = u64(key,  q * (Hp/4) + j/4)       word w16 = bits 16 (j%4) .. of u
 *        lo16   = low 16 bits of u64(key2, q * Hp + j)   (only when needed)
 *    with Hp = H rounded up to 32, so the bits of an input depend only on its
 *    row key, never on the batch, the block or the thread.
 *
 * 3. Output layer by "four Russians": for every group of 8 devices the 256
 *    sums of subsets of their output-weight rows are tabulated once per model
 *    (R, (Hp/8) * 256 rows of Cp floats, Cp = C rounded up to 16), so a
 *    sample's logits are Hp/8 table rows added up -- one 16-float vector add
 *    per 8 devices for C <= 16.  Groups are summed into 4 accumulators
 *    (group g into g % 4) combined as ((a0 + a1) + (a2 + a3)) + bias.
 *
 * 4. Softmax per sample (sot_softmax_acc: exp by a fixed polynomial, sums in
 *    class order), added in double to the input's accumulator in sample
 *    order; each output row is finally divided by its sum.  The AVX-512 (AVX2)
 *    path buffers the logits of 16 (8) samples and runs the softmax across
 *    them, one sample per lane, with exactly the scalar steps.
 *
 * The AVX-512, AVX2 and portable paths do the same IEEE operations in the
 * same order (no FMA contraction), so results are bit-identical on every
 * path, thread count and blocking.  The path is the sampler's
 * (sot_sampler_isa: the best the CPU has, or forced by SOTCORE_ISA /
 * sotcore._kernels.sampler_isa).  AVX2 has no 64-bit multiply (SplitMix64
 * takes three 32-bit ones) and no unsigned 16-bit compare (signed, top bit
 * flipped); measured on the AVX-512 machine, forcing AVX2 costs 9 % at T = 8
 * and 18 % at T = 32 (bench/ratio.py --isa).
 *
 * Cost on the machine (Sapphire Rapids, 784-500-10): thresholds
 * ~0.5 us per input, ~0.1 us per sample (16 SplitMix64 vectors, 32 compares,
 * 64 table adds for 500 devices), against ~5 us per input for the first
 * layer's sgemm on one core.
 *
 * Size: the fused kernel's three CPU paths (portable, AVX-512, AVX2) must do
 * the same operations in the same order; they stay side by side in one file.
 * ========================================================================== */
#ifndef SOTCORE_SOT_INFER_H
#define SOTCORE_SOT_INFER_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <math.h>
#include "_sotrng.h"
#include "_sot_math.h"

SOT_EXACT_FP_BEGIN

#define SOT_FUSED_PAD 32      /* devices are padded to a multiple of this */

typedef struct {
    ptrdiff_t H, Hp, ldz;      /* devices, padded count, row stride of Z */
    const float *A, *B;        /* H: 4096 x grid coordinate = z * A + B */
    const uint32_t *table;     /* H x G thresholds, row stride G */
    ptrdiff_t G;
    const float *R;            /* (Hp/8)*256 x Cp subset sums */
    const float *bias;         /* Cp output biases, zero-padded */
    ptrdiff_t C, Cp;           /* classes, padded to a multiple of 16 */
    uint64_t key, key2;        /* streams of the 16-bit words and of the rare low halves */
    ptrdiff_t T;
} sot_fused_model;

/* The rare second halves: bit k of the result is lo16 < tl for each set bit
 * k of `eq` (devices j0 + k whose 16-bit word equalled th). */
static inline uint32_t sot_fused_low(uint64_t key2, uint64_t q, ptrdiff_t Hp, ptrdiff_t j0,
                                     uint32_t eq, const uint16_t *tlo)
{
    uint32_t m = 0;
    while (eq) {
        const int k = SOT_CTZ32(eq);
        eq &= eq - 1;
        const uint64_t j = (uint64_t)(j0 + k);
        const uint16_t lo = (uint16_t)sot_u64(key2, q * (uint64_t)Hp + j);
        m |= (uint32_t)(lo < tlo[j0 + k]) << k;
    }
    return m;
}

/* One sample's softmax of the logits lg[0..C) added to acc[0..C) (double):
 *   mx = lg[0]; mx = mx > lg[c] ? mx : lg[c]  (c = 1..C-1)
 *   e_c = exp(lg[c] - mx);  s = ((e_0 + e_1) + e_2) + ...;  acc[c] += e_c * (1 / s)
 * The vector path computes 16 samples at once with exactly these steps. */
static inline void sot_softmax_acc(const float *lg, ptrdiff_t C, float *e, double *acc)
{
    float mx = lg[0];
    for (ptrdiff_t c = 1; c < C; ++c) mx = mx > lg[c] ? mx : lg[c];
    float s = 0.0f;
    for (ptrdiff_t c = 0; c < C; ++c) {
        e[c] = sot_expf(lg[c] - mx);
        s = c == 0 ? e[c] : s + e[c];
    }
    const float inv = 1.0f / s;
    for (ptrdiff_t c = 0; c < C; ++c) acc[c] += (double)(e[c] * inv);
}

static inline void sot_fused_finish(const double *acc, ptrdiff_t C, double *out)
{
    double s = 0.0;
    for (ptrdiff_t c = 0; c < C; ++c) s += acc[c];
    for (ptrdiff_t c = 0; c < C; ++c) out[c] = acc[c] / s;
}

/* Interpolated threshold of table t (G points) at q = trunc(4096 x):
 * gc = min(q >> 12, G - 2), f = q - 4096 gc in [0, 4096]. */
static inline uint32_t sot_interp_thr(const uint32_t *t, uint32_t q, ptrdiff_t G)
{
    uint32_t g = q >> 12;
    g = g < (uint32_t)(G - 2) ? g : (uint32_t)(G - 2);
    const uint32_t f = q - (g << 12);
    return (uint32_t)(((uint64_t)t[g] * (4096u - f) + (uint64_t)t[g + 1] * f) >> 12);
}

/* --------------------------------------------------------- portable path */
/* Phase 1 for rows [0, nrows): thi/tlo (row stride Hp).  Returns 1 if some
 * z was not finite.  (The portable path: no clones, it is the fallback.) */
static int sot_fused_thresholds_scalar(const sot_fused_model *md, const float *Z,
                                       ptrdiff_t nrows, uint16_t *thi, uint16_t *tlo)
{
    const ptrdiff_t H = md->H, Hp = md->Hp, G = md->G;
    const float smax = (float)4096 * (float)(G - 1);
    int nonfinite = 0;
    for (ptrdiff_t jt = 0; jt < Hp; jt += 16) {
        for (ptrdiff_t i = 0; i < nrows; ++i) {
            const float *z = Z + i * md->ldz;
            uint16_t *h = thi + i * Hp, *l = tlo + i * Hp;
            for (ptrdiff_t j = jt; j < jt + 16; ++j) {
                uint32_t thr = 0;
                if (j < H) {
                    uint32_t bits;
                    memcpy(&bits, z + j, sizeof bits);
                    nonfinite |= (bits & 0x7F800000u) == 0x7F800000u;
                    float s = z[j] * md->A[j];
                    s = s + md->B[j];
                    s = s > 0.0f ? s : 0.0f;
                    s = s < smax ? s : smax;
                    thr = sot_interp_thr(md->table + j * G, (uint32_t)s, G);
                }
                h[j] = (uint16_t)(thr >> 16);
                l[j] = (uint16_t)thr;
            }
        }
    }
    return nonfinite;
}

/* Phases 2-4 for rows [0, nrows).  scratch: >= 6 Cp floats; accd: nrows x Cp. */
static void sot_fused_sample_scalar(const sot_fused_model *md, ptrdiff_t nrows,
                                    const uint64_t *rowkeys, const uint16_t *thi,
                                    const uint16_t *tlo, float *scratch, double *accd,
                                    double *out)
{
    const ptrdiff_t Hp = md->Hp, nb = Hp / 32, Cp = md->Cp, C = md->C;
    const uint64_t n64 = (uint64_t)Hp / 4;
    float *acc = scratch, *lg = scratch + 4 * Cp, *e = scratch + 5 * Cp;
    for (ptrdiff_t i = 0; i < nrows; ++i) {
        const uint16_t *th = thi + i * Hp, *tl = tlo + i * Hp;
        double *ad = accd + i * Cp;
        for (ptrdiff_t c = 0; c < C; ++c) ad[c] = 0.0;
        for (ptrdiff_t t = 0; t < md->T; ++t) {
            const uint64_t q = rowkeys[i] + (uint64_t)t * SOT_GAMMA;
            for (ptrdiff_t c = 0; c < 4 * Cp; ++c) acc[c] = 0.0f;
            for (ptrdiff_t b = 0; b < nb; ++b) {
                uint64_t u[8];
                for (int l = 0; l < 8; ++l) u[l] = sot_u64(md->key, q * n64 + (uint64_t)(8 * b + l));
                uint32_t m = 0, eq = 0;
                for (int k = 0; k < 32; ++k) {
                    const uint16_t w = (uint16_t)(u[k >> 2] >> (16 * (k & 3)));
                    m |= (uint32_t)(w < th[32 * b + k]) << k;
                    eq |= (uint32_t)(w == th[32 * b + k]) << k;
                }
                if (eq) m |= sot_fused_low(md->key2, q, Hp, 32 * b, eq, tl);
                for (int k = 0; k < 4; ++k) {
                    const float *r = md->R + ((4 * b + k) * 256 + ((m >> (8 * k)) & 255u)) * Cp;
                    float *a = acc + k * Cp;
                    for (ptrdiff_t c = 0; c < Cp; ++c) a[c] = a[c] + r[c];
                }
            }
            for (ptrdiff_t c = 0; c < Cp; ++c)
                lg[c] = ((acc[c] + acc[Cp + c]) + (acc[2 * Cp + c] + acc[3 * Cp + c])) + md->bias[c];
            sot_softmax_acc(lg, C, e, ad);
        }
        sot_fused_finish(ad, C, out + i * C);
    }
}

/* ---------------------------------------------------------------- AVX-512 */
#if SOT_HAVE_X86_SIMD
SOT_AVX512 static inline __m512 sot_exp512(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
    __m512 fx = _mm512_mul_ps(x, _mm512_set1_ps(SOT_EXP_LOG2E));
    fx = _mm512_sub_ps(_mm512_add_ps(fx, _mm512_set1_ps(SOT_EXP_MAGIC)),
                       _mm512_set1_ps(SOT_EXP_MAGIC));
    __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(fx, _mm512_set1_ps(SOT_EXP_C1)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(fx, _mm512_set1_ps(SOT_EXP_C2)));
    __m512 y = _mm512_set1_ps(SOT_EXP_P0);
    y = _mm512_add_ps(_mm512_mul_ps(y, r), _mm512_set1_ps(SOT_EXP_P1));
    y = _mm512_add_ps(_mm512_mul_ps(y, r), _mm512_set1_ps(SOT_EXP_P2));
    y = _mm512_add_ps(_mm512_mul_ps(y, r), _mm512_set1_ps(SOT_EXP_P3));
    y = _mm512_add_ps(_mm512_mul_ps(y, r), _mm512_set1_ps(SOT_EXP_P4));
    y = _mm512_add_ps(_mm512_mul_ps(y, r), _mm512_set1_ps(SOT_EXP_P5));
    const __m512 r2 = _mm512_mul_ps(r, r);
    y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(y, r2), r), _mm512_set1_ps(1.0f));
    const __m512i eb = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(eb));
}

/* 8 devices' thresholds from one 64-bit gather of (t[gc], t[gc+1]) pairs:
 * returns 8 x uint64 lanes holding thr < 2**32. */
SOT_AVX512 static inline __m512i sot_interp8_512(const int *tab, __m256i idx, __m256i f,
                                                __mmask8 mk)
{
    const __m512i pair = _mm512_mask_i32gather_epi64(_mm512_setzero_si512(), mk, idx, tab, 4);
    const __m512i f64 = _mm512_cvtepu32_epi64(f);
    const __m512i nf64 = _mm512_sub_epi64(_mm512_set1_epi64(4096), f64);
    const __m512i p = _mm512_add_epi64(_mm512_mul_epu32(pair, nf64),
                                       _mm512_mul_epu32(_mm512_srli_epi64(pair, 32), f64));
    return _mm512_srli_epi64(p, 12);
}

SOT_AVX512 static int sot_fused_thresholds_avx512(const sot_fused_model *md, const float *Z,
                                                  ptrdiff_t nrows, uint16_t *thi, uint16_t *tlo)
{
    const ptrdiff_t H = md->H, Hp = md->Hp, G = md->G, ldz = md->ldz;
    const __m512 zero = _mm512_setzero_ps();
    const __m512 smax = _mm512_set1_ps((float)4096 * (float)(G - 1));
    const __m512i gmax = _mm512_set1_epi32((int)(G - 2));
    const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
    const __m512i colofs = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32((int)G));
    __m512i amax = _mm512_setzero_si512();
    for (ptrdiff_t jt = 0; jt < Hp; jt += 16) {
        const ptrdiff_t w = H - jt <= 0 ? 0 : (H - jt < 16 ? H - jt : 16);
        const __mmask16 mk = (__mmask16)((1u << w) - 1u);
        if (w == 0) {
            for (ptrdiff_t i = 0; i < nrows; ++i) {
                memset(thi + i * Hp + jt, 0, 16 * sizeof(uint16_t));
                memset(tlo + i * Hp + jt, 0, 16 * sizeof(uint16_t));
            }
            continue;
        }
        /* Lane offsets stay below 16 G <= 2**24: index from the tile's first table. */
        const int *tab = (const int *)(md->table + jt * G);
        const __m512 va = _mm512_maskz_loadu_ps(mk, md->A + jt);
        const __m512 vb = _mm512_maskz_loadu_ps(mk, md->B + jt);
        const float *z = Z + jt;
        for (ptrdiff_t i = 0; i < nrows; ++i, z += ldz) {
            SOT_PREFETCH(z + SOT_PF_ROWS * ldz);
            __m512 x = _mm512_maskz_loadu_ps(mk, z);
            amax = _mm512_max_epu32(amax, _mm512_and_si512(_mm512_castps_si512(x), absmask));
            x = _mm512_add_ps(_mm512_mul_ps(x, va), vb);
            x = _mm512_min_ps(_mm512_max_ps(x, zero), smax);
            const __m512i q = _mm512_cvttps_epu32(x);
            const __m512i g = _mm512_min_epu32(_mm512_srli_epi32(q, 12), gmax);
            const __m512i f = _mm512_sub_epi32(q, _mm512_slli_epi32(g, 12));
            const __m512i idx = _mm512_add_epi32(g, colofs);
            const __m512i tlo8 = sot_interp8_512(tab, _mm512_castsi512_si256(idx),
                                                 _mm512_castsi512_si256(f), (__mmask8)mk);
            const __m512i thi8 = sot_interp8_512(tab, _mm512_extracti64x4_epi64(idx, 1),
                                                 _mm512_extracti64x4_epi64(f, 1),
                                                 (__mmask8)(mk >> 8));
            const __m512i thr = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm512_cvtepi64_epi32(tlo8)), _mm512_cvtepi64_epi32(thi8), 1);
            _mm256_storeu_si256((__m256i *)(thi + i * Hp + jt),
                                _mm512_cvtepi32_epi16(_mm512_srli_epi32(thr, 16)));
            _mm256_storeu_si256((__m256i *)(tlo + i * Hp + jt), _mm512_cvtepi32_epi16(thr));
        }
    }
    return _mm512_cmpgt_epu32_mask(amax, _mm512_set1_epi32(0x7F7FFFFF)) != 0;
}

/* Softmax of the ns (<= 16) logit rows buffered in L (16 x 16 floats, one row
 * per sample), 16 samples per vector op, added in sample order to the
 * accumulators of their rows (accd rows of 16 doubles). */
SOT_AVX512 static inline void sot_softmax16_flush(const float *L, float *PT, int ns,
                                                  const ptrdiff_t *slot_row, ptrdiff_t C,
                                                  double *accd)
{
    const __m512i idx = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(16));
    __m512 col[16];
    for (ptrdiff_t c = 0; c < C; ++c) col[c] = _mm512_i32gather_ps(idx, L + c, 4);
    __m512 mx = col[0];
    for (ptrdiff_t c = 1; c < C; ++c) mx = _mm512_max_ps(mx, col[c]);
    __m512 s = _mm512_setzero_ps();
    for (ptrdiff_t c = 0; c < C; ++c) {
        col[c] = sot_exp512(_mm512_sub_ps(col[c], mx));
        s = c == 0 ? col[c] : _mm512_add_ps(s, col[c]);
    }
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), s);
    for (ptrdiff_t c = 0; c < C; ++c) _mm512_store_ps(PT + 16 * c, _mm512_mul_ps(col[c], inv));
    const __mmask16 cm = (__mmask16)((1u << C) - 1u);
    for (int k = 0; k < ns; ++k) {
        const __m512 p = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), cm, idx, PT + k, 4);
        double *ad = accd + 16 * slot_row[k];
        _mm512_storeu_pd(ad, _mm512_add_pd(_mm512_loadu_pd(ad),
                                           _mm512_cvtps_pd(_mm512_castps512_ps256(p))));
        _mm512_storeu_pd(ad + 8, _mm512_add_pd(_mm512_loadu_pd(ad + 8),
                                               _mm512_cvtps_pd(_mm512_extractf32x8_ps(p, 1))));
    }
}

SOT_AVX512 static void sot_fused_sample_avx512(const sot_fused_model *md, ptrdiff_t nrows,
                                               const uint64_t *rowkeys, const uint16_t *thi,
                                               const uint16_t *tlo, float *scratch, double *accd,
                                               double *out)
{
    const ptrdiff_t Hp = md->Hp, nb = Hp / 32, Cp = md->Cp, C = md->C;
    const uint64_t n64 = (uint64_t)Hp / 4;
    const __m512i zstep = _mm512_mullo_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi64((long long)SOT_GAMMA));
    const __m512i z8 = _mm512_set1_epi64((long long)(8 * SOT_GAMMA));
    if (Cp == 16) {
        /* 64-byte aligned buffers in scratch: 16 logit rows and the transposed probabilities. */
        float *L = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63), *PT = L + 256;
        ptrdiff_t slot_row[16];
        int ns = 0;
        memset(L, 0, 256 * sizeof(float));
        memset(accd, 0, nrows * 16 * sizeof(double));
        const __m512 bias = _mm512_loadu_ps(md->bias);
        for (ptrdiff_t i = 0; i < nrows; ++i) {
            const uint16_t *th = thi + i * Hp, *tl = tlo + i * Hp;
            for (ptrdiff_t t = 0; t < md->T; ++t) {
                const uint64_t q = rowkeys[i] + (uint64_t)t * SOT_GAMMA;
                __m512i z = _mm512_add_epi64(zstep, _mm512_set1_epi64(
                    (long long)(md->key + (q * n64 + 1) * SOT_GAMMA)));
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                const float *Rb = md->R;
                for (ptrdiff_t b = 0; b < nb; ++b, Rb += 4 * 256 * 16) {
                    const __m512i w = sot_mix64_512(z);
                    z = _mm512_add_epi64(z, z8);
                    const __m512i tv = _mm512_loadu_si512(th + 32 * b);
                    uint32_t m = _mm512_cmplt_epu16_mask(w, tv);
                    const uint32_t eq = _mm512_cmpeq_epu16_mask(w, tv);
                    if (SOT_UNLIKELY(eq != 0))
                        m |= sot_fused_low(md->key2, q, Hp, 32 * b, eq, tl);
                    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(Rb + (m & 255u) * 16));
                    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(Rb + (256 + ((m >> 8) & 255u)) * 16));
                    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(Rb + (512 + ((m >> 16) & 255u)) * 16));
                    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(Rb + (768 + (m >> 24)) * 16));
                }
                _mm512_store_ps(L + 16 * ns, _mm512_add_ps(
                    _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)), bias));
                slot_row[ns++] = i;
                if (ns == 16) {
                    sot_softmax16_flush(L, PT, ns, slot_row, C, accd);
                    ns = 0;
                }
            }
        }
        if (ns) sot_softmax16_flush(L, PT, ns, slot_row, C, accd);
        for (ptrdiff_t i = 0; i < nrows; ++i) sot_fused_finish(accd + 16 * i, C, out + i * C);
        return;
    }
    /* Cp > 16: accumulators in memory, the same operations per lane. */
    float *acc = scratch, *lg = scratch + 4 * Cp, *e = scratch + 5 * Cp;
    for (ptrdiff_t i = 0; i < nrows; ++i) {
        const uint16_t *th = thi + i * Hp, *tl = tlo + i * Hp;
        double *ad = accd + i * Cp;
        for (ptrdiff_t c = 0; c < C; ++c) ad[c] = 0.0;
        for (ptrdiff_t t = 0; t < md->T; ++t) {
            const uint64_t q = rowkeys[i] + (uint64_t)t * SOT_GAMMA;
            __m512i z = _mm512_add_epi64(zstep, _mm512_set1_epi64(
                (long long)(md->key + (q * n64 + 1) * SOT_GAMMA)));
            memset(acc, 0, 4 * Cp * sizeof(float));
            for (ptrdiff_t b = 0; b < nb; ++b) {
                const __m512i w = sot_mix64_512(z);
                z = _mm512_add_epi64(z, z8);
                const __m512i tv = _mm512_loadu_si512(th + 32 * b);
                uint32_t m = _mm512_cmplt_epu16_mask(w, tv);
                const uint32_t eq = _mm512_cmpeq_epu16_mask(w, tv);
                if (SOT_UNLIKELY(eq != 0))
                    m |= sot_fused_low(md->key2, q, Hp, 32 * b, eq, tl);
                for (int k = 0; k < 4; ++k) {
                    const float *r = md->R + ((4 * b + k) * 256 + ((m >> (8 * k)) & 255u)) * Cp;
                    float *a = acc + k * Cp;
                    for (ptrdiff_t c = 0; c < Cp; c += 16)
                        _mm512_storeu_ps(a + c, _mm512_add_ps(_mm512_loadu_ps(a + c),
                                                              _mm512_loadu_ps(r + c)));
                }
            }
            for (ptrdiff_t c = 0; c < Cp; c += 16) {
                const __m512 s01 = _mm512_add_ps(_mm512_loadu_ps(acc + c),
                                                 _mm512_loadu_ps(acc + Cp + c));
                const __m512 s23 = _mm512_add_ps(_mm512_loadu_ps(acc + 2 * Cp + c),
                                                 _mm512_loadu_ps(acc + 3 * Cp + c));
                _mm512_storeu_ps(lg + c, _mm512_add_ps(_mm512_add_ps(s01, s23),
                                                       _mm512_loadu_ps(md->bias + c)));
            }
            sot_softmax_acc(lg, C, e, ad);
        }
        sot_fused_finish(ad, C, out + i * C);
    }
}

/* ------------------------------------------------------------------- AVX2 */
/* The same operations as the scalar path, 8 lanes at a time (CPUs without
 * AVX-512).  exp: sot_expf's steps per lane, as sot_exp512. */
SOT_AVX2 static inline __m256 sot_exp256(__m256 x)
{
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
    __m256 fx = _mm256_mul_ps(x, _mm256_set1_ps(SOT_EXP_LOG2E));
    fx = _mm256_sub_ps(_mm256_add_ps(fx, _mm256_set1_ps(SOT_EXP_MAGIC)),
                       _mm256_set1_ps(SOT_EXP_MAGIC));
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(SOT_EXP_C1)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(fx, _mm256_set1_ps(SOT_EXP_C2)));
    __m256 y = _mm256_set1_ps(SOT_EXP_P0);
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(SOT_EXP_P1));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(SOT_EXP_P2));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(SOT_EXP_P3));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(SOT_EXP_P4));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(SOT_EXP_P5));
    const __m256 r2 = _mm256_mul_ps(r, r);
    y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(y, r2), r), _mm256_set1_ps(1.0f));
    const __m256i eb = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(eb));
}

/* 4 devices' thresholds from one 64-bit gather of (t[gc], t[gc+1]) pairs,
 * packed to 4 x uint32 (as sot_interp8_512). */
SOT_AVX2 static inline __m128i sot_interp4_256(const long long *tab, __m128i idx, __m128i f,
                                               __m256i mk)
{
    const __m256i pair = _mm256_mask_i32gather_epi64(_mm256_setzero_si256(), tab, idx, mk, 4);
    const __m256i f64 = _mm256_cvtepu32_epi64(f);
    const __m256i nf64 = _mm256_sub_epi64(_mm256_set1_epi64x(4096), f64);
    const __m256i p = _mm256_add_epi64(_mm256_mul_epu32(pair, nf64),
                                       _mm256_mul_epu32(_mm256_srli_epi64(pair, 32), f64));
    const __m256i thr = _mm256_permutevar8x32_epi32(_mm256_srli_epi64(p, 12),
                                                    _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    return _mm256_castsi256_si128(thr);
}

/* Phase 1 in tiles of 16 devices (two 8-lane halves), as the AVX-512 path.
 * The grid coordinate goes through a *signed* conversion: tables of more
 * than 2**19 points take the scalar path (sot_fused_block). */
SOT_AVX2 static int sot_fused_thresholds_avx2(const sot_fused_model *md, const float *Z,
                                              ptrdiff_t nrows, uint16_t *thi, uint16_t *tlo)
{
    const ptrdiff_t H = md->H, Hp = md->Hp, G = md->G, ldz = md->ldz;
    const __m256 zero = _mm256_setzero_ps();
    const __m256 smax = _mm256_set1_ps((float)4096 * (float)(G - 1));
    const __m256i gmax = _mm256_set1_epi32((int)(G - 2));
    const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
    const __m256i lo16 = _mm256_set1_epi32(0xFFFF);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i amax = _mm256_setzero_si256();
    for (ptrdiff_t jt = 0; jt < Hp; jt += 16) {
        const ptrdiff_t w = H - jt <= 0 ? 0 : (H - jt < 16 ? H - jt : 16);
        if (w == 0) {
            for (ptrdiff_t i = 0; i < nrows; ++i) {
                memset(thi + i * Hp + jt, 0, 16 * sizeof(uint16_t));
                memset(tlo + i * Hp + jt, 0, 16 * sizeof(uint16_t));
            }
            continue;
        }
        /* Per half: lane mask, its 64-bit halves, A, B and gather offsets
         * (below 16 G <= 2**24, from the tile's first table). */
        __m256i mk[2], mq[4], ofs[2];
        __m256 va[2], vb[2];
        for (int hh = 0; hh < 2; ++hh) {
            const ptrdiff_t wh = w - 8 * hh;
            mk[hh] = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(wh < 0 ? 0 : wh)), lane);
            mq[2 * hh] = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(mk[hh]));
            mq[2 * hh + 1] = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(mk[hh], 1));
            va[hh] = _mm256_maskload_ps(md->A + jt + 8 * hh, mk[hh]);
            vb[hh] = _mm256_maskload_ps(md->B + jt + 8 * hh, mk[hh]);
            ofs[hh] = _mm256_mullo_epi32(_mm256_add_epi32(lane, _mm256_set1_epi32(8 * hh)),
                                         _mm256_set1_epi32((int)G));
        }
        const long long *tab = (const long long *)(md->table + jt * G);
        const float *z = Z + jt;
        for (ptrdiff_t i = 0; i < nrows; ++i, z += ldz) {
            SOT_PREFETCH(z + SOT_PF_ROWS * ldz);
            for (int hh = 0; hh < 2; ++hh) {
                __m256 x = _mm256_maskload_ps(z + 8 * hh, mk[hh]);
                amax = _mm256_max_epu32(amax, _mm256_and_si256(_mm256_castps_si256(x), absmask));
                x = _mm256_add_ps(_mm256_mul_ps(x, va[hh]), vb[hh]);
                x = _mm256_min_ps(_mm256_max_ps(x, zero), smax);
                const __m256i q = _mm256_cvttps_epi32(x);
                const __m256i g = _mm256_min_epu32(_mm256_srli_epi32(q, 12), gmax);
                const __m256i f = _mm256_sub_epi32(q, _mm256_slli_epi32(g, 12));
                const __m256i idx = _mm256_add_epi32(g, ofs[hh]);
                const __m128i t0 = sot_interp4_256(tab, _mm256_castsi256_si128(idx),
                                                   _mm256_castsi256_si128(f), mq[2 * hh]);
                const __m128i t1 = sot_interp4_256(tab, _mm256_extracti128_si256(idx, 1),
                                                   _mm256_extracti128_si256(f, 1), mq[2 * hh + 1]);
                const __m256i thr = _mm256_inserti128_si256(_mm256_castsi128_si256(t0), t1, 1);
                const __m256i h = _mm256_srli_epi32(thr, 16), l = _mm256_and_si256(thr, lo16);
                _mm_storeu_si128((__m128i *)(thi + i * Hp + jt + 8 * hh),
                                 _mm_packus_epi32(_mm256_castsi256_si128(h),
                                                  _mm256_extracti128_si256(h, 1)));
                _mm_storeu_si128((__m128i *)(tlo + i * Hp + jt + 8 * hh),
                                 _mm_packus_epi32(_mm256_castsi256_si128(l),
                                                  _mm256_extracti128_si256(l, 1)));
            }
        }
    }
    const __m256i big = _mm256_cmpgt_epi32(amax, _mm256_set1_epi32(0x7F7FFFFF));
    return !_mm256_testz_si256(big, big);
}

/* Bit k of the result: 16-bit word k of (w0, w1) < th[k]; *eq likewise for ==
 * (32 devices; unsigned compares as signed ones with the top bit flipped). */
SOT_AVX2 static inline uint32_t sot_cmp32_avx2(__m256i w0, __m256i w1, const uint16_t *th,
                                               uint32_t *eq)
{
    const __m256i sgn = _mm256_set1_epi16((short)0x8000);
    const __m256i t0 = _mm256_loadu_si256((const __m256i *)th);
    const __m256i t1 = _mm256_loadu_si256((const __m256i *)(th + 16));
    const __m256i lt0 = _mm256_cmpgt_epi16(_mm256_xor_si256(t0, sgn), _mm256_xor_si256(w0, sgn));
    const __m256i lt1 = _mm256_cmpgt_epi16(_mm256_xor_si256(t1, sgn), _mm256_xor_si256(w1, sgn));
    /* packs interleaves the 128-bit lanes: words 0-7, 16-23, 8-15, 24-31. */
    const __m256i e = _mm256_permute4x64_epi64(
        _mm256_packs_epi16(_mm256_cmpeq_epi16(t0, w0), _mm256_cmpeq_epi16(t1, w1)), 0xD8);
    *eq = (uint32_t)_mm256_movemask_epi8(e);
    return (uint32_t)_mm256_movemask_epi8(_mm256_permute4x64_epi64(
        _mm256_packs_epi16(lt0, lt1), 0xD8));
}

/* Softmax of the ns (<= 8) logit rows buffered in L (8 x 16 floats), 8
 * samples per vector op, added in sample order to their rows' accumulators
 * (accd rows of 16 doubles).  PT: 16 x 8 floats. */
SOT_AVX2 static inline void sot_softmax8_flush(const float *L, float *PT, int ns,
                                               const ptrdiff_t *slot_row, ptrdiff_t C,
                                               double *accd)
{
    const __m256i idx = _mm256_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112);
    __m256 col[16];
    for (ptrdiff_t c = 0; c < C; ++c) col[c] = _mm256_i32gather_ps(L + c, idx, 4);
    __m256 mx = col[0];
    for (ptrdiff_t c = 1; c < C; ++c) mx = _mm256_max_ps(mx, col[c]);
    __m256 s = _mm256_setzero_ps();
    for (ptrdiff_t c = 0; c < C; ++c) {
        col[c] = sot_exp256(_mm256_sub_ps(col[c], mx));
        s = c == 0 ? col[c] : _mm256_add_ps(s, col[c]);
    }
    const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), s);
    for (ptrdiff_t c = 0; c < C; ++c) _mm256_store_ps(PT + 8 * c, _mm256_mul_ps(col[c], inv));
    for (int k = 0; k < ns; ++k) {
        double *ad = accd + 16 * slot_row[k];
        for (ptrdiff_t c = 0; c < C; ++c) ad[c] += (double)PT[8 * c + k];
    }
}

SOT_AVX2 static void sot_fused_sample_avx2(const sot_fused_model *md, ptrdiff_t nrows,
                                           const uint64_t *rowkeys, const uint16_t *thi,
                                           const uint16_t *tlo, float *scratch, double *accd,
                                           double *out)
{
    const ptrdiff_t Hp = md->Hp, nb = Hp / 32, Cp = md->Cp, C = md->C;
    const uint64_t n64 = (uint64_t)Hp / 4;
    /* Words 0-15 of a block of 32 devices come from lanes 0-3, words 16-31 from 4-7. */
    const __m256i zstep = _mm256_setr_epi64x(0, (long long)SOT_GAMMA, (long long)(2 * SOT_GAMMA),
                                             (long long)(3 * SOT_GAMMA));
    const __m256i z4 = _mm256_set1_epi64x((long long)(4 * SOT_GAMMA));
    const __m256i z8 = _mm256_set1_epi64x((long long)(8 * SOT_GAMMA));
    if (Cp == 16) {
        float *L = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63), *PT = L + 128;
        ptrdiff_t slot_row[8];
        int ns = 0;
        memset(L, 0, 128 * sizeof(float));
        memset(accd, 0, nrows * 16 * sizeof(double));
        const __m256 b0 = _mm256_loadu_ps(md->bias), b1 = _mm256_loadu_ps(md->bias + 8);
        for (ptrdiff_t i = 0; i < nrows; ++i) {
            const uint16_t *th = thi + i * Hp, *tl = tlo + i * Hp;
            for (ptrdiff_t t = 0; t < md->T; ++t) {
                const uint64_t q = rowkeys[i] + (uint64_t)t * SOT_GAMMA;
                __m256i za = _mm256_add_epi64(zstep, _mm256_set1_epi64x(
                    (long long)(md->key + (q * n64 + 1) * SOT_GAMMA)));
                __m256i zb = _mm256_add_epi64(za, z4);
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                __m256 c0 = a0, c1 = a0, c2 = a0, c3 = a0;
                const float *Rb = md->R;
                for (ptrdiff_t b = 0; b < nb; ++b, Rb += 4 * 256 * 16) {
                    const __m256i w0 = sot_mix64_256(za), w1 = sot_mix64_256(zb);
                    za = _mm256_add_epi64(za, z8);
                    zb = _mm256_add_epi64(zb, z8);
                    uint32_t eq;
                    uint32_t m = sot_cmp32_avx2(w0, w1, th + 32 * b, &eq);
                    if (SOT_UNLIKELY(eq != 0))
                        m |= sot_fused_low(md->key2, q, Hp, 32 * b, eq, tl);
                    const float *r0 = Rb + (m & 255u) * 16;
                    const float *r1 = Rb + (256 + ((m >> 8) & 255u)) * 16;
                    const float *r2 = Rb + (512 + ((m >> 16) & 255u)) * 16;
                    const float *r3 = Rb + (768 + (m >> 24)) * 16;
                    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(r0));
                    c0 = _mm256_add_ps(c0, _mm256_loadu_ps(r0 + 8));
                    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(r1));
                    c1 = _mm256_add_ps(c1, _mm256_loadu_ps(r1 + 8));
                    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(r2));
                    c2 = _mm256_add_ps(c2, _mm256_loadu_ps(r2 + 8));
                    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(r3));
                    c3 = _mm256_add_ps(c3, _mm256_loadu_ps(r3 + 8));
                }
                _mm256_store_ps(L + 16 * ns, _mm256_add_ps(
                    _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)), b0));
                _mm256_store_ps(L + 16 * ns + 8, _mm256_add_ps(
                    _mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)), b1));
                slot_row[ns++] = i;
                if (ns == 8) {
                    sot_softmax8_flush(L, PT, ns, slot_row, C, accd);
                    ns = 0;
                }
            }
        }
        if (ns) sot_softmax8_flush(L, PT, ns, slot_row, C, accd);
        for (ptrdiff_t i = 0; i < nrows; ++i) sot_fused_finish(accd + 16 * i, C, out + i * C);
        return;
    }
    /* Cp > 16: accumulators in memory, the same operations per lane. */
    float *acc = scratch, *lg = scratch + 4 * Cp, *e = scratch + 5 * Cp;
    for (ptrdiff_t i = 0; i < nrows; ++i) {
        const uint16_t *th = thi + i * Hp, *tl = tlo + i * Hp;
        double *ad = accd + i * Cp;
        for (ptrdiff_t c = 0; c < C; ++c) ad[c] = 0.0;
        for (ptrdiff_t t = 0; t < md->T; ++t) {
            const uint64_t q = rowkeys[i] + (uint64_t)t * SOT_GAMMA;
            __m256i za = _mm256_add_epi64(zstep, _mm256_set1_epi64x(
                (long long)(md->key + (q * n64 + 1) * SOT_GAMMA)));
            __m256i zb = _mm256_add_epi64(za, z4);
            memset(acc, 0, 4 * Cp * sizeof(float));
            for (ptrdiff_t b = 0; b < nb; ++b) {
                const __m256i w0 = sot_mix64_256(za), w1 = sot_mix64_256(zb);
                za = _mm256_add_epi64(za, z8);
                zb = _mm256_add_epi64(zb, z8);
                uint32_t eq;
                uint32_t m = sot_cmp32_avx2(w0, w1, th + 32 * b, &eq);
                if (SOT_UNLIKELY(eq != 0))
                    m |= sot_fused_low(md->key2, q, Hp, 32 * b, eq, tl);
                for (int k = 0; k < 4; ++k) {
                    const float *r = md->R + ((4 * b + k) * 256 + ((m >> (8 * k)) & 255u)) * Cp;
                    float *a = acc + k * Cp;
                    for (ptrdiff_t c = 0; c < Cp; c += 8)
                        _mm256_storeu_ps(a + c, _mm256_add_ps(_mm256_loadu_ps(a + c),
                                                              _mm256_loadu_ps(r + c)));
                }
            }
            for (ptrdiff_t c = 0; c < Cp; c += 8) {
                const __m256 s01 = _mm256_add_ps(_mm256_loadu_ps(acc + c),
                                                 _mm256_loadu_ps(acc + Cp + c));
                const __m256 s23 = _mm256_add_ps(_mm256_loadu_ps(acc + 2 * Cp + c),
                                                 _mm256_loadu_ps(acc + 3 * Cp + c));
                _mm256_storeu_ps(lg + c, _mm256_add_ps(_mm256_add_ps(s01, s23),
                                                       _mm256_loadu_ps(md->bias + c)));
            }
            sot_softmax_acc(lg, C, e, ad);
        }
        sot_fused_finish(ad, C, out + i * C);
    }
}
#endif  /* SOT_HAVE_X86_SIMD */

/* One block of rows: thresholds into thi/tlo (nrows x Hp each), then the
 * samples.  scratch: >= 6 Cp + 528 floats; accd: >= nrows x Cp doubles.
 * Returns 1 if some z was not finite. */
static int sot_fused_block(const sot_fused_model *md, int isa, const float *Z, ptrdiff_t nrows,
                           const uint64_t *rowkeys, uint16_t *thi, uint16_t *tlo,
                           float *scratch, double *accd, double *out)
{
    int nonfinite;
#if SOT_HAVE_X86_SIMD
    if (isa == SOT_ISA_AVX512) {
        nonfinite = sot_fused_thresholds_avx512(md, Z, nrows, thi, tlo);
        sot_fused_sample_avx512(md, nrows, rowkeys, thi, tlo, scratch, accd, out);
        return nonfinite;
    }
    if (isa == SOT_ISA_AVX2) {
        nonfinite = md->G - 1 < ((ptrdiff_t)1 << 19)
                        ? sot_fused_thresholds_avx2(md, Z, nrows, thi, tlo)
                        : sot_fused_thresholds_scalar(md, Z, nrows, thi, tlo);
        sot_fused_sample_avx2(md, nrows, rowkeys, thi, tlo, scratch, accd, out);
        return nonfinite;
    }
#endif
    (void)isa;
    nonfinite = sot_fused_thresholds_scalar(md, Z, nrows, thi, tlo);
    sot_fused_sample_scalar(md, nrows, rowkeys, thi, tlo, scratch, accd, out);
    return nonfinite;
}

/* Subset sums: R[(g*256 + s)*Cp + c] = sum of W[8g + k, c] over the set bits
 * k of s (rows >= H and columns >= C count as 0); each entry is the entry
 * without its lowest bit plus that bit's row. */
static void sot_subset_table(const float *W, ptrdiff_t H, ptrdiff_t C, ptrdiff_t Hp,
                             ptrdiff_t Cp, float *R)
{
    for (ptrdiff_t g = 0; g < Hp / 8; ++g) {
        float *Rg = R + g * 256 * Cp;
        memset(Rg, 0, Cp * sizeof(float));
        for (int s = 1; s < 256; ++s) {
            const int k = SOT_CTZ32((uint32_t)s);
            const float *prev = Rg + (s & (s - 1)) * Cp;
            const ptrdiff_t row = 8 * g + k;
            float *dst = Rg + s * Cp;
            for (ptrdiff_t c = 0; c < Cp; ++c)
                dst[c] = prev[c] + (row < H && c < C ? W[row * C + c] : 0.0f);
        }
    }
}

SOT_EXACT_FP_END

#endif
