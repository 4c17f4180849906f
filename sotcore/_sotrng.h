/* Counter-based random numbers, the Bernoulli table sampler and an OpenMP
 * shim for sotcore._kernels.
 *
 * The generator is SplitMix64 evaluated at an explicit counter:
 *     u64(key, c) = mix64(key + (c + 1) * GAMMA)
 * Every output depends only on (key, c), never on which thread computes it,
 * so the bits are identical at any thread count and any chunking.
 * SplitMix64 (Steele, Lea & Flood 2014) passes BigCrush; mix64 is its
 * output function (Stafford's "Mix13" variant).
 */
#ifndef SOTCORE_SOTRNG_H
#define SOTCORE_SOTRNG_H

#include "_sot_fp.h"
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
static inline int sot_openmp_enabled(void) { return 1; }
static inline int sot_omp_max_threads(void) { return omp_get_max_threads(); }
#else
static inline int sot_openmp_enabled(void) { return 0; }
static inline int sot_omp_max_threads(void) { return 1; }
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(SOTCORE_NO_CLONES)
#define SOT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SOT_CLONES
#endif

#define SOT_GAMMA 0x9E3779B97F4A7C15ULL
#define SOT_MIX1 0xBF58476D1CE4E5B9ULL
#define SOT_MIX2 0x94D049BB133111EBULL

static inline uint64_t sot_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * SOT_MIX1;
    z = (z ^ (z >> 27)) * SOT_MIX2;
    return z ^ (z >> 31);
}

/* Key of an independent stream, derived from a seed and a stream id. */
static inline uint64_t sot_stream_key(uint64_t seed, uint64_t stream)
{
    return sot_mix64(sot_mix64(seed ^ 0x5851F42D4C957F2DULL) + stream * SOT_GAMMA);
}

static inline uint64_t sot_u64(uint64_t key, uint64_t ctr)
{
    return sot_mix64(key + (ctr + 1) * SOT_GAMMA);
}

/* Fill out[0..n) with u64(key, ctr0 + k).  No loop-carried dependence, so the
 * compiler vectorises it; on x86-64 with GCC the best of AVX-512/AVX2/SSE2 is
 * chosen at load time (portable binary, no -march=native needed). */
SOT_CLONES
static void sot_fill_u64(uint64_t key, uint64_t ctr0, uint64_t *out, ptrdiff_t n)
{
    uint64_t base = key + (ctr0 + 1) * SOT_GAMMA;
    for (ptrdiff_t k = 0; k < n; ++k) {
        out[k] = sot_mix64(base + (uint64_t)k * SOT_GAMMA);
    }
}


/* ==========================================================================
 * Bernoulli sampling from per-device uint32 threshold tables.
 *
 * Element (global row r, column j) of an (n, m) array of currents, with a
 * table of G points per device (row j of `table`, row stride ldt):
 *
 *   u    = u64(key, r * ceil(m/2) + j/2)    one draw per (row, device pair)
 *   w    = low 32 bits of u for even j, high 32 bits for odd j
 *   s    = cur * (4096 a[j]) + 4096 b[j]     = 4096 x, x the grid coordinate;
 *                                            product then sum, in the dtype
 *   s    = min(max(s, 0), 4096 (G-1))        NaN -> 0: never out of bounds
 *   g    = (trunc(s) + (w & 4095)) >> 12     dithered grid index, 0..G-1
 *   bit  = w < table[j][g]
 *
 * With w & 4095 uniform, g = floor(x) + 1 with probability
 * floor(4096 frac(x)) / 4096, so P(bit = 1) is the table *linearly
 * interpolated* at x, divided by 2**32, for one table load and one compare.
 *
 * Bias bound.  With d the largest |table[g+1] - table[g]| / 2**32 near x,
 *   |P - interp(x)| <= d / 4096          (frac(x) quantised to 1/4096)
 *                    + 4096 / 2**32      (the dither reuses the 12 low bits of w;
 *                                         this term is 0 where t[g] = t[g+1])
 * For the default tables (1024 points over +-10 scales, d <= 0.0049):
 * < 1.2e-6 + 9.6e-7 < 2.2e-6.  float32 currents resolve x to about
 * G * 2**-24 grid units, i.e. a further <= d * G * 2**-24 (3e-7 for the
 * defaults).
 *
 * Every path below does the same IEEE operations in the same order (4096 a
 * and 4096 b are exact; no fused multiply-add), so the bits are identical
 * whichever path the CPU runs, as well as for any thread count and chunking.
 *
 * Non-finite currents are sampled as clamped (NaN as grid point 0) and
 * reported: each block function returns 1 if it saw a NaN or an infinity
 * among its currents, else 0, so callers can validate for free.
 *
 * Speed.  A row of 500 devices touches 500 tables of 4 KB (2 MB for the
 * default tables), far beyond L1, so the work is *tiled*: a block of rows is
 * processed one tile of 16 devices at a time, whose hot table lines mostly
 * stay in L1.  Within a tile one vector holds the row's 16 devices: one load
 * of currents, 8 SplitMix64 draws in one vector, one gather of thresholds.
 * The caller chooses blocks big enough (~1000 rows) to amortise loading
 * each tile's tables.
 * ========================================================================== */

