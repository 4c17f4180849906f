/* The fused training step of a one-hidden-layer network after the devices answered, and a row hash. */
#ifndef SOTCORE_SOT_TRAIN_H
#define SOTCORE_SOT_TRAIN_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include "_sotrng.h"
#include "_sot_math.h"

SOT_EXACT_FP_BEGIN

/* ==========================================================================
 * One training step of a network with one hidden layer of H devices, after
 * the devices answered: output layer, mixture loss and backward pass, in one
 * pass over the batch (n inputs x T samples; bits row i*T + t).
 *
 *   z_r    = b2 + sum_j bit_rj W2[j]           (4 partial sums, j mod 4)
 *   p_r    = softmax(z_r)                      (sot_expf, sequential sums)
 *   loss_i = -log(max(mean_t p_(i,t)[y_i], 1e-12))
 *   g2_r   = (p_r w_t - onehot(y_i) w_t) / n,  w_t = p_(i,t)[y_i] / (T max(pbar, 1e-12))
 *   gW2    = sum_r bit_r^T g2_r,  gb2 = sum_r g2_r      (rows in order)
 *   g1_i   = (sum_t g2_(i,t)) W2^T * dP/dz(cur_i),      gb1 = sum_i g1_i
 *
 * Bits must be 0 or 1 (they enter as factors, so the loops do not branch).
 * dP/dz is the nominal curve's k e / (1 + e)**2, e = exp(-|cur - i50| / scale)
 * (deriv == NULL), or given (deriv, n x H).  All sums in a fixed order:
 * deterministic; mathematically the NumPy path of sotcore.training.
 * Returns the summed (not averaged) loss; *correct counts inputs whose
 * T-averaged argmax (first maximum) is y_i.
 * scratch: 3 Cp + n T Cp + 2 H + n T H floats.
 * ========================================================================== */
/* 16 floats: GCC/Clang vector extensions, else a struct with the same
 * per-lane operations (no FMA either way, so the same bits).  Loads and stores
 * go through memcpy (no alignment assumed). */
#if defined(__GNUC__) || defined(__clang__)
typedef float sot_v16f __attribute__((vector_size(64)));
static inline sot_v16f sot_vzero(void) { return (sot_v16f){0}; }
static inline sot_v16f sot_vadd(sot_v16f a, sot_v16f b) { return a + b; }
/* a + x * s, lane by lane */
static inline sot_v16f sot_vmac(sot_v16f a, sot_v16f x, float s) { return a + x * s; }
#else
typedef struct { float v[16]; } sot_v16f;
static inline sot_v16f sot_vzero(void) { sot_v16f r; memset(&r, 0, sizeof r); return r; }
static inline sot_v16f sot_vadd(sot_v16f a, sot_v16f b)
{
    for (int l = 0; l < 16; ++l) a.v[l] = a.v[l] + b.v[l];
    return a;
}
static inline sot_v16f sot_vmac(sot_v16f a, sot_v16f x, float s)
{
    for (int l = 0; l < 16; ++l) a.v[l] = a.v[l] + x.v[l] * s;
    return a;
}
#endif

