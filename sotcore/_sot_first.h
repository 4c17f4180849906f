/* The first layer of inference: Z = X W for a block of inputs, a row at a time
 * in law, with the input's zeros skipped (sotcore._kernels.first_layer).
 *
 * ==========================================================================
 *   Z[i, j] = fma(X[i, k_m], W[k_m, j], ... fma(X[i, k_1], W[k_1, j], 0))
 *
 * over k ascending, one fused multiply-add per term, on every path (AVX-512,
 * AVX2 + FMA, portable fmaf).  Rows are computed in groups of 6 over the k
 * where *some* row of the group is non-zero: for a row whose X[i, k] is 0 the
 * term fma(0, w, s) = s leaves its sum unchanged (w finite; at most the sign of
 * a zero sum changes, which no later step can see: z + b, then the clamped
 * grid coordinate), so a row's Z never depends on the other rows of its
 * block, on the blocking or on the thread.  Inputs such as images are mostly
 * zeros (MNIST: ~81 %), so this does a fraction of a dense GEMM's work; a
 * dense input costs about what a single-threaded BLAS sgemm does.
 *
 * Blocking: W in panels of 64 columns (packed once per call), k in blocks of
 * 128 (a 32 KB panel block stays in L1 while every row group uses it), 6 rows
 * x 64 columns in 24 zmm accumulators (AVX2: 6 x 16 in 12 ymm).  Measured on
 * the 10,000 MNIST test images, 784 -> 500, one thread (bench/README.md):
 * 3.2 us per image against 5.1 us for OpenBLAS's sgemm; dense inputs 6.0 us.
 * ========================================================================== */
#ifndef SOTCORE_SOT_FIRST_H
#define SOTCORE_SOT_FIRST_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <math.h>
#include "_sotrng.h"

#define SOT_FIRST_ROWS 6

/* Portable path: per row, its own non-zeros (the same sums, see above).  fmaf
 * is exactly rounded wherever it runs (an FMA instruction in the clones for
 * CPUs that have one, libm's otherwise), so the clones agree bit for bit. */
SOT_CLONES
static void sot_first_layer_scalar(const float *X, ptrdiff_t ldx, ptrdiff_t n, ptrdiff_t d,
                                   const float *W, ptrdiff_t ps, ptrdiff_t kst, ptrdiff_t H,
                                   float *Z, ptrdiff_t ldz)
{
    for (ptrdiff_t i = 0; i < n; ++i) {
        float *z = Z + i * ldz;
        const float *x = X + i * ldx;
        for (ptrdiff_t j = 0; j < H; ++j) z[j] = 0.0f;
        for (ptrdiff_t k = 0; k < d; ++k) {
            const float xk = x[k];
            if (xk == 0.0f) continue;
            for (ptrdiff_t j0 = 0; j0 < H; j0 += 64) {
                const float *w = W + (j0 / 64) * ps + k * kst;
                const ptrdiff_t j1 = j0 + 64 < H ? j0 + 64 : H;
                for (ptrdiff_t j = j0; j < j1; ++j) z[j] = fmaf(xk, w[j - j0], z[j]);
            }
        }
    }
}

#if SOT_HAVE_X86_SIMD
static int sot_fma_flag = -1;

static int sot_cpu_has_fma(void)
{
    if (sot_fma_flag < 0) {
        __builtin_cpu_init();
        sot_fma_flag = __builtin_cpu_supports("fma") ? 1 : 0;
    }
    return sot_fma_flag;
}

/* Rows of group g: their inputs and their outputs from column j0 (rows past
 * the end repeat the group's first row; their sums are not stored).  Returns
 * the number of real rows. */
