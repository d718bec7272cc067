/* The block floating-point family (mxfp4 / nvfp4; lowbit/formats/blockfp.py, docs/blockfp.md), called by
   lowbit._blockfp_cpu:
   lb_blockfp_dequantize  a rectangle of W to fp32 / bf16 / fp16, bit-identical to formats.blockfp.dequantize_blockfp;
   lb_blockfp_gemv        fused decode-GEMV y = x W^T (+ bias) for a few rows of x, fp32 accumulation.
   Layout. W [N, K], K % B == 0, B = 32 (mxfp4) or 16 (nvfp4). packed uint8 [N, K/2]: byte j of row n holds element
   2j in its LOW nibble and 2j + 1 in the high one (the opposite of the 4-bit LUT family's order). scales uint8
   [N, K/B], one byte per block; table fp32 [256], the factor of every scale byte (formats.blockfp.scale_table: the
   quant type and nvfp4's global scale are in it). W[n, k] = E2M1[code] * table[scales[n, k / B]], one fp32 product.
   Shared helpers (threads, fp16/bf16 conversions, return codes): lowbit.h. */
#include "lowbit.h"

static const float E2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

INLINE int bfp_code(const uint8_t *row, i64 k) { /* element k of a row: low nibble first */
    const uint8_t b = row[k >> 1];
    return (k & 1) ? (b >> 4) : (b & 15);
}
INLINE int bfp_shift(i64 B) { return B == 16 ? 4 : 5; } /* k / B as a shift (B is 16 or 32) */

/* ============================================ dequantize ============================================
   out[r, c] = W[n0 + r, k0 + c], r < nr, c < kc (out row-major [nr, kc]) in dt (0 fp32, 1 bf16, 2 fp16): the
   fp32 product E2M1 * factor, rounded to dt once. AVX-512: 32 elements (16 bytes, one or two whole blocks) per
   step; each block's 16 values E2M1 * factor are one vector (rounded as the reference rounds every element), the
   codes index it with one two-table permute (lanes 8..15 read the second block's values: bit 4 of the index). */
typedef struct {
    const uint8_t *packed, *scales; const float *table; i64 B, K, n0, k0, kc; void *out; int dt;
} bdq_t;
static void bdq_range(const void *p, i64 r0, i64 r1) {
    const bdq_t *a = (const bdq_t *)p;
    const i64 K = a->K, G = K / a->B, end = a->k0 + a->kc;
    const int sh = bfp_shift(a->B);
#if LB_AVX512
    const __m512 tbl = _mm512_loadu_ps(E2M1);
    const __m512i m15 = _mm512_set1_epi32(15);
    const __m512i sel = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 16, 16, 16, 16, 16, 16, 16, 16);
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
#endif
    for (i64 r = r0; r < r1; r++) {
        const i64 n = a->n0 + r;
        const uint8_t *prow = a->packed + n * (K / 2), *srow = a->scales + n * G;
        char *orow = (char *)a->out + r * a->kc * (a->dt ? 2 : 4);
        i64 k = a->k0;
        while (k < end) {
#if LB_AVX512
            if ((k & 31) == 0 && k + 32 <= end) {
                for (; k + 32 <= end; k += 32) {
                    const __m512 t0 = _mm512_mul_ps(tbl, _mm512_set1_ps(a->table[srow[k >> sh]]));
                    const __m512 t1 = sh == 5 ? t0 : _mm512_mul_ps(tbl, _mm512_set1_ps(a->table[srow[(k >> sh) + 1]]));
                    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(prow + (k >> 1))));
                    const __m512 we = _mm512_permutex2var_ps(t0, _mm512_or_si512(_mm512_and_si512(v, m15), sel), t1);
                    const __m512 wo = _mm512_permutex2var_ps(t0, _mm512_or_si512(_mm512_srli_epi32(v, 4), sel), t1);
                    store16(orow, k - a->k0, _mm512_permutex2var_ps(we, lo, wo), a->dt);
                    store16(orow, k - a->k0 + 16, _mm512_permutex2var_ps(we, hi, wo), a->dt);
                }
                continue;
            }
#endif
            store1(orow, k - a->k0, E2M1[bfp_code(prow, k)] * a->table[srow[k >> sh]], a->dt);
            k++;
        }
    }
}
/* returns LB_OK; block must be 16 or 32, K a multiple of it, [n0, n0 + nr) x [k0, k0 + kc) inside W */
int lb_blockfp_dequantize(const uint8_t *packed, const uint8_t *scales, const float *table, i64 block, i64 K,
                          i64 n0, i64 nr, i64 k0, i64 kc, void *out, int dt, int nt) {
    bdq_t a = {packed, scales, table, block, K, n0, k0, kc, out, dt};
    if (nr > 0 && kc > 0) parallel(bdq_range, &a, nr, MAX(1, 16384 / kc), nt);
    return LB_OK;
}

