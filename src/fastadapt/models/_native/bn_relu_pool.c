/* Conv-4's BatchNorm (batch statistics) -> ReLU -> 2x2 max-pool, forward and backward, for
   float32 NCHW tensors on the CPU: the native kernels of fastadapt.models.fused (built and loaded by
   fastadapt.models.native, which checks shapes, dtypes and contiguity before calling).

   PyTorch's operations read and write the full-resolution activations several times per pass;
   these kernels read them once in the forward pass after the statistics (one pass each for the
   statistics and for normalising, rectifying and pooling a plane) and once in the backward pass
   (one write of the input gradient), plane by plane in memory order. Semantics, checked by
   tests/test_native.py against PyTorch's layers in float64:
   - the batch mean and biased variance per channel over N x H x W (sums of blocks of values in
     float, of the blocks in double, shifted by the channel's mean over the first image);
   - each 2x2 window's maximum (minimum where gamma * invstd < 0: the affine map then decreases),
     the first one in row-major order on ties, as max_pool2d, and NaN when the window holds one;
     gamma == 0 (every element of a window then ties after the affine map) is left to the caller;
     a last odd row or column is dropped, as max_pool2d does;
   - out = max(0, a * (x - mean) + beta) with a = gamma / sqrt(var + eps) (NaN stays NaN);
   - the input gradient a * (dy - mean(dy) - xhat * mean(dy * xhat)), where dy is the output
     gradient at each window's chosen element where out > 0 and zero elsewhere.
   Both functions return 0, or -1 when a scratch allocation failed (nothing is then valid). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* x beats y: larger, or NaN against a number (NaN propagates as in max_pool2d); ties keep y */
static inline int gt(float x, float y) { return (x > y) | ((x != x) & (y == y)); }
/* c ? a : b without a branch (c is 0 or 1) */
static inline float pick(int c, float a, float b) {
    uint32_t ua, ub, r, mask = (uint32_t)0 - (uint32_t)c;
    memcpy(&ua, &a, 4);
    memcpy(&ub, &b, 4);
    r = (ua & mask) | (ub & ~mask);
    float f;
    memcpy(&f, &r, 4);
    return f;
}

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
#endif

/* Float sums of BLOCK consecutive values at a time (vectorised), added up in double: the error
   does not grow with the size of a plane. */
#define BLOCK 1024

/* Per channel: the sums of (v - shift) and of its square over all planes (forward), or of g and
   g * weight with g = v where mask > 0 (backward, when weight is given). Each thread adds its
   planes into its own row of partial sums and the rows are added in thread order afterwards, so
   the result does not depend on timing. Returns 0, or -1 when out of memory. */
static int channel_sums(const float *v, int64_t n, int64_t c, int64_t plane, const float *shift, const float *weight,
                        const float *mask, double *s1, double *s2, int threads) {
    if (threads < 1) threads = 1;
    double *parts = calloc((size_t)threads * 2 * c, sizeof(double));
    if (!parts) return -1;
#pragma omp parallel num_threads(threads)
    {
        double *a1 = parts + (size_t)omp_get_thread_num() * 2 * c;
#pragma omp for schedule(static)
        for (int64_t pi = 0; pi < n * c; pi++) {
            const int64_t ch = pi % c;
            const float *p = v + pi * plane;
            for (int64_t k0 = 0; k0 < plane; k0 += BLOCK) {
                const int64_t k1 = k0 + BLOCK < plane ? k0 + BLOCK : plane;
                float acc1 = 0.f, acc2 = 0.f;
                if (weight) {
                    const float *wt = weight + pi * plane, *mk = mask + pi * plane;
#pragma omp simd reduction(+ : acc1, acc2)
                    for (int64_t k = k0; k < k1; k++) { float g = mk[k] > 0.f ? p[k] : 0.f; acc1 += g; acc2 += g * wt[k]; }
                } else {
                    const float sh = shift[ch];
#pragma omp simd reduction(+ : acc1, acc2)
                    for (int64_t k = k0; k < k1; k++) { float d = p[k] - sh; acc1 += d; acc2 += d * d; }
                }
                a1[ch] += acc1;
                a1[c + ch] += acc2;
            }
        }
    }
    memset(s1, 0, sizeof(double) * c);
    memset(s2, 0, sizeof(double) * c);
    for (int t = 0; t < threads; t++)
        for (int64_t ch = 0; ch < c; ch++) {
            s1[ch] += parts[(size_t)t * 2 * c + ch];
            s2[ch] += parts[(size_t)t * 2 * c + c + ch];
        }
    free(parts);
    return 0;
}