#define SOT_TILE 16          /* devices per tile; even, so tiles hold whole pairs */

/* No contraction: x = cur*a + b fused into an FMA would round differently
 * from the paths without FMA and break the "same bits on every CPU" rule. */
SOT_EXACT_FP_BEGIN

/* Block of rows [0, nrows) (pointers at the block's first row; global row
 * `row`) x columns [j0, j1), j0 even.  Returns 1 if a current was not finite. */
#define SOT_BLOCK_ARGS(CTYPE)                                                       \
    const CTYPE *cur, const CTYPE *a, const CTYPE *b, const uint32_t *table,         \
    ptrdiff_t ldt, ptrdiff_t m, ptrdiff_t G, uint64_t key, uint64_t row,             \
    const uint64_t *rowkeys, ptrdiff_t nrows, ptrdiff_t j0, ptrdiff_t j1, uint8_t *out

typedef int (*sot_block_f64_fn)(SOT_BLOCK_ARGS(double));
typedef int (*sot_block_f32_fn)(SOT_BLOCK_ARGS(float));

#define SOT_DEFINE_SCALAR(NAME, CTYPE, UTYPE, EXPBITS)                              \
static int NAME(SOT_BLOCK_ARGS(CTYPE))                                               \
{                                                                                    \
    const uint64_t npairs = (uint64_t)(m + 1) / 2;                                   \
    const CTYPE smax = (CTYPE)4096 * (CTYPE)(G - 1);                                 \
    int nonfinite = 0;                                                               \
    for (ptrdiff_t jt = j0; jt < j1; jt += SOT_TILE) {                               \
        const ptrdiff_t je = jt + SOT_TILE < j1 ? jt + SOT_TILE : j1;                \
        for (ptrdiff_t i = 0; i < nrows; ++i) {                                      \
            const CTYPE *c = cur + i * m;                                            \
            uint8_t *o = out + i * m;                                                \
            const uint64_t rr = rowkeys ? rowkeys[i] : row + (uint64_t)i;           \
            uint64_t z = key + (rr * npairs + (uint64_t)jt / 2 + 1) * SOT_GAMMA;     \
            uint64_t u = 0;                                                          \
            for (ptrdiff_t j = jt; j < je; ++j) {                                    \
                if (((j - jt) & 1) == 0) {                                           \
                    u = sot_mix64(z);                                                \
                    z += SOT_GAMMA;                                                  \
                }                                                                    \
                const uint32_t w = (uint32_t)(((j - jt) & 1) ? u >> 32 : u);         \
                UTYPE bits;                                                          \
                memcpy(&bits, c + j, sizeof bits);                                   \
                nonfinite |= (bits & (EXPBITS)) == (EXPBITS);                        \
                CTYPE s = c[j] * (a[j] * (CTYPE)4096);                               \
                s = s + b[j] * (CTYPE)4096;                                          \
                s = s > (CTYPE)0 ? s : (CTYPE)0;                                     \
                s = s < smax ? s : smax;                                             \
                const uint32_t g = ((uint32_t)s + (w & 0xFFFu)) >> 12;               \
                o[j] = (uint8_t)(w < table[j * ldt + g]);                            \
            }                                                                        \
        }                                                                            \
    }                                                                                \
    return nonfinite;                                                                \
}

