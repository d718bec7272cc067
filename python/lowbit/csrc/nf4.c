/* The 4-bit LUT family (nf4 / fp4 / optimal; lowbit/formats/nf4.py, docs/formats.md), called by lowbit._cpu:
   lb_dq4   dequantize a rectangle of the weight (bit-identical to the reference);
   lb_q4    quantize (formats.nf4.quantize_flat, bit for bit);
   lb_mv4   fused decode-GEMV y = x W^T, fp32 accumulation;
   lb_mv4t  its transpose, gx = g W (the input gradient).
   Shared helpers (threads, fp16/bf16 conversions, return codes): lowbit.h. */
#include "lowbit.h"

#if LB_AVX512
static const uint16_t ZIP16[64] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39, 8, 40, 9, 41, 10, 42,
    11, 43, 12, 44, 13, 45, 14, 46, 15, 47, 16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55, 24, 56,
    25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
#endif

/* =============================== 4-bit LUT family (nf4 / fp4 / optimal) ===============================
   Element i: nibble of codes[i / 2] (high first), value table[nibble] * scale[i / bs]. A double-quantized
   scale is ncode[qabs[b]] * nabs[b / nbs] + offset, rounded after each step (bitsandbytes' order). */
typedef struct {
    const float *absmax; const uint8_t *qabs; const float *ncode, *nabs; float offset; i64 nbs; int shift;
} scales_t;
static scales_t mk_scales(const float *absmax, const uint8_t *qabs, const float *ncode, const float *nabs,
                          float offset, i64 nbs) {
    int shift = -1; /* b / nbs as a shift when nbs is a power of two: a division per block costs ~30 cycles */
    for (int i = 0; i < 62; i++) if (((i64)1 << i) == nbs) shift = i;
    return (scales_t){absmax, qabs, ncode, nabs, offset, nbs, shift};
}
INLINE float scale_at(const scales_t *s, i64 b) {
    if (s->absmax) return s->absmax[b];
    float v = s->ncode[s->qabs[b]] * s->nabs[s->shift >= 0 ? b >> s->shift : b / s->nbs];
    return v + s->offset;
}
/* out[j] = scale of block first + j, j < count */
static __attribute__((unused)) void scales_run(const scales_t *s, i64 first, i64 count, float *out) {
    i64 j = 0;
#if LB_AVX512
    if (!s->absmax && s->shift >= 0 && first + count < ((i64)1 << 31)) {
        const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 off = _mm512_set1_ps(s->offset);
        for (; j + 16 <= count; j += 16) {
            __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(s->qabs + first + j)));
            __m512i ni = _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)(first + j)), lane), s->shift);
            __m512 v = _mm512_mul_ps(_mm512_i32gather_ps(q, s->ncode, 4), _mm512_i32gather_ps(ni, s->nabs, 4));
            _mm512_storeu_ps(out + j, _mm512_add_ps(v, off));
        }
    }
#endif
    for (; j < count; j++) out[j] = scale_at(s, first + j);
}
INLINE float nib(const uint8_t *codes, const float *table, i64 i) {
    uint8_t b = codes[i >> 1];
    return table[(i & 1) ? (b & 15) : (b >> 4)];
}
#if LB_AVX512
/* 16 bytes -> the 16 high-nibble values (even elements) and 16 low-nibble values (odd elements) */
INLINE void dec32(const uint8_t *p, __m512 tbl, __m512 *wh, __m512 *wl) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *wh = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tbl); /* permutexvar reads the low 4 bits */
    *wl = _mm512_permutexvar_ps(v, tbl);
}
#endif