/* ============================================== GEMV ==============================================
   y[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]) for m < M, in fp32, rounded once to dt (x's dtype, which y shares).
   Per block: the sum of x * E2M1 over the block's elements (per vector lane), then one multiply by the block's
   factor. Threads split N; K is walked in tiles of kt (a multiple of 32) so that the tile of x (4 rows at a time)
   stays in L1; the partial sums of a tiled row wait in acc (fp32 [M, N]).
   x is first copied to fp32 xd [M, Kp] (Kp = K rounded up to 32, zero-padded). AVX-512: each 32 elements of a row
   of xd are its 16 even then 16 odd elements (the low and high nibbles of 16 bytes), so a 32-element step decodes
   with one widen, one shift and two vpermps, and is never re-interleaved; with B = 16 lanes 0..7 belong to the
   step's first block and lanes 8..15 to its second (each lane multiplied by its own block's factor). A row whose K
   is an odd multiple of 16 (nvfp4) ends in a half step: 8 bytes, the rest of the lanes code 0 times x = 0. */
typedef struct {
    const float *x; i64 M, K, Kp, kt; const uint8_t *packed, *scales; const float *table; i64 B, N;
    const float *bias; float *acc; void *y; int dt;
} bmv_t;
INLINE void bmv_put(const bmv_t *a, i64 m, i64 n, float t, i64 k0, i64 k1) {
    const i64 i = m * a->N + n;
    if (k0) t += a->acc[i];
    if (k1 < a->K) { a->acc[i] = t; return; }
    if (a->bias) t += a->bias[n];
    store1(a->y, i, t, a->dt);
}
#define BMV_KT 8192 /* the largest tile of K (x rows of at most 32 KiB) */
#if LB_AVX512
/* one 32-element step (or the 16-element half step: a zero-extended 8-byte load) into acc[m]; sb: the scale
   bytes of the step's block(s), looked up here (a per-row array of factors, stored then reloaded, measured slower) */
