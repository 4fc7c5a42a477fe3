/* Conv-4's BatchNorm (batch statistics) -> ReLU -> 2x2 max-pool, forward and backward, on the
   CPU, for float32 NCHW tensors (bnrp_forward, bnrp_backward) and float32 or bfloat16 channels-last
   ones (the _nhwc functions at the end): the native kernels of fastadapt.models.fused (built and
   loaded by fastadapt.models.native, which checks shapes, dtypes and contiguity before calling).

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


/* s1, s2 (c each) = the sums, in order, of the `threads` rows of partial sums in parts (2c each:
   the first sums, then the second) */
static void add_parts(const double *parts, int threads, int64_t c, double *s1, double *s2) {
    memset(s1, 0, sizeof(double) * c);
    memset(s2, 0, sizeof(double) * c);
    for (int t = 0; t < threads; t++)
        for (int64_t ch = 0; ch < c; ch++) {
            s1[ch] += parts[(size_t)t * 2 * c + ch];
            s2[ch] += parts[(size_t)t * 2 * c + c + ch];
        }
}

/* Float sums of BLOCK consecutive values at a time (vectorised), added up in double: the error
   does not grow with the size of a plane. */
#define BLOCK 1024

/* Per channel: the sums of (v - shift) and of its square over all planes (forward), or of g and
   g * weight with g = v where mask > 0 (backward, when weight is given). The planes are split
   into `threads` fixed runs, each summed into its own row of partial sums, and the rows are added
   in order afterwards: the result depends on `threads` only, not on timing or on how many
   threads OpenMP actually runs. Returns 0, or -1 when out of memory. */