SOT_DEFINE_SCALAR(sot_block_f64_scalar, double, uint64_t, 0x7FF0000000000000ULL)
SOT_DEFINE_SCALAR(sot_block_f32_scalar, float, uint32_t, 0x7F800000u)

#define SOT_ISA_SCALAR 0
#define SOT_ISA_AVX2 1
#define SOT_ISA_AVX512 2

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) \
    && !defined(SOTCORE_NO_SIMD)
#define SOT_HAVE_X86_SIMD 1
#include <immintrin.h>

/* A tile's currents are strided (one row apart), which hardware prefetchers
 * follow poorly; fetch SOT_PF_ROWS rows ahead.  Prefetches never fault. */
#define SOT_PF_ROWS 16
#define SOT_PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)

/* ---------------------------------------------------------------- AVX-512 */
#define SOT_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

SOT_AVX512 static inline __m512i sot_mix64_512(__m512i z)
{
    z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 30));
    z = _mm512_mullo_epi64(z, _mm512_set1_epi64((long long)SOT_MIX1));
    z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 27));
    z = _mm512_mullo_epi64(z, _mm512_set1_epi64((long long)SOT_MIX2));
    return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}

#define SOT_AVX512_PROLOGUE                                                          \
    const uint64_t npairs = (uint64_t)(m + 1) / 2;                                   \
    const __m512i lo12 = _mm512_set1_epi32(0xFFF);                                   \
    const __m128i one8 = _mm_set1_epi8(1);                                           \
    const __m512i zstep8 = _mm512_mullo_epi64(                                       \
        _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi64((long long)SOT_GAMMA)); \
    const __m512i zrow = _mm512_set1_epi64((long long)(npairs * SOT_GAMMA));         \
    const __m512i colofs = _mm512_mullo_epi32(                                       \
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),      \
        _mm512_set1_epi32((int)ldt));

/* Loop head shared by both dtypes: tile jt of w <= 16 devices (lane mask mk),
 * row i; r holds the 16 random words of the row's 8 device pairs. */
#define SOT_AVX512_TILE_BEGIN                                                        \
    for (ptrdiff_t jt = j0; jt < j1; jt += SOT_TILE) {                               \
        const ptrdiff_t w = j1 - jt < SOT_TILE ? j1 - jt : SOT_TILE;                 \
        const __mmask16 mk = (__mmask16)((1u << w) - 1u);                            \
        /* Lane offsets stay below 16 * ldt: index from the tile's first table. */   \
        const int *tab = (const int *)(table + jt * ldt);                            \
        __m512i z = _mm512_add_epi64(zstep8, _mm512_set1_epi64(                      \
            (long long)(key + (row * npairs + (uint64_t)jt / 2 + 1) * SOT_GAMMA)));  \
        const CTYPE *c = cur + jt;                                                   \
        uint8_t *o = out + jt;                                                       \
        SOT_AVX512_TILE_CONSTANTS                                                    \
        for (ptrdiff_t i = 0; i < nrows; ++i, c += m, o += m) {                      \
            SOT_PREFETCH(c + SOT_PF_ROWS * m);                                       \
            SOT_PREFETCH(c + SOT_PF_ROWS * m + 15);                                  \
            if (rowkeys)                                                             \
                z = _mm512_add_epi64(zstep8, _mm512_set1_epi64((long long)(key +     \
                    (rowkeys[i] * npairs + (uint64_t)jt / 2 + 1) * SOT_GAMMA)));     \
            const __m512i r = sot_mix64_512(z);                                      \
            z = _mm512_add_epi64(z, zrow);

/* Loop tail: from q = trunc(s) of the 16 lanes, dither, gather, compare, store. */
#define SOT_AVX512_TILE_END                                                          \
            const __m512i g = _mm512_srli_epi32(                                     \
                _mm512_add_epi32(q, _mm512_and_si512(r, lo12)), 12);                 \
            const __m512i t = _mm512_mask_i32gather_epi32(                           \
                _mm512_setzero_si512(), mk, _mm512_add_epi32(g, colofs), tab, 4);    \
            const __mmask16 bit = _mm512_mask_cmplt_epu32_mask(mk, r, t);            \
            _mm_mask_storeu_epi8(o, mk, _mm_maskz_mov_epi8(bit, one8));              \
        }                                                                            \
    }

