/* Counter-based random numbers and OpenMP shim for sotcore._kernels.
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

#include <stdint.h>
#include <stddef.h>

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

static inline uint64_t sot_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
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


/* One row of Bernoulli sampling from per-device uint32 threshold tables.
 *
 *   x = cur[j] * a[j] + b[j]        grid coordinate, clamped to [0, G-1] (NaN -> 0)
 *   g = floor(x + v),  v = (r & 4095) / 4096
 *   out[j] = r < table[j*G + g]
 *
 * With r uniform on 32 bits, g is floor(x) + 1 with probability frac(x)
 * (to 1/4096), so P(out = 1) is the *linear interpolation* of the table at x,
 * yet each sample costs one table load and one integer compare.  Reusing the
 * low 12 bits of r for the dither biases P by at most 2^12 / 2^32 ~ 1e-6;
 * the 1/4096 quantisation of frac(x) adds at most |t[g+1] - t[g]| / 4096.
 * Branch-free so that GCC vectorises it (gathers on AVX-512/AVX2 clones). */
#define SOT_DEFINE_SAMPLE_ROW(NAME, CTYPE)                                      \
SOT_CLONES                                                                       \
static void NAME(const CTYPE *restrict cur, const CTYPE *restrict a,            \
                 const CTYPE *restrict b, const uint32_t *restrict table,       \
                 ptrdiff_t G, ptrdiff_t n, const uint32_t *restrict rnd,        \
                 uint8_t *restrict out)                                          \
{                                                                                \
    const CTYPE gmax = (CTYPE)(G - 1);                                           \
    const int gtop = (int)(G - 1);                                               \
    const int Gi = (int)G;                                                       \
    for (int j = 0; j < (int)n; ++j) {                                           \
        CTYPE x = cur[j] * a[j] + b[j];                                          \
        x = x > (CTYPE)0 ? x : (CTYPE)0;                                         \
        x = x < gmax ? x : gmax;                                                 \
        uint32_t r = rnd[j];                                                     \
        CTYPE v = (CTYPE)(int)(r & 0xFFFu) * (CTYPE)(1.0 / 4096.0);              \
        int g = (int)(x + v);                                                    \
        g = g < gtop ? g : gtop;                                                 \
        out[j] = (uint8_t)(r < table[(ptrdiff_t)j * Gi + g]);                    \
    }                                                                            \
}

SOT_DEFINE_SAMPLE_ROW(sot_sample_row_f64, double)
SOT_DEFINE_SAMPLE_ROW(sot_sample_row_f32, float)

#endif