static inline ptrdiff_t sot_first_group(const float *X, ptrdiff_t ldx, float *Z, ptrdiff_t ldz,
                                        ptrdiff_t n, ptrdiff_t g, ptrdiff_t j0,
                                        const float **xr, float **zr)
{
    const ptrdiff_t i0 = g * SOT_FIRST_ROWS;
    const ptrdiff_t nr = n - i0 < SOT_FIRST_ROWS ? n - i0 : SOT_FIRST_ROWS;
    for (int r = 0; r < SOT_FIRST_ROWS; ++r) {
        const ptrdiff_t ii = i0 + (r < nr ? r : 0);
        xr[r] = X + ii * ldx;
        zr[r] = Z + ii * ldz + j0;
    }
    return nr;
}

/* Blocked: per chunk of 64 columns and block of SOT_FIRST_KB k (a W panel of
 * at most 32 KB, which stays in L1 for all the rows), each group of rows adds
 * the terms of its union's k in that block to its partial sums (kept in Z
 * between blocks): still k ascending per (row, column), the same FMAs.
 * ks: >= ngroups * (nkb + 1 + d) ints (sot_first_scratch). */
#define SOT_FIRST_KB 128

/* Per group g of SOT_FIRST_ROWS rows and block kb of SOT_FIRST_KB k: the k of
 * the block where some row of the group is non-zero, lst[off[g (nkb+1) + kb] ..
 * off[g (nkb+1) + kb + 1]), in ks (sot_first_scratch ints). */
static void sot_first_lists(const float *X, ptrdiff_t ldx, ptrdiff_t n, ptrdiff_t d,
                            int32_t *ks)
{
    const ptrdiff_t ng = (n + SOT_FIRST_ROWS - 1) / SOT_FIRST_ROWS;
    const ptrdiff_t nkb = (d + SOT_FIRST_KB - 1) / SOT_FIRST_KB;
    int32_t *off = ks, *lst = ks + ng * (nkb + 1);
    int32_t pos = 0;
    for (ptrdiff_t g = 0; g < ng; ++g) {
        const ptrdiff_t i0 = g * SOT_FIRST_ROWS;
        const ptrdiff_t nr = n - i0 < SOT_FIRST_ROWS ? n - i0 : SOT_FIRST_ROWS;
        for (ptrdiff_t kb = 0; kb < nkb; ++kb) {
            off[g * (nkb + 1) + kb] = pos;
            const ptrdiff_t k1 = (kb + 1) * SOT_FIRST_KB < d ? (kb + 1) * SOT_FIRST_KB : d;
            for (ptrdiff_t k = kb * SOT_FIRST_KB; k < k1; ++k) {
                int nz = 0;
                for (ptrdiff_t r = 0; r < nr; ++r) nz |= X[(i0 + r) * ldx + k] != 0.0f;
                lst[pos] = (int32_t)k;
                pos += nz;
            }
        }
        off[g * (nkb + 1) + nkb] = pos;
    }
}