#define CTYPE float
#define SOT_AVX512_TILE_CONSTANTS                                                    \
        const __m512 va = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, a + jt), s4096);   \
        const __m512 vb = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, b + jt), s4096);
SOT_AVX512 static int sot_block_f32_avx512(SOT_BLOCK_ARGS(float))
{
    SOT_AVX512_PROLOGUE
    const __m512 zero = _mm512_setzero_ps();
    const __m512 smax = _mm512_set1_ps((float)4096 * (float)(G - 1));
    const __m512 s4096 = _mm512_set1_ps(4096.0f);
    const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
    __m512i amax = _mm512_setzero_si512();    /* largest |current| bit pattern */
    SOT_AVX512_TILE_BEGIN
        __m512 x = _mm512_maskz_loadu_ps(mk, c);
        amax = _mm512_max_epu32(amax, _mm512_and_si512(_mm512_castps_si512(x), absmask));
        x = _mm512_add_ps(_mm512_mul_ps(x, va), vb);
        x = _mm512_min_ps(_mm512_max_ps(x, zero), smax);   /* NaN -> 0 */
        const __m512i q = _mm512_cvttps_epu32(x);
    SOT_AVX512_TILE_END
    return _mm512_reduce_max_epu32(amax) >= 0x7F800000u;
}
#undef SOT_AVX512_TILE_CONSTANTS
#undef CTYPE

#define CTYPE double
#define SOT_AVX512_TILE_CONSTANTS                                                    \
        const __mmask8 mlo = (__mmask8)(mk & 0xFF), mhi = (__mmask8)(mk >> 8);       \
        const __m512d alo = _mm512_mul_pd(_mm512_maskz_loadu_pd(mlo, a + jt), s4096); \
        const __m512d ahi = _mm512_mul_pd(_mm512_maskz_loadu_pd(mhi, a + jt + 8), s4096); \
        const __m512d blo = _mm512_mul_pd(_mm512_maskz_loadu_pd(mlo, b + jt), s4096); \
        const __m512d bhi = _mm512_mul_pd(_mm512_maskz_loadu_pd(mhi, b + jt + 8), s4096);
SOT_AVX512 static int sot_block_f64_avx512(SOT_BLOCK_ARGS(double))
{
    SOT_AVX512_PROLOGUE
    const __m512d zero = _mm512_setzero_pd();
    const __m512d smax = _mm512_set1_pd(4096.0 * (double)(G - 1));
    const __m512d s4096 = _mm512_set1_pd(4096.0);
    const __m512i absmask = _mm512_set1_epi64(0x7FFFFFFFFFFFFFFFLL);
    __m512i amax = _mm512_setzero_si512();
    SOT_AVX512_TILE_BEGIN
        SOT_PREFETCH(c + SOT_PF_ROWS * m + 8);
        __m512d xl = _mm512_maskz_loadu_pd(mlo, c);
        __m512d xh = _mm512_maskz_loadu_pd(mhi, c + 8);
        amax = _mm512_max_epu64(amax, _mm512_and_si512(_mm512_castpd_si512(xl), absmask));
        amax = _mm512_max_epu64(amax, _mm512_and_si512(_mm512_castpd_si512(xh), absmask));
        xl = _mm512_add_pd(_mm512_mul_pd(xl, alo), blo);
        xh = _mm512_add_pd(_mm512_mul_pd(xh, ahi), bhi);
        xl = _mm512_min_pd(_mm512_max_pd(xl, zero), smax);
        xh = _mm512_min_pd(_mm512_max_pd(xh, zero), smax);
        const __m512i q = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm512_cvttpd_epu32(xl)), _mm512_cvttpd_epu32(xh), 1);
    SOT_AVX512_TILE_END
    return _mm512_reduce_max_epu64(amax) >= 0x7FF0000000000000ULL;
}
#undef SOT_AVX512_TILE_CONSTANTS
#undef CTYPE