int bnrp_forward(const float *z, const float *gamma, const float *beta, float eps, int64_t n, int64_t c, int64_t h, int64_t w,
                 float *out, float *pooled, uint8_t *idx, float *mean_out, float *var_out, float *invstd_out,
                 int threads) {
    const int64_t hw = h * w, h2 = h / 2, w2 = w / 2, q = h2 * w2;
    const double count = (double)(n * hw);
    double *s = malloc(2 * c * sizeof(double));
    float *shift = calloc(c, sizeof(float));
    if (!s || !shift) { free(s); free(shift); return -1; }
    /* the shift: each channel's mean over the first image, near the batch mean, so that the sum of
       squares hardly cancels */
    for (int64_t ch = 0; ch < c; ch++) {
        double m0 = 0.0;
        for (int64_t k0 = 0; k0 < hw; k0 += BLOCK) {
            const int64_t k1 = k0 + BLOCK < hw ? k0 + BLOCK : hw;
            float acc = 0.f;
            for (int64_t k = k0; k < k1; k++) acc += z[ch * hw + k];
            m0 += acc;
        }
        shift[ch] = (float)(m0 / (double)hw);
    }
    if (channel_sums(z, n, c, hw, shift, NULL, NULL, s, s + c, threads)) { free(s); free(shift); return -1; }
    for (int64_t ch = 0; ch < c; ch++) {
        const double d = s[ch] / count;
        double var = s[c + ch] / count - d * d;
        if (var < 0) var = 0;
        mean_out[ch] = (float)(shift[ch] + d);
        var_out[ch] = (float)var;
        invstd_out[ch] = (float)(1.0 / sqrt(var + eps));
    }
    free(s); free(shift);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        /* each plane's horizontal pair maxima (h x w2) and whether the right one won */
        float *hm = malloc(sizeof(float) * h * w2);
        uint8_t *hr = malloc(h * w2);
        if (!hm || !hr) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t pi = 0; pi < n * c; pi++) {
            if (!hm || !hr) continue;
            const int64_t ch = pi % c;
            const float m = mean_out[ch], a = gamma[ch] * invstd_out[ch], b = beta[ch];
            const float sign = a < 0.f ? -1.f : 1.f; /* the affine map decreases: pool the minimum */
            const float *restrict p = z + pi * hw;
            float *restrict o = out + pi * q, *restrict pl = pooled + pi * q;
            uint8_t *restrict ix = idx + pi * q;
            /* the maximum of each horizontal pair: with w even the pairs of the whole plane are
               consecutive (one long loop); with w odd each row's last value is left out */
            for (int64_t r = 0; r < (w % 2 ? h : 1); r++) {
                const int64_t pairs = w % 2 ? w2 : h * w2;
                const float *restrict row = p + r * w;
                float *restrict hmr = hm + r * w2;
                uint8_t *restrict hrr = hr + r * w2;
#pragma omp simd
                for (int64_t k = 0; k < pairs; k++) {
                    const float l = sign * row[2 * k], rt = sign * row[2 * k + 1];
                    const int rw = gt(rt, l);
                    hmr[k] = pick(rw, rt, l);
                    hrr[k] = (uint8_t)rw;
                }
            }
            /* then of each window's two pairs (a last odd row is left out) */
            for (int64_t y = 0; y < h2; y++) {
                const float *restrict t0 = hm + 2 * y * w2, *restrict t1 = t0 + w2;
                const uint8_t *restrict f0 = hr + 2 * y * w2, *restrict f1 = f0 + w2;
#pragma omp simd
                for (int64_t x = 0; x < w2; x++) {
                    const int v = gt(t1[x], t0[x]);
                    const float centred = sign * pick(v, t1[x], t0[x]) - m;
                    const float y_ = a * centred + b;
                    pl[y * w2 + x] = centred;
                    o[y * w2 + x] = pick(y_ < 0.f, 0.f, y_);
                    ix[y * w2 + x] = (uint8_t)(2 * v + f0[x] + v * (f1[x] - f0[x]));
                }
            }
        }
        free(hm);
        free(hr);
    }
    return failed ? -1 : 0;
}