SOT_AVX512 static void sot_first_layer_avx512(const float *X, ptrdiff_t ldx, ptrdiff_t n,
                                              ptrdiff_t d, const float *W, ptrdiff_t ps,
                                              ptrdiff_t kst, ptrdiff_t H, float *Z,
                                              ptrdiff_t ldz, int32_t *ks)
{
    const ptrdiff_t ng = (n + SOT_FIRST_ROWS - 1) / SOT_FIRST_ROWS;
    const ptrdiff_t nkb = (d + SOT_FIRST_KB - 1) / SOT_FIRST_KB;
    const int32_t *off = ks, *lst = ks + ng * (nkb + 1);
    sot_first_lists(X, ldx, n, d, ks);
    for (ptrdiff_t j0 = 0; j0 < H; j0 += 64) {
        __mmask16 m[4];
        for (int q = 0; q < 4; ++q) {
            const ptrdiff_t w = H - j0 - 16 * q;
            m[q] = (__mmask16)(w >= 16 ? 0xFFFFu : (w <= 0 ? 0u : (1u << w) - 1u));
        }
        for (ptrdiff_t kb = 0; kb < nkb; ++kb) {
            for (ptrdiff_t g = 0; g < ng; ++g) {
                const int32_t t0 = off[g * (nkb + 1) + kb], t1 = off[g * (nkb + 1) + kb + 1];
                if (t0 == t1 && kb > 0) continue;          /* nothing to add */
                const float *xr[SOT_FIRST_ROWS];
                float *zr[SOT_FIRST_ROWS];
                const ptrdiff_t nr = sot_first_group(X, ldx, Z, ldz, n, g, j0, xr, zr);
                __m512 a[SOT_FIRST_ROWS][4];
                const __mmask16 ld = kb == 0 ? 0 : 0xFFFF;   /* first block: from zero */
                for (int r = 0; r < SOT_FIRST_ROWS; ++r)
                    for (int q = 0; q < 4; ++q)
                        a[r][q] = _mm512_maskz_loadu_ps(m[q] & ld, zr[r] + 16 * q);
                const float *panel = W + (j0 / 64) * ps;
                for (int32_t t = t0; t < t1; ++t) {
                    const ptrdiff_t k = lst[t];
                    const float *wr = panel + k * kst;
                    /* Masked: an unpacked W ends at column H (no fault past it). */
                    const __m512 w0 = _mm512_maskz_loadu_ps(m[0], wr);
                    const __m512 w1 = _mm512_maskz_loadu_ps(m[1], wr + 16);
                    const __m512 w2 = _mm512_maskz_loadu_ps(m[2], wr + 32);
                    const __m512 w3 = _mm512_maskz_loadu_ps(m[3], wr + 48);
                    for (int r = 0; r < SOT_FIRST_ROWS; ++r) {
                        const __m512 b = _mm512_set1_ps(xr[r][k]);
                        a[r][0] = _mm512_fmadd_ps(b, w0, a[r][0]);
                        a[r][1] = _mm512_fmadd_ps(b, w1, a[r][1]);
                        a[r][2] = _mm512_fmadd_ps(b, w2, a[r][2]);
                        a[r][3] = _mm512_fmadd_ps(b, w3, a[r][3]);
                    }
                }
                /* Constant indices only, so the accumulators stay in registers. */
                for (int r = 0; r < SOT_FIRST_ROWS; ++r)
                    if (r < nr)
                        for (int q = 0; q < 4; ++q)
                            _mm512_mask_storeu_ps(zr[r] + 16 * q, m[q], a[r][q]);
            }
        }
    }
}

#define SOT_AVX2_FMA __attribute__((target("avx2,fma")))

/* As the AVX-512 path with 16 ymm registers: SOT_FIRST_ROWS rows x 16 columns
 * (12 accumulators), the same lists, panels and order of terms. */