/* rectangle: out[r, c] = w[n0 + r, k0 + c] (flat element (n0 + r) * K + k0 + c), r < nr, c < kc */
typedef struct {
    const uint8_t *codes; scales_t sc; const float *table; i64 bs, K, n0, k0, nr, kc; void *out; int dt, bsh;
} dq4_t;
#define DQ_CHUNK 8192
static void dq4_range(const void *p, i64 u0, i64 u1) {
    const dq4_t *a = (const dq4_t *)p;
    const i64 per_row = (a->kc + DQ_CHUNK - 1) / DQ_CHUNK;
    for (i64 u = u0; u < u1; u++) {
        i64 r = u / per_row, c0 = (u % per_row) * DQ_CHUNK, c1 = MIN(a->kc, c0 + DQ_CHUNK);
        i64 base = (a->n0 + r) * a->K + a->k0, i = base + c0, end = base + c1;
        char *out = (char *)a->out + (r * a->kc - base) * (a->dt ? 2 : 4); /* out + (flat index - base) */
        while (i < end) {
            i64 b = i >> a->bsh, seg = MIN(end, (b + 1) * a->bs);
            float s = scale_at(&a->sc, b);
            if (i & 1) { store1(out, i, nib(a->codes, a->table, i) * s, a->dt); i++; }
#if LB_AVX512
            /* the block's 16 values table * s, each rounded as the reference rounds it; then lookups */
            const __m512 ts = _mm512_mul_ps(_mm512_loadu_ps(a->table), _mm512_set1_ps(s));
            if (a->dt) { /* 64 elements per step: 16-bit lookups (vpermw reads 5 index bits: table twice) */
                const __m512i t = _mm512_broadcast_i64x4(half16(ts, a->dt));
                const __m512i z0 = _mm512_loadu_si512(ZIP16), z1 = _mm512_loadu_si512(ZIP16 + 32);
                for (; i + 64 <= seg; i += 64) {
                    __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(a->codes + (i >> 1))));
                    __m512i eh = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), t);
                    __m512i el = _mm512_permutexvar_epi16(v, t);
                    _mm512_storeu_si512((uint16_t *)out + i, _mm512_permutex2var_epi16(eh, z0, el));
                    _mm512_storeu_si512((uint16_t *)out + i + 32, _mm512_permutex2var_epi16(eh, z1, el));
                }
            }
            const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            for (; i + 32 <= seg; i += 32) {
                __m512 wh, wl;
                dec32(a->codes + (i >> 1), ts, &wh, &wl);
                store16(out, i, _mm512_permutex2var_ps(wh, lo, wl), a->dt);
                store16(out, i + 16, _mm512_permutex2var_ps(wh, hi, wl), a->dt);
            }
#endif
            for (; i < seg; i++) store1(out, i, nib(a->codes, a->table, i) * s, a->dt);
        }
    }
}
int lb_dq4(const uint8_t *codes, const float *absmax, const uint8_t *qabs, const float *ncode, const float *nabs,
           float offset, i64 nbs, const float *table, i64 bs, i64 K, i64 n0, i64 nr, i64 k0, i64 kc, void *out,
           int dt, int nt) {
    int bsh = 0; /* blocksize is a power of two */
    while (((i64)1 << bsh) < bs) bsh++;
    dq4_t a = {codes, mk_scales(absmax, qabs, ncode, nabs, offset, nbs), table, bs, K, n0, k0, nr, kc, out, dt, bsh};
    parallel(dq4_range, &a, nr * ((kc + DQ_CHUNK - 1) / DQ_CHUNK), 1, nt);
    return LB_OK;
}

/* quantize (formats.nf4.quantize_flat, bit for bit): per block absmax = max |x| (stored as d in a short last
   block), d = max(absmax, 1e-38),
   s = x * (1 / d) (x / d in a short last block), clamped to [-1, 1]; code order[#(bounds < s)]; element 2i
   in the high nibble of byte i; an odd tail is padded with the code of 0. x: fp32, bf16 or fp16 (dt). */
