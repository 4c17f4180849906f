/* Optimiser update steps and the nominal surrogate derivative (float32, in place). */
#ifndef SOTCORE_SOT_OPTIM_H
#define SOTCORE_SOT_OPTIM_H

#include <stddef.h>
#include <math.h>
#include "_sotrng.h"
#include "_sot_math.h"

SOT_EXACT_FP_BEGIN

/* ==========================================================================
 * Optimiser steps, float32, in place, one pass.  g' = g + l2 p (L2 penalty
 * folded in); Adam's c1 = 1 - b1 and c2 = 1 - b2 are rounded from double.  Element-wise, so results do not depend on the chunking.
 * ========================================================================== */
SOT_CLONES
static void sot_adam_f32(float *p, const float *g, float *m, float *v, ptrdiff_t n, float lr,
                         float b1, float c1, float b2, float c2, float eps, float l2)
{
    for (ptrdiff_t k = 0; k < n; ++k) {
        const float gk = g[k] + l2 * p[k];
        const float mk = b1 * m[k] + c1 * gk;
        const float vk = b2 * v[k] + c2 * (gk * gk);
        m[k] = mk;
        v[k] = vk;
        p[k] = p[k] - lr * mk / (sqrtf(vk) + eps);
    }
}

SOT_CLONES
static void sot_sgd_f32(float *p, const float *g, float *vel, ptrdiff_t n, float lr, float mu,
                        int nesterov, float l2)
{
    for (ptrdiff_t k = 0; k < n; ++k) {
        const float gk = g[k] + l2 * p[k];
        const float vk = mu * vel[k] - lr * gk;
        vel[k] = vk;
        p[k] = nesterov ? p[k] + (mu * vk - lr * gk) : p[k] + vk;
    }
}

/* g[k] *= k_unit * s (1 - s), s = expit((cur[k] - i50) / scale), computed as
 * e / (1 + e)**2 with e = exp(-|x|) (stable, symmetric). */
SOT_CLONES
static void sot_sigmoid_deriv_mul(float *g, const float *cur, ptrdiff_t n, float i50,
                                  float scale, float k_unit)
{
    for (ptrdiff_t k = 0; k < n; ++k) {
        const float x = (cur[k] - i50) / scale;
        const float e = sot_expf(-fabsf(x));
        const float d = 1.0f + e;
        g[k] = g[k] * (k_unit * (e / (d * d)));
    }
}

SOT_EXACT_FP_END

#endif