static inline sot_v16f sot_ld16(const float *p)
{
    sot_v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void sot_st16(float *p, sot_v16f v) { memcpy(p, &v, sizeof v); }

SOT_CLONES
static double sot_train_output_step(
    const uint8_t *bits, ptrdiff_t n, ptrdiff_t T, ptrdiff_t H, const float *W2p,
    const float *W2T, const float *b2p, ptrdiff_t C, ptrdiff_t Cp, const int64_t *y,
    const float *cur, const float *deriv, float i50, float scale, float kunit, float *scratch,
    float *g1, float *gW2, float *gb2, float *gb1, int64_t *correct)
{
    const ptrdiff_t nr = n * T;
    float *acc = scratch, *mean = scratch + Cp, *ssum = scratch + 2 * Cp;
    float *P = scratch + 3 * Cp;              /* nr x Cp: probabilities, then g2 */
    float *gh = P + nr * Cp, *bf = gh + H;    /* H each */
    float *hb = bf + H;                       /* nr x H: the bits as floats */
    double loss = 0.0;
    int64_t ok = 0;
    const float invn = 1.0f / (float)n;
    for (ptrdiff_t k = 0; k < nr * H; ++k) hb[k] = (float)bits[k];
    memset(gb2, 0, Cp * sizeof(float));
    memset(gb1, 0, H * sizeof(float));
    for (ptrdiff_t i = 0; i < n; ++i) {
        const int64_t yi = y[i];
        float pysum = 0.0f;
        for (ptrdiff_t c = 0; c < Cp; ++c) mean[c] = 0.0f;
        for (ptrdiff_t t = 0; t < T; ++t) {
            const float *b = hb + (i * T + t) * H;
            float *p = P + (i * T + t) * Cp;
            for (ptrdiff_t c0 = 0; c0 < Cp; c0 += 16) {
                const float *w = W2p + c0;
                sot_v16f a0 = sot_vzero(), a1 = a0, a2 = a0, a3 = a0;
                ptrdiff_t j = 0;
                for (; j + 4 <= H; j += 4) {
                    a0 = sot_vmac(a0, sot_ld16(w + (j + 0) * Cp), b[j + 0]);
                    a1 = sot_vmac(a1, sot_ld16(w + (j + 1) * Cp), b[j + 1]);
                    a2 = sot_vmac(a2, sot_ld16(w + (j + 2) * Cp), b[j + 2]);
                    a3 = sot_vmac(a3, sot_ld16(w + (j + 3) * Cp), b[j + 3]);
                }
                for (; j < H; ++j) a0 = sot_vmac(a0, sot_ld16(w + j * Cp), b[j]);
                sot_st16(acc + c0, sot_vadd(sot_vadd(sot_vadd(a0, a1), sot_vadd(a2, a3)), sot_ld16(b2p + c0)));
            }
            float mx = acc[0];
            for (ptrdiff_t c = 1; c < C; ++c) mx = mx > acc[c] ? mx : acc[c];
            float s = 0.0f;
            for (ptrdiff_t c = 0; c < C; ++c) {
                p[c] = sot_expf(acc[c] - mx);
                s = c == 0 ? p[c] : s + p[c];
            }
            for (ptrdiff_t c = 0; c < C; ++c) {
                p[c] = p[c] / s;
                mean[c] = mean[c] + p[c];
            }
            pysum = pysum + p[yi];
        }
        ptrdiff_t best = 0;
        for (ptrdiff_t c = 1; c < C; ++c) best = mean[c] > mean[best] ? c : best;
        ok += best == yi;
        float pbar = pysum / (float)T;
        pbar = pbar > 1e-12f ? pbar : 1e-12f;
        loss -= log((double)pbar);
        for (ptrdiff_t c = 0; c < Cp; ++c) ssum[c] = 0.0f;
        for (ptrdiff_t t = 0; t < T; ++t) {
            float *p = P + (i * T + t) * Cp;
            const float w = p[yi] / ((float)T * pbar);
            for (ptrdiff_t c = 0; c < C; ++c) {
                float g = p[c] * w;
                if (c == yi) g = g - w;
                p[c] = g * invn;                       /* p now holds g2 */
            }
            for (ptrdiff_t c = C; c < Cp; ++c) p[c] = 0.0f;
            for (ptrdiff_t c = 0; c < Cp; ++c) {
                gb2[c] = gb2[c] + p[c];
                ssum[c] = ssum[c] + p[c];
            }
        }
        /* d loss / d z1 of input i: (sum_t g2) W2^T (4 independent column blocks at a
         * time, each summed over c in order), times the surrogate. */
        ptrdiff_t j0 = 0;
        for (; j0 + 64 <= H; j0 += 64) {
            sot_v16f v0 = sot_vzero(), v1 = v0, v2 = v0, v3 = v0;
            for (ptrdiff_t c = 0; c < C; ++c) {
                const float *wt = W2T + c * H + j0;
                v0 = sot_vmac(v0, sot_ld16(wt), ssum[c]);
                v1 = sot_vmac(v1, sot_ld16(wt + 16), ssum[c]);
                v2 = sot_vmac(v2, sot_ld16(wt + 32), ssum[c]);
                v3 = sot_vmac(v3, sot_ld16(wt + 48), ssum[c]);
            }
            sot_st16(gh + j0, v0);
            sot_st16(gh + j0 + 16, v1);
            sot_st16(gh + j0 + 32, v2);
            sot_st16(gh + j0 + 48, v3);
        }
        for (; j0 < H; ++j0) {
            float v = 0.0f;
            for (ptrdiff_t c = 0; c < C; ++c) v = v + W2T[c * H + j0] * ssum[c];
            gh[j0] = v;
        }
        const float *ci = cur + i * H;
        if (deriv) {
            const float *di = deriv + i * H;
            for (ptrdiff_t j = 0; j < H; ++j) bf[j] = di[j];
        } else {
            const float inv_scale = 1.0f / scale;
            for (ptrdiff_t j = 0; j < H; ++j) {
                const float x = (ci[j] - i50) * inv_scale;
                const float e = sot_expf(-fabsf(x));
                const float d = 1.0f + e;
                bf[j] = kunit * (e / (d * d));
            }
        }
        float *gi = g1 + i * H;
        for (ptrdiff_t j = 0; j < H; ++j) {
            gi[j] = gh[j] * bf[j];
            gb1[j] = gb1[j] + gi[j];
        }
    }
    /* gW2[j] = sum over rows r (in order) of g2_r * bit_rj; 8 rows j at a time
     * (independent sums, so the adds pipeline). */
    for (ptrdiff_t c0 = 0; c0 < Cp; c0 += 16) {
        ptrdiff_t j = 0;
        for (; j + 8 <= H; j += 8) {
            sot_v16f v[8];
            for (int k = 0; k < 8; ++k) v[k] = sot_vzero();
            for (ptrdiff_t r = 0; r < nr; ++r) {
                const sot_v16f g = sot_ld16(P + r * Cp + c0);
                const float *hr = hb + r * H + j;
                for (int k = 0; k < 8; ++k) v[k] = sot_vmac(v[k], g, hr[k]);
            }
            for (int k = 0; k < 8; ++k) sot_st16(gW2 + (j + k) * Cp + c0, v[k]);
        }
        for (; j < H; ++j) {
            sot_v16f v = sot_vzero();
            for (ptrdiff_t r = 0; r < nr; ++r)
                v = sot_vmac(v, sot_ld16(P + r * Cp + c0), hb[r * H + j]);
            sot_st16(gW2 + j * Cp + c0, v);
        }
    }
    *correct = ok;
    return loss;
}

/* Content hash of float32 rows (as uint32 bit patterns): see
 * sotcore.estimator._row_keys, which this computes without temporaries. */
SOT_CLONES
static void sot_row_hash(const uint32_t *X, ptrdiff_t nrows, ptrdiff_t d, const uint64_t *mult,
                         uint64_t *out)
{
    for (ptrdiff_t i = 0; i < nrows; ++i) {
        const uint32_t *x = X + i * d;
        uint64_t h = 0;
        for (ptrdiff_t j = 0; j < d; ++j) h += (uint64_t)x[j] * mult[j];
        h ^= h >> 29;
        h *= 0xBF58476D1CE4E5B9ULL;
        h ^= h >> 32;
        out[i] = h;
    }
}

SOT_EXACT_FP_END

#endif