SOT_AVX2_FMA static void sot_first_layer_avx2(const float *X, ptrdiff_t ldx, ptrdiff_t n,
                                              ptrdiff_t d, const float *W, ptrdiff_t ps,
                                              ptrdiff_t kst, ptrdiff_t H, float *Z,
                                              ptrdiff_t ldz, int32_t *ks)
{
    const ptrdiff_t ng = (n + SOT_FIRST_ROWS - 1) / SOT_FIRST_ROWS;
    const ptrdiff_t nkb = (d + SOT_FIRST_KB - 1) / SOT_FIRST_KB;
    const int32_t *off = ks, *lst = ks + ng * (nkb + 1);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    sot_first_lists(X, ldx, n, d, ks);
    for (ptrdiff_t j0 = 0; j0 < H; j0 += 16) {
        const float *panel = W + (j0 / 64) * ps + (j0 % 64);
        __m256i m[2];
        for (int q = 0; q < 2; ++q) {
            const ptrdiff_t w = H - j0 - 8 * q;
            m[q] = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(w < 0 ? 0 : (w > 8 ? 8 : w))),
                                      lane);
        }
        for (ptrdiff_t kb = 0; kb < nkb; ++kb) {
            for (ptrdiff_t g = 0; g < ng; ++g) {
                const int32_t t0 = off[g * (nkb + 1) + kb], t1 = off[g * (nkb + 1) + kb + 1];
                if (t0 == t1 && kb > 0) continue;          /* nothing to add */
                const float *xr[SOT_FIRST_ROWS];
                float *zr[SOT_FIRST_ROWS];
                const ptrdiff_t nr = sot_first_group(X, ldx, Z, ldz, n, g, j0, xr, zr);
                __m256 a[SOT_FIRST_ROWS][2];
                for (int r = 0; r < SOT_FIRST_ROWS; ++r)
                    for (int q = 0; q < 2; ++q)
                        a[r][q] = kb == 0 ? _mm256_setzero_ps()
                                          : _mm256_maskload_ps(zr[r] + 8 * q, m[q]);
#define SOT_FIRST_AVX2_TERMS(LOAD0, LOAD1)                                   \
                for (int32_t t = t0; t < t1; ++t) {                          \
                    const ptrdiff_t k = lst[t];                              \
                    const float *wr = panel + k * kst;                       \
                    const __m256 w0 = LOAD0, w1 = LOAD1;                     \
                    for (int r = 0; r < SOT_FIRST_ROWS; ++r) {               \
                        const __m256 b = _mm256_set1_ps(xr[r][k]);           \
                        a[r][0] = _mm256_fmadd_ps(b, w0, a[r][0]);           \
                        a[r][1] = _mm256_fmadd_ps(b, w1, a[r][1]);           \
                    }                                                        \
                }
                /* Masked loads only where the 16 columns pass H (an unpacked W
                 * ends there); AVX2's masked load is slower than a plain one. */
                if (j0 + 16 <= H) {
                    SOT_FIRST_AVX2_TERMS(_mm256_loadu_ps(wr), _mm256_loadu_ps(wr + 8))
                } else {
                    SOT_FIRST_AVX2_TERMS(_mm256_maskload_ps(wr, m[0]),
                                         _mm256_maskload_ps(wr + 8, m[1]))
                }
#undef SOT_FIRST_AVX2_TERMS
                for (int r = 0; r < SOT_FIRST_ROWS; ++r)   /* constant indices: registers */
                    if (r < nr)
                        for (int q = 0; q < 2; ++q)
                            _mm256_maskstore_ps(zr[r] + 8 * q, m[q], a[r][q]);
            }
        }
    }
}
#endif  /* SOT_HAVE_X86_SIMD */

/* Ints of scratch sot_first_layer needs for n rows of d inputs. */
static ptrdiff_t sot_first_scratch(ptrdiff_t n, ptrdiff_t d)
{
    const ptrdiff_t ng = (n + SOT_FIRST_ROWS - 1) / SOT_FIRST_ROWS;
    return ng * ((d + SOT_FIRST_KB - 1) / SOT_FIRST_KB + 1 + d) + d;
}

/* Z (n x H, row stride ldz) = X (n x d, row stride ldx) W (d x H).  Column
 * j of row k of W is at W[(j / 64) ps + k kst + j % 64]: panels of 64 columns
 * (ceil(H/64) x d x 64, ps = 64 d, kst = 64) or W itself, row-major with row
 * stride ldw (ps = 64, kst = ldw); no element at or past column H is read.
 * ks: sot_first_scratch(n, d) ints. */
static void sot_first_layer(int isa, const float *X, ptrdiff_t ldx, ptrdiff_t n, ptrdiff_t d,
                            const float *W, ptrdiff_t ps, ptrdiff_t kst, ptrdiff_t H, float *Z,
                            ptrdiff_t ldz, int32_t *ks)
{
#if SOT_HAVE_X86_SIMD
    if (isa == SOT_ISA_AVX512) {
        sot_first_layer_avx512(X, ldx, n, d, W, ps, kst, H, Z, ldz, ks);
        return;
    }
    if (isa == SOT_ISA_AVX2 && sot_cpu_has_fma()) {
        sot_first_layer_avx2(X, ldx, n, d, W, ps, kst, H, Z, ldz, ks);
        return;
    }
#endif
    (void)isa;
    (void)ks;
    sot_first_layer_scalar(X, ldx, n, d, W, ps, kst, H, Z, ldz);
}