static int channel_sums(const float *v, int64_t n, int64_t c, int64_t plane, const float *shift, const float *weight,
                        const float *mask, double *s1, double *s2, int threads) {
    if (threads < 1) threads = 1;
    double *parts = calloc((size_t)threads * 2 * c, sizeof(double));
    if (!parts) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++) {
        double *a1 = parts + (size_t)t * 2 * c;
        for (int64_t pi = n * c * t / threads; pi < n * c * (t + 1) / threads; pi++) {
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
    add_parts(parts, threads, c, s1, s2);
    free(parts);
    return 0;
}

/* The batch mean, biased variance and 1 / sqrt(variance + eps) per channel from the sums s (c of
   value - shift, then c of its square) over count values */
static void statistics(const double *s, const float *shift, double count, float eps, int64_t c, float *mean,
                       float *var, float *invstd) {
    for (int64_t ch = 0; ch < c; ch++) {
        const double d = s[ch] / count;
        double v = s[c + ch] / count - d * d;
        if (v < 0) v = 0;
        mean[ch] = (float)(shift[ch] + d);
        var[ch] = (float)v;
        invstd[ch] = (float)(1.0 / sqrt(v + eps));
    }
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
    statistics(s, shift, count, eps, c, mean_out, var_out, invstd_out);
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

/* ---- channels-last (NHWC) tensors, float32 or bfloat16 ----------------------------------------

   The same block for tensors stored pixel by pixel with the channels innermost (PyTorch's
   channels_last), whose elements are float32 or, under bf16 autocast, bfloat16 (z, out, grad_out
   and grad_z in that type; the statistics, pooled values and all arithmetic in float32). The
   semantics are those above. Every inner loop runs over the channels of a pixel, contiguous in
   memory. The work inside each parallel loop is an always-inlined function of a constant BF16
   (0 or 1), called once with each inside the loop (OpenMP outlines a parallel region before
   inlining, so the constant must reach the code there): each kind of tensor gets its own vector
   loops, loading and storing its elements in their type. */

#if defined(__GNUC__) || defined(__clang__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

static inline float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
/* round to nearest even, NaN to a quiet NaN (as PyTorch's scalar conversion; its vectorised one
   may keep a NaN's sign and payload: a NaN either way) */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t rounded = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : rounded;
}

/* An array that holds float32 (BF16 == 0) or bfloat16 (BF16 == 1): TYPED declares a typed view of
   each kind (NAME_f, NAME_b), LD reads element i as float32, ST writes v to it. */
#define TYPED(CONST, NAME, PTR) CONST float *restrict NAME##_f = BF16 ? NULL : (CONST float *)(PTR); \
    CONST uint16_t *restrict NAME##_b = BF16 ? (CONST uint16_t *)(PTR) : NULL
#define LD(NAME, i) (BF16 ? bf16_to_float(NAME##_b[i]) : NAME##_f[i])
#define ST(NAME, i, v) do { if (BF16) NAME##_b[i] = float_to_bf16(v); else NAME##_f[i] = (v); } while (0)

/* Pixels p0 to p1 (of c channels each) into the float sums a1, a2 per channel: of (v - shift) and
   its square (weight NULL), or of g and g * weight with g = v where mask > 0. */
INLINE void sum_pixels(const void *restrict v, const void *restrict mask, const float *restrict shift,
                       const float *restrict weight, int64_t p0, int64_t p1, int64_t c, float *restrict a1,
                       float *restrict a2, const int BF16) {
    TYPED(const, vv, v);
    TYPED(const, mk, mask);
    for (int64_t px = p0; px < p1; px++) {
        const int64_t o = px * c;
        if (weight) {
#pragma omp simd
            for (int64_t ch = 0; ch < c; ch++) {
                const float g = LD(mk, o + ch) > 0.f ? LD(vv, o + ch) : 0.f;
                a1[ch] += g;
                a2[ch] += g * weight[o + ch];
            }
        } else {
#pragma omp simd
            for (int64_t ch = 0; ch < c; ch++) {
                const float d = LD(vv, o + ch) - shift[ch];
                a1[ch] += d;
                a2[ch] += d * d;
            }
        }
    }
}

/* Per channel, over `rows` runs of `len` pixels: the sums of sum_pixels (forward: v = z; backward:
   v = grad_out, mask = out, weight = pooled). Float sums of at most BLOCK pixels, added up in
   double; the rows split into `threads` fixed runs as in channel_sums. 0, or -1 when out of
   memory. */
static int nhwc_sums(const void *v, const void *mask, int bf16, int64_t rows, int64_t len, int64_t c,
                     const float *shift, const float *weight, double *s1, double *s2, int threads) {
    if (threads < 1) threads = 1;
    double *parts = calloc((size_t)threads * 2 * c, sizeof(double));
    if (!parts) return -1;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++) {
        double *d1 = parts + (size_t)t * 2 * c, *d2 = d1 + c;
        float *acc = malloc(sizeof(float) * 2 * c);
        if (!acc) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        for (int64_t r = rows * t / threads; r < rows * (t + 1) / threads; r++)
            for (int64_t p0 = r * len; p0 < (r + 1) * len; p0 += BLOCK) {
                const int64_t p1 = p0 + BLOCK < (r + 1) * len ? p0 + BLOCK : (r + 1) * len;
                memset(acc, 0, sizeof(float) * 2 * c);
                if (bf16)
                    sum_pixels(v, mask, shift, weight, p0, p1, c, acc, acc + c, 1);
                else
                    sum_pixels(v, mask, shift, weight, p0, p1, c, acc, acc + c, 0);
                for (int64_t ch = 0; ch < c; ch++) {
                    d1[ch] += acc[ch];
                    d2[ch] += acc[c + ch];
                }
            }
        free(acc);
    }
    if (!failed) add_parts(parts, threads, c, s1, s2);
    free(parts);
    return failed ? -1 : 0;
}

