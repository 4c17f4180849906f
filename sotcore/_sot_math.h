/* Shared float32 helpers of the compiled kernels: exp by a fixed polynomial
 * (the same steps in every path, so results are bit-identical) and portable
 * fallbacks for compiler builtins.  Included by _sot_infer.h and _sot_train.h. */
#ifndef SOTCORE_SOT_MATH_H
#define SOTCORE_SOT_MATH_H

#include "_sot_fp.h"
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <math.h>

SOT_EXACT_FP_BEGIN

/* Portable fallbacks for compiler builtins (GCC and Clang have them). */
#if defined(__GNUC__) || defined(__clang__)
#define SOT_CTZ32(x) __builtin_ctz(x)
#define SOT_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
static inline int SOT_CTZ32(uint32_t x) { int k = 0; while (!(x & 1u)) { x >>= 1; ++k; } return k; }
#define SOT_UNLIKELY(x) (x)
#endif

#define SOT_EXP_LOG2E 1.44269504088896341f
#define SOT_EXP_MAGIC 12582912.0f          /* 1.5 * 2**23: rounds to an integer */
#define SOT_EXP_C1 0.693359375f
#define SOT_EXP_C2 -2.12194440e-4f
#define SOT_EXP_P0 1.9875691500e-4f
#define SOT_EXP_P1 1.3981999507e-3f
#define SOT_EXP_P2 8.3334519073e-3f
#define SOT_EXP_P3 4.1665795894e-2f
#define SOT_EXP_P4 1.6666665459e-1f
#define SOT_EXP_P5 5.0000001201e-1f

/* exp(x) for float32 (Cephes' polynomial, ~1 ulp), argument clamped to
 * [-87, 88]; NaN counts as -87.  The vector version does the same steps. */
static inline float sot_expf(float x)
{
    x = x > -87.0f ? x : -87.0f;
    x = x < 88.0f ? x : 88.0f;
    float fx = x * SOT_EXP_LOG2E;
    fx = (fx + SOT_EXP_MAGIC) - SOT_EXP_MAGIC;
    float r = x - fx * SOT_EXP_C1;
    r = r - fx * SOT_EXP_C2;
    float y = SOT_EXP_P0;
    y = y * r + SOT_EXP_P1;
    y = y * r + SOT_EXP_P2;
    y = y * r + SOT_EXP_P3;
    y = y * r + SOT_EXP_P4;
    y = y * r + SOT_EXP_P5;
    const float r2 = r * r;
    y = y * r2 + r + 1.0f;
    const uint32_t eb = (uint32_t)((int32_t)fx + 127) << 23;
    float sc;
    memcpy(&sc, &eb, sizeof sc);
    return y * sc;
}

SOT_EXACT_FP_END

#endif