/* ==========================================================================
 * The first layer's weight gradient: O = X^T G, the zeros of X skipped
 * (sotcore._kernels.sparse_matmul_tn).
 *
 *   O[k, j] = fma(X[i_m, k], G[i_m, j], ... fma(X[i_1, k], G[i_1, j], 0))
 *
 * over the rows i where X[i, k] != 0, ascending, one fused multiply-add per
 * term, on every path: a column k of X that is all zeros gives O[k, :] = 0,
 * and O depends on nothing but X and G (not on the blocking, the threads or
 * the CPU path).  Rows come in chunks of SOT_TN_ROWS (each chunk continues the
 * sums the previous one left in O); the k in blocks of SOT_TN_KB, whose
 * non-zeros are listed by column once per chunk and used for every column
 * block of G.  Two k at a time (AVX-512: 2 x 64 columns, 8 zmm chains; AVX2:
 * 2 x 32, 8 ymm), so that the FMAs' latency is covered.
 * ========================================================================== */
#define SOT_TN_KB 32
#define SOT_TN_ROWS 512

/* 32-bit words of scratch one caller of sot_first_tn needs. */
static ptrdiff_t sot_tn_scratch(void)
{
    return 2 * (SOT_TN_KB + 1) + 2 * (ptrdiff_t)SOT_TN_KB * SOT_TN_ROWS;
}

/* The non-zeros of X[0:n, k0:k1) (n <= SOT_TN_ROWS, k1 - k0 <= SOT_TN_KB) by
 * column, rows ascending: column c's are row[off[c] .. off[c + 1]), val[...]. */
static void sot_tn_lists(const float *X, ptrdiff_t ldx, ptrdiff_t n, ptrdiff_t k0,
                         ptrdiff_t k1, int32_t *ws, int32_t **off_out, int32_t **row_out,
                         float **val_out)
{
    const ptrdiff_t nk = k1 - k0;
    int32_t *off = ws, *cur = ws + SOT_TN_KB + 1;
    int32_t *row = ws + 2 * (SOT_TN_KB + 1);
    float *val = (float *)(row + (ptrdiff_t)SOT_TN_KB * SOT_TN_ROWS);
    for (ptrdiff_t c = 0; c <= nk; ++c) off[c] = 0;
    for (ptrdiff_t i = 0; i < n; ++i) {
        const float *x = X + i * ldx + k0;
        for (ptrdiff_t c = 0; c < nk; ++c) off[c + 1] += x[c] != 0.0f;
    }
    for (ptrdiff_t c = 0; c < nk; ++c) { off[c + 1] += off[c]; cur[c] = off[c]; }
    for (ptrdiff_t i = 0; i < n; ++i) {
        const float *x = X + i * ldx + k0;
        for (ptrdiff_t c = 0; c < nk; ++c)
            if (x[c] != 0.0f) { row[cur[c]] = (int32_t)i; val[cur[c]] = x[c]; ++cur[c]; }
    }
    *off_out = off; *row_out = row; *val_out = val;
}

SOT_CLONES
static void sot_tn_block_scalar(const int32_t *off, const int32_t *row, const float *val,
                                ptrdiff_t nk, const float *G, ptrdiff_t ldg, ptrdiff_t H,
                                float *O, ptrdiff_t ldo, int first)
{
    for (ptrdiff_t c = 0; c < nk; ++c) {
        float *o = O + c * ldo;
        if (first)
            for (ptrdiff_t j = 0; j < H; ++j) o[j] = 0.0f;
        for (int32_t t = off[c]; t < off[c + 1]; ++t) {
            const float x = val[t], *g = G + (ptrdiff_t)row[t] * ldg;
            for (ptrdiff_t j = 0; j < H; ++j) o[j] = fmaf(x, g[j], o[j]);
        }
    }
}