typedef struct {
    const void *x; int dt, nbounds; i64 n, bs; const float *bounds; const uint8_t *order; uint8_t *packed;
    float *absmax;
} q4_t;
static void q4_range(const void *p, i64 b0, i64 b1) {
    const q4_t *a = (const q4_t *)p;
    float v[64];
    uint8_t c[64];
    for (i64 b = b0; b < b1; b++) {
        const i64 i0 = b * a->bs, i1 = MIN(a->n, i0 + a->bs);
        float amax = 0.0f;
        for (i64 i = i0; i < i1; i++) { float t = fabsf(load_any(a->x, a->dt, i)); amax = t > amax ? t : amax; }
        const float d = amax < 1e-38f ? 1e-38f : amax, r = 1.0f / d;
        const int whole = i1 - i0 == a->bs;
        a->absmax[b] = whole ? amax : d; /* bnb stores a short last block's divisor, max(absmax, 1e-38) */
        for (i64 j0 = i0; j0 < i1; j0 += 64) { /* 64 elements (32 bytes) at a time; bs is even */
            const int len = (int)MIN(64, i1 - j0);
            for (int l = 0; l < len; l++) {
                float x = load_any(a->x, a->dt, j0 + l), t = whole ? x * r : x / d;
                v[l] = t < -1.0f ? -1.0f : (t > 1.0f ? 1.0f : t);
            }
            for (int l = len; l < 64; l++) v[l] = 0.0f; /* the pad element of an odd tail quantizes 0 */
            for (int l = 0; l < 64; l++) c[l] = 0;
            for (int j = 0; j < a->nbounds; j++) {
                const float bd = a->bounds[j];
                for (int l = 0; l < 64; l++) c[l] += bd < v[l];
            }
            for (int l = 0; l < (len + 1) / 2; l++)
                a->packed[(j0 >> 1) + l] = (uint8_t)((a->order[c[2 * l]] << 4) | a->order[c[2 * l + 1]]);
        }
    }
}
int lb_q4(const void *x, int dt, i64 n, i64 bs, const float *bounds, int nbounds, const uint8_t *order,
          uint8_t *packed, float *absmax, int nt) {
    q4_t a = {x, dt, nbounds, n, bs, bounds, order, packed, absmax};
    parallel(q4_range, &a, (n + bs - 1) / bs, MAX(1, 65536 / bs), nt);
    return LB_OK;
}

/* fused y[m, n] = sum_k x[m, k] w[n, k], fp32, rows of whole blocks (K % bs == 0, bs % 32 == 0).
   K is walked in tiles of kt (a multiple of bs) so that the tile of x stays in L1; partial sums go to y.
   AVX-512: x arrives split per 32 elements into its 16 even then 16 odd elements (the high and low
   nibbles of 16 bytes), so a row decodes with two permutes and is never re-interleaved. */
typedef struct {
    const float *x; i64 M, K, kt; const uint8_t *codes; scales_t sc; const float *table; i64 bs, N; float *y;
} mv4_t;
#if LB_AVX512
/* MM rows of x against weight rows [n0, n1), columns [k0, k1) (at most 256 blocks). The row's block
   scales are decoded first, in a loop of their own (dependent loads stay out of the FMA loop). */