/* ------------------------------------------------------------------- AVX2 */
#define SOT_AVX2 __attribute__((target("avx2")))

/* Low 64 bits of z * C per lane (AVX2 has no 64-bit multiply). */
SOT_AVX2 static inline __m256i sot_mullo64_256(__m256i z, uint64_t C)
{
    const __m256i cl = _mm256_set1_epi64x((long long)(C & 0xFFFFFFFFu));
    const __m256i ch = _mm256_set1_epi64x((long long)(C >> 32));
    __m256i cross = _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(z, 32), cl),
                                     _mm256_mul_epu32(z, ch));
    return _mm256_add_epi64(_mm256_mul_epu32(z, cl), _mm256_slli_epi64(cross, 32));
}

SOT_AVX2 static inline __m256i sot_mix64_256(__m256i z)
{
    z = _mm256_xor_si256(z, _mm256_srli_epi64(z, 30));
    z = sot_mullo64_256(z, SOT_MIX1);
    z = _mm256_xor_si256(z, _mm256_srli_epi64(z, 27));
    z = sot_mullo64_256(z, SOT_MIX2);
    return _mm256_xor_si256(z, _mm256_srli_epi64(z, 31));
}

/* Byte k of sot_bytes8[mask] is bit k of mask: 8 compare results -> 8 bytes. */
static uint64_t sot_bytes8[256];

static void sot_init_bytes8(void)
{
    for (int k = 0; k < 256; ++k) {
        uint64_t v = 0;
        for (int bit = 0; bit < 8; ++bit)
            v |= (uint64_t)((k >> bit) & 1) << (8 * bit);
        sot_bytes8[k] = v;
    }
}

/* Tiles of 8 devices (one ymm of int32 lanes).  AVX2 converts to *signed*
 * int32, so tables above 2**19 points (4096 x >= 2**31) take the scalar path,
 * as do the last m % 8 columns. */
#define SOT_AVX2_PROLOGUE                                                            \
    const uint64_t npairs = (uint64_t)(m + 1) / 2;                                   \
    const __m256i lo12 = _mm256_set1_epi32(0xFFF);                                   \
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u);                        \
    const __m256i zstep4 = _mm256_set_epi64x((long long)(3 * SOT_GAMMA),             \
        (long long)(2 * SOT_GAMMA), (long long)SOT_GAMMA, 0);                        \
    const __m256i zrow = _mm256_set1_epi64x((long long)(npairs * SOT_GAMMA));        \
    const __m256i colofs = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), \
                                              _mm256_set1_epi32((int)ldt));          \
    const ptrdiff_t jv = G <= (1 << 19) ? j0 + (j1 - j0) / 8 * 8 : j0;               \
    int nonfinite = 0;