#if SOT_HAVE_X86_SIMD
SOT_AVX512 static void sot_tn_block_avx512(const int32_t *off, const int32_t *row,
                                           const float *val, ptrdiff_t nk, const float *G,
                                           ptrdiff_t ldg, ptrdiff_t H, float *O, ptrdiff_t ldo,
                                           int first)
{
    for (ptrdiff_t j0 = 0; j0 < H; j0 += 64) {
        __mmask16 m[4];
        for (int q = 0; q < 4; ++q) {
            const ptrdiff_t w = H - j0 - 16 * q;
            m[q] = (__mmask16)(w >= 16 ? 0xFFFFu : (w <= 0 ? 0u : (1u << w) - 1u));
        }
        const float *g0 = G + j0;
        for (ptrdiff_t c = 0; c < nk; c += 2) {
            const int two = c + 1 < nk;
            float *oa = O + c * ldo + j0, *ob = two ? oa + ldo : oa;
            const __mmask16 ld = first ? 0 : 0xFFFF;
            __m512 a[4], b[4];
            for (int q = 0; q < 4; ++q) {
                a[q] = _mm512_maskz_loadu_ps(m[q] & ld, oa + 16 * q);
                b[q] = _mm512_maskz_loadu_ps(m[q] & ld, ob + 16 * q);
            }
            int32_t ta = off[c], tb = off[c + 1];
            const int32_t ea = off[c + 1], eb = two ? off[c + 2] : off[c + 1];
            for (; ta < ea && tb < eb; ++ta, ++tb) {          /* both columns */
                const float *ga = g0 + (ptrdiff_t)row[ta] * ldg, *gb = g0 + (ptrdiff_t)row[tb] * ldg;
                const __m512 xa = _mm512_set1_ps(val[ta]), xb = _mm512_set1_ps(val[tb]);
                for (int q = 0; q < 4; ++q) {
                    a[q] = _mm512_fmadd_ps(xa, _mm512_maskz_loadu_ps(m[q], ga + 16 * q), a[q]);
                    b[q] = _mm512_fmadd_ps(xb, _mm512_maskz_loadu_ps(m[q], gb + 16 * q), b[q]);
                }
            }
            for (; ta < ea; ++ta) {
                const float *ga = g0 + (ptrdiff_t)row[ta] * ldg;
                const __m512 xa = _mm512_set1_ps(val[ta]);
                for (int q = 0; q < 4; ++q)
                    a[q] = _mm512_fmadd_ps(xa, _mm512_maskz_loadu_ps(m[q], ga + 16 * q), a[q]);
            }
            for (; tb < eb; ++tb) {
                const float *gb = g0 + (ptrdiff_t)row[tb] * ldg;
                const __m512 xb = _mm512_set1_ps(val[tb]);
                for (int q = 0; q < 4; ++q)
                    b[q] = _mm512_fmadd_ps(xb, _mm512_maskz_loadu_ps(m[q], gb + 16 * q), b[q]);
            }
            for (int q = 0; q < 4; ++q) {
                if (two) _mm512_mask_storeu_ps(ob + 16 * q, m[q], b[q]);
                _mm512_mask_storeu_ps(oa + 16 * q, m[q], a[q]);
            }
        }
    }
}