INLINE void bmv_step(const int MM, const int B, const uint8_t *prow, const uint8_t *sb, const float *table,
                     const float *x, i64 Kp, i64 k, __m512 tbl, int half, __m512 *acc) {
    const __m128i raw = half ? _mm_loadl_epi64((const __m128i *)(prow + (k >> 1)))
                             : _mm_loadu_si128((const __m128i *)(prow + (k >> 1)));
    const __m512i v = _mm512_cvtepu8_epi32(raw);
    const __m512 we = _mm512_permutexvar_ps(v, tbl); /* vpermps reads the low 4 bits: the low nibble */
    const __m512 wo = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tbl);
    const __m512 s = (B == 32 || half) ? _mm512_set1_ps(table[sb[0]])
                                       : _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(table[sb[0]]),
                                                              _mm512_set1_ps(table[sb[1]]));
    for (int m = 0; m < MM; m++) {
        __m512 t = _mm512_mul_ps(we, _mm512_loadu_ps(x + m * Kp + k));
        t = _mm512_fmadd_ps(wo, _mm512_loadu_ps(x + m * Kp + k + 16), t);
        acc[m] = _mm512_fmadd_ps(t, s, acc[m]);
    }
}
/* MM rows of x (from m0) against weight rows [n0, n1), columns [k0, k1); B the block size as a constant */
INLINE void bmv_rows(const bmv_t *a, const int MM, const int B, i64 m0, i64 n0, i64 n1, i64 k0, i64 k1) {
    const __m512 tbl = _mm512_loadu_ps(E2M1);
    const i64 K = a->K, Kp = a->Kp, G = K / B;
    const float *x = a->x + m0 * Kp, *table = a->table;
    const int sh = B == 32 ? 5 : 4;
    for (i64 n = n0; n < n1; n++) {
        const uint8_t *prow = a->packed + n * (K / 2), *srow = a->scales + n * G;
        __m512 acc0[4], acc1[4]; /* two chains: a step's FMA need not wait for the previous step's */
        for (int m = 0; m < MM; m++) acc0[m] = acc1[m] = _mm512_setzero_ps();
        i64 k = k0;
        for (; k + 64 <= k1; k += 64) {
            bmv_step(MM, B, prow, srow + (k >> sh), table, x, Kp, k, tbl, 0, acc0);
            bmv_step(MM, B, prow, srow + ((k + 32) >> sh), table, x, Kp, k + 32, tbl, 0, acc1);
        }
        if (k + 32 <= k1) { bmv_step(MM, B, prow, srow + (k >> sh), table, x, Kp, k, tbl, 0, acc0); k += 32; }
        if (k < k1) bmv_step(MM, B, prow, srow + (k >> sh), table, x, Kp, k, tbl, 1, acc1); /* K % 32 == 16 */
        for (int m = 0; m < MM; m++)
            bmv_put(a, m0 + m, n, _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m])), k0, k1);
    }
}
#else
static void bmv_rows_generic(const bmv_t *a, int mm, i64 m0, i64 n0, i64 n1, i64 k0, i64 k1) {
    const i64 K = a->K, Kp = a->Kp, B = a->B, G = K / B;
    const float *x = a->x + m0 * Kp;
    float w[32];
    for (i64 n = n0; n < n1; n++) {
        const uint8_t *prow = a->packed + n * (K / 2), *srow = a->scales + n * G;
        float racc[4][16] = {{0}};
        for (i64 b = k0 / B; b < k1 / B; b++) {
            const uint8_t *pb = prow + b * (B / 2);
            for (int i = 0; i < B / 2; i++) { w[2 * i] = E2M1[pb[i] & 15]; w[2 * i + 1] = E2M1[pb[i] >> 4]; }
            const float s = a->table[srow[b]];
            for (int m = 0; m < mm; m++) {
                float acc[16] = {0};
                const float *xb = x + m * Kp + b * B;
                for (int j = 0; j < B; j++) acc[j & 15] += w[j] * xb[j];
                for (int l = 0; l < 16; l++) racc[m][l] += acc[l] * s;
            }
        }
        for (int m = 0; m < mm; m++) {
            float t = 0.0f;
            for (int l = 0; l < 16; l++) t += racc[m][l];
            bmv_put(a, m0 + m, n, t, k0, k1);
        }
    }
}
#endif
static void bmv_range(const void *p, i64 n0, i64 n1) {
    const bmv_t *a = (const bmv_t *)p;
    for (i64 k0 = 0; k0 < a->K; k0 += a->kt) {
        const i64 k1 = MIN(a->K, k0 + a->kt);
        for (i64 m0 = 0; m0 < a->M; m0 += 4) {
            const int mm = (int)MIN(4, a->M - m0);
#if LB_AVX512
#define BMV_CASES(B)                                            \
            switch (mm) {                                       \
            case 1: bmv_rows(a, 1, B, m0, n0, n1, k0, k1); break; \
            case 2: bmv_rows(a, 2, B, m0, n0, n1, k0, k1); break; \
            case 3: bmv_rows(a, 3, B, m0, n0, n1, k0, k1); break; \
            default: bmv_rows(a, 4, B, m0, n0, n1, k0, k1); }
            if (a->B == 32) { BMV_CASES(32) } else { BMV_CASES(16) }
#undef BMV_CASES
#else
            bmv_rows_generic(a, mm, m0, n0, n1, k0, k1);
#endif
        }
    }
}
/* x [M, K] contiguous in dt (0 fp32, 1 bf16, 2 fp16); y [M, N] contiguous in dt; bias fp32 [N] or NULL. block 16
   or 32, K a multiple of it. Returns LB_OK, or LB_ENOMEM (xd, acc). */
int lb_blockfp_gemv(const void *x, int dt, i64 M, i64 K, const uint8_t *packed, const uint8_t *scales,
                    const float *table, i64 block, i64 N, const float *bias, void *y, int nt) {
    const i64 Kp = (K + 31) / 32 * 32, kt = MAX(32, (BMV_KT / MIN(MAX(M, 1), 4)) / 32 * 32);
    i64 xn, yn;
    if (__builtin_mul_overflow(M, Kp, &xn) || __builtin_mul_overflow(M, N, &yn)) return LB_ENOMEM;
    float *xd = (float *)lb_alloc(xn, sizeof(float)), *acc = NULL;
    if (!xd) return LB_ENOMEM;
    if (K > kt && !(acc = (float *)lb_alloc(yn, sizeof(float)))) { free(xd); return LB_ENOMEM; }
    for (i64 m = 0; m < M; m++) {
        float *d = xd + m * Kp;
        for (i64 c = 0; c < Kp; c += 32) {
            const i64 left = K - c; /* elements of this step inside the row: 32, or 16 at an nvfp4 row's end */
            for (int l = 0; l < 32; l++) {
#if LB_AVX512
                const i64 e = l < 16 ? 2 * l : 2 * (l - 16) + 1; /* lane l: the even elements, then the odd */
#else
                const i64 e = l;
#endif
                d[c + l] = e < left ? load_any(x, dt, m * K + c + e) : 0.0f;
            }
        }
    }
    bmv_t a = {xd, M, K, Kp, kt, packed, scales, table, block, N, bias, acc, y, dt};
    if (M > 0 && N > 0 && K > 0) parallel(bmv_range, &a, N, 8, nt);
    free(xd);
    free(acc);
    return LB_OK;
}