#define SOT_AVX2_TILE_BEGIN                                                          \
    for (ptrdiff_t jt = j0; jt < jv; jt += 8) {                                      \
        const int *tab = (const int *)(table + jt * ldt);                            \
        __m256i z = _mm256_add_epi64(zstep4, _mm256_set1_epi64x(                     \
            (long long)(key + (row * npairs + (uint64_t)jt / 2 + 1) * SOT_GAMMA)));  \
        const CTYPE *c = cur + jt;                                                   \
        uint8_t *o = out + jt;                                                       \
        SOT_AVX2_TILE_CONSTANTS                                                      \
        for (ptrdiff_t i = 0; i < nrows; ++i, c += m, o += m) {                      \
            SOT_PREFETCH(c + SOT_PF_ROWS * m);                                       \
            SOT_PREFETCH(c + SOT_PF_ROWS * m + 7);                                   \
            if (rowkeys)                                                             \
                z = _mm256_add_epi64(zstep4, _mm256_set1_epi64x((long long)(key +    \
                    (rowkeys[i] * npairs + (uint64_t)jt / 2 + 1) * SOT_GAMMA)));     \
            const __m256i r = sot_mix64_256(z);                                      \
            z = _mm256_add_epi64(z, zrow);

#define SOT_AVX2_TILE_END                                                            \
            const __m256i g = _mm256_srli_epi32(                                     \
                _mm256_add_epi32(q, _mm256_and_si256(r, lo12)), 12);                 \
            const __m256i t = _mm256_i32gather_epi32(tab, _mm256_add_epi32(g, colofs), 4); \
            const __m256i lt = _mm256_cmpgt_epi32(_mm256_xor_si256(t, sign),         \
                                                  _mm256_xor_si256(r, sign));        \
            const uint64_t bytes = sot_bytes8[_mm256_movemask_ps(_mm256_castsi256_ps(lt))]; \
            memcpy(o, &bytes, 8);                                                    \
        }                                                                            \
    }

#define CTYPE float
#define SOT_AVX2_TILE_CONSTANTS                                                      \
        const __m256 va = _mm256_mul_ps(_mm256_loadu_ps(a + jt), s4096);             \
        const __m256 vb = _mm256_mul_ps(_mm256_loadu_ps(b + jt), s4096);
SOT_AVX2 static int sot_block_f32_avx2(SOT_BLOCK_ARGS(float))
{
    SOT_AVX2_PROLOGUE
    const __m256 zero = _mm256_setzero_ps();
    const __m256 smax = _mm256_set1_ps((float)4096 * (float)(G - 1));
    const __m256 s4096 = _mm256_set1_ps(4096.0f);
    const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i amax = _mm256_setzero_si256();
    SOT_AVX2_TILE_BEGIN
        __m256 x = _mm256_loadu_ps(c);
        amax = _mm256_max_epu32(amax, _mm256_and_si256(_mm256_castps_si256(x), absmask));
        x = _mm256_add_ps(_mm256_mul_ps(x, va), vb);
        x = _mm256_min_ps(_mm256_max_ps(x, zero), smax);
        const __m256i q = _mm256_cvttps_epi32(x);
    SOT_AVX2_TILE_END
    /* amax lanes are < 2**31, so a signed compare is exact */
    nonfinite |= _mm256_movemask_epi8(
        _mm256_cmpgt_epi32(amax, _mm256_set1_epi32(0x7F7FFFFF))) != 0;
    if (jv < j1)
        nonfinite |= sot_block_f32_scalar(cur, a, b, table, ldt, m, G, key, row, rowkeys, nrows,
                                          jv, j1, out);
    return nonfinite;
}
#undef SOT_AVX2_TILE_CONSTANTS
#undef CTYPE

#define CTYPE double
#define SOT_AVX2_TILE_CONSTANTS                                                      \
        const __m256d alo = _mm256_mul_pd(_mm256_loadu_pd(a + jt), s4096);          \
        const __m256d ahi = _mm256_mul_pd(_mm256_loadu_pd(a + jt + 4), s4096);      \
        const __m256d blo = _mm256_mul_pd(_mm256_loadu_pd(b + jt), s4096);          \
        const __m256d bhi = _mm256_mul_pd(_mm256_loadu_pd(b + jt + 4), s4096);