/* Forward: the windows of row r of the output (input rows row0 and row0 + w*c elements on). */
INLINE void pool_row(const void *restrict z, int64_t row0, int64_t r, int64_t w, int64_t w2, int64_t c,
                     const float *restrict sign, const float *restrict mean, const float *restrict a,
                     const float *restrict b, void *restrict out, float *restrict pooled, uint8_t *restrict idx,
                     const int BF16) {
    TYPED(const, zz, z);
    TYPED(, oo, out);
    for (int64_t x = 0; x < w2; x++) {
        const int64_t q = (r * w2 + x) * c, e00 = row0 + 2 * x * c, e10 = e00 + w * c;
#pragma omp simd
        for (int64_t ch = 0; ch < c; ch++) {
            const float sg = sign[ch];
            const float l0 = sg * LD(zz, e00 + ch), r0 = sg * LD(zz, e00 + c + ch);
            const float l1 = sg * LD(zz, e10 + ch), r1 = sg * LD(zz, e10 + c + ch);
            const int f0 = gt(r0, l0), f1 = gt(r1, l1);
            const float t0 = pick(f0, r0, l0), t1 = pick(f1, r1, l1);
            const int v = gt(t1, t0);
            const float centred = sg * pick(v, t1, t0) - mean[ch];
            const float y_ = a[ch] * centred + b[ch];
            pooled[q + ch] = centred;
            ST(oo, q + ch, pick(y_ < 0.f, 0.f, y_));
            idx[q + ch] = (uint8_t)(2 * v + f0 + v * (f1 - f0));
        }
    }
}

int bnrp_forward_nhwc(const void *z, int bf16, const float *gamma, const float *beta, float eps, int64_t n, int64_t c,
                      int64_t h, int64_t w, void *out, float *pooled, uint8_t *idx, float *mean_out, float *var_out,
                      float *invstd_out, int threads) {
    const int64_t h2 = h / 2, w2 = w / 2;
    const double count = (double)(n * h * w);
    double *s = malloc(2 * c * sizeof(double));
    float *cst = malloc(4 * c * sizeof(float)); /* the shift, then per channel: sign, a, b */
    if (!s || !cst) { free(s); free(cst); return -1; }
    /* the shift: each channel's mean over the first image (its sums taken with no shift) */
    memset(cst, 0, sizeof(float) * c);
    if (nhwc_sums(z, NULL, bf16, 1, h * w, c, cst, NULL, s, s + c, 1)) { free(s); free(cst); return -1; }
    for (int64_t ch = 0; ch < c; ch++) cst[ch] = (float)(s[ch] / (double)(h * w));
    if (nhwc_sums(z, NULL, bf16, n * h, w, c, cst, NULL, s, s + c, threads)) { free(s); free(cst); return -1; }
    statistics(s, cst, count, eps, c, mean_out, var_out, invstd_out);
    float *sign = cst + c, *a = cst + 2 * c, *b = cst + 3 * c;
    for (int64_t ch = 0; ch < c; ch++) {
        a[ch] = gamma[ch] * invstd_out[ch];
        b[ch] = beta[ch];
        sign[ch] = a[ch] < 0.f ? -1.f : 1.f; /* the affine map decreases: pool the minimum */
    }
    free(s);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n * h2; r++) {
        const int64_t row0 = (r / h2 * h + 2 * (r % h2)) * w * c;
        if (bf16)
            pool_row(z, row0, r, w, w2, c, sign, mean_out, a, b, out, pooled, idx, 1);
        else
            pool_row(z, row0, r, w, w2, c, sign, mean_out, a, b, out, pooled, idx, 0);
    }
    free(cst);
    return 0;
}

/* Backward: the input gradient of the pixel at element e where it is no window's maximum */
INLINE void bn_terms(void *restrict grad_z, const void *restrict z, int64_t e, int64_t c, const float *restrict k0,
                     const float *restrict k1, const float *restrict m, const int BF16) {
    TYPED(const, zz, z);
    TYPED(, gz, grad_z);
#pragma omp simd
    for (int64_t ch = 0; ch < c; ch++) ST(gz, e + ch, k0[ch] + k1[ch] * (LD(zz, e + ch) - m[ch]));
}

/* Backward: the input gradient of the two rows of output row r's windows (from element row0), and
   of a last odd row of the image after them (last_row) */