INLINE void mv4_rows(const mv4_t *a, const int MM, const int BS, const float *x, float *y, i64 n0, i64 n1,
                     i64 k0, i64 k1) { /* BS: the block size as a constant to unroll for (64), or 0 */
    const __m512 tbl = _mm512_loadu_ps(a->table);
    const i64 K = a->K, bs = BS ? BS : a->bs, nb = K / bs, b0 = k0 / bs, b1 = k1 / bs;
    float sc[256];
    for (i64 n = n0; n < n1; n++) {
        scales_run(&a->sc, n * nb + b0, b1 - b0, sc);
        __m512 racc[4];
        for (int m = 0; m < MM; m++) racc[m] = _mm512_setzero_ps();
        for (i64 b = b0; b < b1; b++) {
            __m512 ah[4], al[4];
            for (int m = 0; m < MM; m++) ah[m] = al[m] = _mm512_setzero_ps();
            const uint8_t *p = a->codes + n * (K / 2) + b * (bs / 2);
            for (i64 s = 0; s < bs / 32; s++) {
                __m512 wh, wl;
                dec32(p + 16 * s, tbl, &wh, &wl);
                const float *xs = x + b * bs + 32 * s;
                for (int m = 0; m < MM; m++) {
                    ah[m] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xs + m * K), ah[m]);
                    al[m] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xs + m * K + 16), al[m]);
                }
            }
            __m512 vs = _mm512_set1_ps(sc[b - b0]);
            for (int m = 0; m < MM; m++) racc[m] = _mm512_fmadd_ps(_mm512_add_ps(ah[m], al[m]), vs, racc[m]);
        }
        for (int m = 0; m < MM; m++) {
            float t = _mm512_reduce_add_ps(racc[m]);
            y[m * a->N + n] = k0 ? y[m * a->N + n] + t : t;
        }
    }
}
#endif
static void mv4_range(const void *p, i64 n0, i64 n1) {
    const mv4_t *a = (const mv4_t *)p;
    const i64 K = a->K, bs = a->bs, nb = K / bs;
    (void)bs; (void)nb;
    for (i64 k0 = 0; k0 < K; k0 += a->kt) {
        i64 k1 = MIN(K, k0 + a->kt);
        for (i64 m0 = 0; m0 < a->M; m0 += 4) {
            const float *x = a->x + m0 * K;
            float *y = a->y + m0 * a->N;
            int mm = (int)MIN(4, a->M - m0);
#if LB_AVX512
            if (bs == 64) {
                if (mm == 1) mv4_rows(a, 1, 64, x, y, n0, n1, k0, k1);
                else if (mm == 2) mv4_rows(a, 2, 64, x, y, n0, n1, k0, k1);
                else if (mm == 3) mv4_rows(a, 3, 64, x, y, n0, n1, k0, k1);
                else mv4_rows(a, 4, 64, x, y, n0, n1, k0, k1);
            } else {
                if (mm == 1) mv4_rows(a, 1, 0, x, y, n0, n1, k0, k1);
                else if (mm == 2) mv4_rows(a, 2, 0, x, y, n0, n1, k0, k1);
                else if (mm == 3) mv4_rows(a, 3, 0, x, y, n0, n1, k0, k1);
                else mv4_rows(a, 4, 0, x, y, n0, n1, k0, k1);
            }
#else
            float w[64];
            for (i64 n = n0; n < n1; n++) {
                float racc[4][16] = {{0}};
                for (i64 b = k0 / bs; b < k1 / bs; b++) {
                    float acc[4][16] = {{0}};
                    const int ch = bs < 64 ? 32 : 64;
                    for (i64 j = b * bs; j < (b + 1) * bs; j += ch) {
                        const uint8_t *pb = a->codes + n * (K / 2) + j / 2;
                        for (int i = 0; i < ch / 2; i++) {
                            w[2 * i] = a->table[pb[i] >> 4];
                            w[2 * i + 1] = a->table[pb[i] & 15];
                        }
                        for (int m = 0; m < mm; m++)
                            for (int t = 0; t < ch; t += 16)
                                for (int l = 0; l < 16; l++) acc[m][l] += w[t + l] * x[m * K + j + t + l];
                    }
                    float s = scale_at(&a->sc, n * nb + b);
                    for (int m = 0; m < mm; m++)
                        for (int l = 0; l < 16; l++) racc[m][l] += acc[m][l] * s;
                }
                for (int m = 0; m < mm; m++) {
                    float t = 0.0f;
                    for (int l = 0; l < 16; l++) t += racc[m][l];
                    y[m * a->N + n] = k0 ? y[m * a->N + n] + t : t;
                }
            }
#endif
        }
    }
}
int lb_mv4(const float *x, i64 M, i64 K, const uint8_t *codes, const float *absmax, const uint8_t *qabs,
           const float *ncode, const float *nabs, float offset, i64 nbs, const float *table, i64 bs, i64 N,
           float *y, int nt) {
    i64 kt = MIN(256 * bs, MAX(bs, (8192 / MIN(M, 4)) / bs * bs)); /* x tile <= 32 KiB, <= 256 blocks */
    mv4_t a = {x, M, K, kt, codes, mk_scales(absmax, qabs, ncode, nabs, offset, nbs), table, bs, N, y};
#if LB_AVX512
    float *xd = (float *)lb_alloc(M * K, sizeof(float));
    if (!xd) return LB_ENOMEM;
    for (i64 i = 0; i < M * K; i += 32)
        for (int l = 0; l < 16; l++) { xd[i + l] = x[i + 2 * l]; xd[i + 16 + l] = x[i + 2 * l + 1]; }
    a.x = xd;
#endif
    parallel(mv4_range, &a, N, 8, nt);
#if LB_AVX512
    free(xd);
#endif
    return LB_OK;
}