SOT_AVX2 static int sot_block_f64_avx2(SOT_BLOCK_ARGS(double))
{
    SOT_AVX2_PROLOGUE
    const __m256d zero = _mm256_setzero_pd();
    const __m256d smax = _mm256_set1_pd(4096.0 * (double)(G - 1));
    const __m256d s4096 = _mm256_set1_pd(4096.0);
    const __m256i absmask = _mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFLL);
    const __m256i maxfinite = _mm256_set1_epi64x(0x7FEFFFFFFFFFFFFFLL);
    __m256i bad = _mm256_setzero_si256();
    SOT_AVX2_TILE_BEGIN
        SOT_PREFETCH(c + SOT_PF_ROWS * m + 4);
        __m256d xl = _mm256_loadu_pd(c), xh = _mm256_loadu_pd(c + 4);
        bad = _mm256_or_si256(bad, _mm256_cmpgt_epi64(
            _mm256_and_si256(_mm256_castpd_si256(xl), absmask), maxfinite));
        bad = _mm256_or_si256(bad, _mm256_cmpgt_epi64(
            _mm256_and_si256(_mm256_castpd_si256(xh), absmask), maxfinite));
        xl = _mm256_add_pd(_mm256_mul_pd(xl, alo), blo);
        xh = _mm256_add_pd(_mm256_mul_pd(xh, ahi), bhi);
        xl = _mm256_min_pd(_mm256_max_pd(xl, zero), smax);
        xh = _mm256_min_pd(_mm256_max_pd(xh, zero), smax);
        const __m256i q = _mm256_set_m128i(_mm256_cvttpd_epi32(xh), _mm256_cvttpd_epi32(xl));
    SOT_AVX2_TILE_END
    nonfinite |= _mm256_movemask_epi8(bad) != 0;
    if (jv < j1)
        nonfinite |= sot_block_f64_scalar(cur, a, b, table, ldt, m, G, key, row, rowkeys, nrows,
                                          jv, j1, out);
    return nonfinite;
}
#undef SOT_AVX2_TILE_CONSTANTS
#undef CTYPE

static int sot_detect_isa(void)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        return SOT_ISA_AVX512;
    if (__builtin_cpu_supports("avx2"))
        return SOT_ISA_AVX2;
    return SOT_ISA_SCALAR;
}
#else
#define SOT_HAVE_X86_SIMD 0
static int sot_detect_isa(void) { return SOT_ISA_SCALAR; }
#endif  /* x86-64 SIMD */

SOT_EXACT_FP_END

/* Dispatch.  The path is chosen once, on first use, with the GIL held (the
 * Cython caller resolves it before entering a parallel region). */
static int sot_isa_best = -1, sot_isa_cur = -1;

/* Best path this CPU supports. */
static int sot_sampler_isa_max(void)
{
    if (sot_isa_best < 0) {
#if SOT_HAVE_X86_SIMD
        sot_init_bytes8();
#endif
        sot_isa_best = sot_detect_isa();
    }
    return sot_isa_best;
}

/* The path in use: the best one unless lowered by sot_set_sampler_isa. */
static int sot_sampler_isa(void)
{
    if (sot_isa_cur < 0)
        sot_isa_cur = sot_sampler_isa_max();
    return sot_isa_cur;
}

/* Select a path (tests, benchmarks), capped at what the CPU supports; a
 * negative level restores the best.  Returns the path now in use. */
static int sot_set_sampler_isa(int level)
{
    int best = sot_sampler_isa_max();
    sot_isa_cur = (level < 0 || level > best) ? best : level;
    return sot_isa_cur;
}

static sot_block_f64_fn sot_block_f64_for(int isa)
{
#if SOT_HAVE_X86_SIMD
    if (isa == SOT_ISA_AVX512) return sot_block_f64_avx512;
    if (isa == SOT_ISA_AVX2) return sot_block_f64_avx2;
#endif
    (void)isa;
    return sot_block_f64_scalar;
}

static sot_block_f32_fn sot_block_f32_for(int isa)
{
#if SOT_HAVE_X86_SIMD
    if (isa == SOT_ISA_AVX512) return sot_block_f32_avx512;
    if (isa == SOT_ISA_AVX2) return sot_block_f32_avx2;
#endif
    (void)isa;
    return sot_block_f32_scalar;
}

#endif