INLINE void grad_row(const void *restrict grad_out, const void *restrict z, const void *restrict out,
                     const uint8_t *restrict idx, int64_t row0, int64_t r, int64_t w, int64_t w2, int64_t c,
                     int last_row, const float *restrict k0, const float *restrict k1, const float *restrict a,
                     const float *restrict m, void *restrict grad_z, const int BF16) {
    TYPED(const, zz, z);
    TYPED(const, go, grad_out);
    TYPED(const, oo, out);
    TYPED(, gz, grad_z);
    const int64_t row1 = row0 + w * c;
    for (int64_t x = 0; x < w2; x++) {
        const int64_t q = (r * w2 + x) * c, e00 = row0 + 2 * x * c, e10 = row1 + 2 * x * c;
        /* the window's four gradients: the batch-norm terms, plus the pooled gradient at the
           window's maximum (where the ReLU let it through) */
#pragma omp simd
        for (int64_t ch = 0; ch < c; ch++) {
            const float val = pick(LD(oo, q + ch) > 0.f, a[ch] * LD(go, q + ch), 0.f);
            const int k = idx[q + ch];
            const float kk0 = k0[ch], kk1 = k1[ch], mm = m[ch];
            ST(gz, e00 + ch, kk0 + kk1 * (LD(zz, e00 + ch) - mm) + pick(k == 0, val, 0.f));
            ST(gz, e00 + c + ch, kk0 + kk1 * (LD(zz, e00 + c + ch) - mm) + pick(k == 1, val, 0.f));
            ST(gz, e10 + ch, kk0 + kk1 * (LD(zz, e10 + ch) - mm) + pick(k == 2, val, 0.f));
            ST(gz, e10 + c + ch, kk0 + kk1 * (LD(zz, e10 + c + ch) - mm) + pick(k == 3, val, 0.f));
        }
    }
    /* pixels outside every window (a last odd column; a last odd row): the batch-norm terms only */
    if (w % 2) {
        bn_terms(grad_z, z, row0 + (w - 1) * c, c, k0, k1, m, BF16);
        bn_terms(grad_z, z, row1 + (w - 1) * c, c, k0, k1, m, BF16);
    }
    if (last_row)
        for (int64_t x = 0; x < w; x++) bn_terms(grad_z, z, row1 + (w + x) * c, c, k0, k1, m, BF16);
}

int bnrp_backward_nhwc(const void *grad_out, const void *z, const void *out, int bf16, const float *pooled,
                       const uint8_t *idx, const float *mean, const float *invstd, const float *gamma, int64_t n,
                       int64_t c, int64_t h, int64_t w, void *grad_z, float *grad_gamma, float *grad_beta,
                       int threads) {
    const int64_t h2 = h / 2, w2 = w / 2;
    const double count = (double)(n * h * w);
    double *s = malloc(2 * c * sizeof(double));
    float *cst = malloc(4 * c * sizeof(float)); /* per channel: k0, k1, a, mean */
    if (!s || !cst) { free(s); free(cst); return -1; }
    if (nhwc_sums(grad_out, out, bf16, n * h2, w2, c, NULL, pooled, s, s + c, threads)) { free(s); free(cst); return -1; }
    float *k0 = cst, *k1 = cst + c, *a = cst + 2 * c, *m = cst + 3 * c;
    for (int64_t ch = 0; ch < c; ch++) {
        const double is = invstd[ch], aa = gamma[ch] * is, gg = s[c + ch] * is;
        grad_beta[ch] = (float)s[ch];
        grad_gamma[ch] = (float)gg;
        k0[ch] = (float)(-aa * s[ch] / count);
        k1[ch] = (float)(-aa * is * gg / count);
        a[ch] = (float)aa;
        m[ch] = mean[ch];
    }
    free(s);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n * h2; r++) {
        const int64_t row0 = (r / h2 * h + 2 * (r % h2)) * w * c;
        const int last_row = r % h2 == h2 - 1 && h % 2;
        if (bf16)
            grad_row(grad_out, z, out, idx, row0, r, w, w2, c, last_row, k0, k1, a, m, grad_z, 1);
        else
            grad_row(grad_out, z, out, idx, row0, r, w, w2, c, last_row, k0, k1, a, m, grad_z, 0);
    }
    free(cst);
    return 0;
}