/* fused gx[m, k] = sum_n g[m, n] w[n, k] (the input gradient), fp32, rows of whole blocks. Threads own
   column ranges; each walks all rows for a tile of columns held in L1, summing 64 rows at a time before
   adding to the tile's total (two-level summation). w = table * scale is rounded as the reference rounds it. */
typedef struct {
    const float *g; i64 M, N, kt; const uint8_t *codes; scales_t sc; const float *table; i64 bs, K; float *gx;
    int *status;
} mv4t_t;
static void mv4t_range(const void *p, i64 c0, i64 c1) {
    const mv4t_t *a = (const mv4t_t *)p;
    const i64 K = a->K, bs = a->bs, nb = K / bs, M = a->M, kt = a->kt;
    float *tot = (float *)lb_alloc(M * kt * 2, sizeof(float));
    if (!tot) { lb_fail(a->status, LB_ENOMEM); return; }
    float *part = tot + M * kt;
    for (i64 k0 = c0; k0 < c1; k0 += kt) {
        const i64 kw = MIN(kt, c1 - k0);
        memset(tot, 0, sizeof(float) * M * kt * 2);
        for (i64 n = 0; n < a->N; n++) {
            for (i64 b = k0 / bs; b < (k0 + kw) / bs; b++) {
                const float s = scale_at(&a->sc, n * nb + b);
                const uint8_t *pb = a->codes + n * (K / 2) + b * (bs / 2);
                const i64 off = b * bs - k0;
#if LB_AVX512
                const __m512 tbl = _mm512_loadu_ps(a->table), vs = _mm512_set1_ps(s);
                for (i64 j = 0; j < bs; j += 32) {
                    __m512 wh, wl;
                    dec32(pb + j / 2, tbl, &wh, &wl);
                    wh = _mm512_mul_ps(wh, vs);
                    wl = _mm512_mul_ps(wl, vs);
                    for (i64 m = 0; m < M; m++) {
                        __m512 gm = _mm512_set1_ps(a->g[m * a->N + n]);
                        float *q = part + m * kt + off + j; /* [16 even | 16 odd] per 32 columns */
                        _mm512_storeu_ps(q, _mm512_fmadd_ps(wh, gm, _mm512_loadu_ps(q)));
                        _mm512_storeu_ps(q + 16, _mm512_fmadd_ps(wl, gm, _mm512_loadu_ps(q + 16)));
                    }
                }
#else
                float w[64];
                const int ch = bs < 64 ? 32 : 64;
                for (i64 j = 0; j < bs; j += ch) {
                    for (int i = 0; i < ch / 2; i++) {
                        w[2 * i] = a->table[pb[j / 2 + i] >> 4] * s;
                        w[2 * i + 1] = a->table[pb[j / 2 + i] & 15] * s;
                    }
                    for (i64 m = 0; m < M; m++) {
                        float gm = a->g[m * a->N + n], *q = part + m * kt + off + j;
                        for (int l = 0; l < ch; l++) q[l] += w[l] * gm;
                    }
                }
#endif
            }
            if ((n & 63) == 63 || n == a->N - 1) {
                for (i64 i = 0; i < M * kt; i++) { tot[i] += part[i]; part[i] = 0.0f; }
            }
        }
        for (i64 m = 0; m < M; m++) {
            float *dst = a->gx + m * K + k0;
            const float *src = tot + m * kt;
#if LB_AVX512
            for (i64 j = 0; j < kw; j += 32)
                for (int l = 0; l < 16; l++) { dst[j + 2 * l] = src[j + l]; dst[j + 2 * l + 1] = src[j + 16 + l]; }
#else
            memcpy(dst, src, sizeof(float) * kw);
#endif
        }
    }
    free(tot);
}
int lb_mv4t(const float *g, i64 M, i64 N, const uint8_t *codes, const float *absmax, const uint8_t *qabs,
            const float *ncode, const float *nabs, float offset, i64 nbs, const float *table, i64 bs, i64 K,
            float *gx, int nt) {
    i64 kt = MAX(bs, (2048 / M) / bs * bs);
    int status = LB_OK;
    mv4t_t a = {g, M, N, kt, codes, mk_scales(absmax, qabs, ncode, nabs, offset, nbs), table, bs, K, gx, &status};
    parallel(mv4t_range, &a, K, kt, nt);
    return status;
}