int bnrp_backward(const float *grad_out, const float *z, const float *out, const float *pooled, const uint8_t *idx,
                  const float *mean, const float *invstd, const float *gamma, int64_t n, int64_t c, int64_t h, int64_t w,
                  float *grad_z, float *grad_gamma, float *grad_beta, int threads) {
    const int64_t hw = h * w, h2 = h / 2, w2 = w / 2, q = h2 * w2;
    const double count = (double)(n * hw);
    double *s = malloc(2 * c * sizeof(double));
    float *cst = malloc(2 * c * sizeof(float));
    if (!s || !cst) { free(s); free(cst); return -1; }
    if (channel_sums(grad_out, n, c, q, NULL, pooled, out, s, s + c, threads)) { free(s); free(cst); return -1; }
    for (int64_t ch = 0; ch < c; ch++) {
        const double is = invstd[ch], a = gamma[ch] * is, gg = s[c + ch] * is;
        grad_beta[ch] = (float)s[ch];
        grad_gamma[ch] = (float)gg;
        cst[ch] = (float)(-a * s[ch] / count);
        cst[c + ch] = (float)(-a * is * gg / count);
    }
    free(s);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t pi = 0; pi < n * c; pi++) {
        const int64_t ch = pi % c;
        const float k0 = cst[ch], k1 = cst[c + ch], m = mean[ch], a = gamma[ch] * invstd[ch];
        const float *p = z + pi * hw;
        float *gz = grad_z + pi * hw;
        /* a last odd row or column is outside every window: only the batch-norm terms */
        if (h % 2)
            for (int64_t x = 0; x < w; x++) gz[(h - 1) * w + x] = k0 + k1 * (p[(h - 1) * w + x] - m);
        if (w % 2)
            for (int64_t y = 0; y < h - h % 2; y++) gz[y * w + w - 1] = k0 + k1 * (p[y * w + w - 1] - m);
        const float *go = grad_out + pi * q, *o = out + pi * q;
        const uint8_t *ix = idx + pi * q;
        for (int64_t y = 0; y < h2; y++) {
            float *restrict g0 = gz + 2 * y * w, *restrict g1 = g0 + w;
            const float *restrict p0 = p + 2 * y * w, *restrict p1 = p0 + w;
            const float *restrict goy = go + y * w2, *restrict oy = o + y * w2;
            const uint8_t *restrict iy = ix + y * w2;
#pragma omp simd
            for (int64_t x = 0; x < w2; x++) {
                /* the window's four gradients in one pass: the batch-norm terms everywhere, plus
                   the pooled gradient at the window's maximum (where the ReLU let it through) */
                const float val = pick(oy[x] > 0.f, a * goy[x], 0.f);
                const int k = iy[x];
                g0[2 * x] = k0 + k1 * (p0[2 * x] - m) + pick(k == 0, val, 0.f);
                g0[2 * x + 1] = k0 + k1 * (p0[2 * x + 1] - m) + pick(k == 1, val, 0.f);
                g1[2 * x] = k0 + k1 * (p1[2 * x] - m) + pick(k == 2, val, 0.f);
                g1[2 * x + 1] = k0 + k1 * (p1[2 * x + 1] - m) + pick(k == 3, val, 0.f);
            }
        }
    }
    free(cst);
    return 0;
}