SOT_AVX2_FMA static void sot_tn_block_avx2(const int32_t *off, const int32_t *row,
                                           const float *val, ptrdiff_t nk, const float *G,
                                           ptrdiff_t ldg, ptrdiff_t H, float *O, ptrdiff_t ldo,
                                           int first)
{
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (ptrdiff_t j0 = 0; j0 < H; j0 += 32) {
        __m256i m[4];
        for (int q = 0; q < 4; ++q) {
            const ptrdiff_t w = H - j0 - 8 * q;
            m[q] = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(w < 0 ? 0 : (w > 8 ? 8 : w))),
                                      lane);
        }
        const float *g0 = G + j0;
        for (ptrdiff_t c = 0; c < nk; c += 2) {
            const int two = c + 1 < nk;
            float *oa = O + c * ldo + j0, *ob = two ? oa + ldo : oa;
            __m256 a[4], b[4];
            for (int q = 0; q < 4; ++q) {
                a[q] = first ? _mm256_setzero_ps() : _mm256_maskload_ps(oa + 8 * q, m[q]);
                b[q] = first ? _mm256_setzero_ps() : _mm256_maskload_ps(ob + 8 * q, m[q]);
            }
            int32_t ta = off[c], tb = off[c + 1];
            const int32_t ea = off[c + 1], eb = two ? off[c + 2] : off[c + 1];
            for (; ta < ea && tb < eb; ++ta, ++tb) {
                const float *ga = g0 + (ptrdiff_t)row[ta] * ldg, *gb = g0 + (ptrdiff_t)row[tb] * ldg;
                const __m256 xa = _mm256_set1_ps(val[ta]), xb = _mm256_set1_ps(val[tb]);
                for (int q = 0; q < 4; ++q) {
                    a[q] = _mm256_fmadd_ps(xa, _mm256_maskload_ps(ga + 8 * q, m[q]), a[q]);
                    b[q] = _mm256_fmadd_ps(xb, _mm256_maskload_ps(gb + 8 * q, m[q]), b[q]);
                }
            }
            for (; ta < ea; ++ta) {
                const float *ga = g0 + (ptrdiff_t)row[ta] * ldg;
                const __m256 xa = _mm256_set1_ps(val[ta]);
                for (int q = 0; q < 4; ++q)
                    a[q] = _mm256_fmadd_ps(xa, _mm256_maskload_ps(ga + 8 * q, m[q]), a[q]);
            }
            for (; tb < eb; ++tb) {
                const float *gb = g0 + (ptrdiff_t)row[tb] * ldg;
                const __m256 xb = _mm256_set1_ps(val[tb]);
                for (int q = 0; q < 4; ++q)
                    b[q] = _mm256_fmadd_ps(xb, _mm256_maskload_ps(gb + 8 * q, m[q]), b[q]);
            }
            for (int q = 0; q < 4; ++q) {
                if (two) _mm256_maskstore_ps(ob + 8 * q, m[q], b[q]);
                _mm256_maskstore_ps(oa + 8 * q, m[q], a[q]);
            }
        }
    }
}
#endif  /* SOT_HAVE_X86_SIMD */

/* Rows k0..k1 of O (d x H, row stride ldo) = X[:, k0:k1]^T G over the n rows
 * of X (row stride ldx) and G (n x H, row stride ldg); k1 - k0 <= SOT_TN_KB;
 * ws: sot_tn_scratch() words. */
static void sot_first_tn(int isa, const float *X, ptrdiff_t ldx, ptrdiff_t n, ptrdiff_t k0,
                         ptrdiff_t k1, const float *G, ptrdiff_t ldg, ptrdiff_t H, float *O,
                         ptrdiff_t ldo, int32_t *ws)
{
    float *Ok = O + k0 * ldo;
    if (n == 0) {
        for (ptrdiff_t c = 0; c < k1 - k0; ++c)
            for (ptrdiff_t j = 0; j < H; ++j) Ok[c * ldo + j] = 0.0f;
        return;
    }
    for (ptrdiff_t i0 = 0; i0 < n; i0 += SOT_TN_ROWS) {
        const ptrdiff_t ni = n - i0 < SOT_TN_ROWS ? n - i0 : SOT_TN_ROWS;
        int32_t *off, *row;
        float *val;
        sot_tn_lists(X + i0 * ldx, ldx, ni, k0, k1, ws, &off, &row, &val);
        const float *Gi = G + i0 * ldg;
        const int first = i0 == 0;
#if SOT_HAVE_X86_SIMD
        if (isa == SOT_ISA_AVX512) {
            sot_tn_block_avx512(off, row, val, k1 - k0, Gi, ldg, H, Ok, ldo, first);
            continue;
        }
        if (isa == SOT_ISA_AVX2 && sot_cpu_has_fma()) {
            sot_tn_block_avx2(off, row, val, k1 - k0, Gi, ldg, H, Ok, ldo, first);
            continue;
        }
#endif
        (void)isa;
        sot_tn_block_scalar(off, row, val, k1 - k0, Gi, ldg, H, Ok, ldo, first);
    }
}

#endif
