/* The integer family (int2 / int3 / int4 rows; lowbit/formats/intq.py, docs/int.md), called by lowbit._cpu:
   lb_dqi   dequantize a rectangle of the weight (bit-identical to the reference);
   lb_mvi   fused decode-GEMV y = x W^T, fp32 accumulation;
   lb_mvit  its transpose, gx = g W (the input gradient);
   lb_rdi   the grad_scale reduction: sum (Q - z) * d per group.
   Shared helpers (threads, fp16/bf16 conversions, return codes): lowbit.h. */
#include "lowbit.h"

/* =============================== integer family (int2 / int3 / int4) ===============================
   Element (n, k): code Q, value s[n, g] * (Q - z[n, g]), g = k / L; G = ceil(K / L) groups per row, the last one
   ragged (K - (G - 1) L columns, a multiple of 32) when L does not divide K: no loop may assume L | K. Codes (format
   version 3, formats/intq.py): row n is a stream of K * bits / 32 words from word n * K * bits / 32, 32 codes (a
   chunk) in `bits` words. int4: word t holds code 8t + i in bits 4i..4i+3; int2: code 16t + i in bits 2i..2i+1.
   int3: the row's chunks go in quads of 4 (the last one has r = (K / 32) % 4 chunks when that is not 0), a quad
   being r words A, r words B, r words H; chunk j of it: A[j] bits 2i..2i+1 = low 2 bits of code i, B[j] those of
   code 16 + i, H[j] bit 2i + 1 = bit 2 of code i and bit 2i = bit 2 of code 16 + i (i < 16). The kernels decode
   (Q - z) exactly as a float; W = (Q - z) * s is rounded as the reference rounds it (a 16-entry table per group: one
   lookup per weight). */
typedef struct { const int32_t *codes; const float *scale; const uint8_t *zeros; int bits; i64 L, N, K; } qint_t;
INLINE i64 qgroups(i64 K, i64 L) { return (K + L - 1) / L; } /* groups per row (the last may be ragged) */
INLINE const int32_t *qrow(const qint_t *q, i64 n) { return q->codes + n * (q->K / 32) * q->bits; }
/* int3: chunk c's word A (from its row's start) and its quad's chunk count r: B = A + r, H = A + 2r */
INLINE i64 q3_at(i64 c, i64 nch, i64 *r) {
    *r = (c >> 2) < (nch >> 2) ? 4 : (nch & 3);
    return 12 * (c >> 2) + (c & 3);
}
/* v[l] = Q - z of code l of chunk c of a row of nch chunks */
INLINE void qdec_generic(const int32_t *row, int bits, i64 c, i64 nch, int z, float *v /* 32 */) {
    const uint32_t *w = (const uint32_t *)row;
    if (bits == 4) {
        w += 4 * c;
        for (int l = 0; l < 32; l++) v[l] = (float)((int)((w[l >> 3] >> (4 * (l & 7))) & 15u) - z);
    } else if (bits == 2) {
        w += 2 * c;
        for (int l = 0; l < 32; l++) v[l] = (float)((int)((w[l >> 4] >> (2 * (l & 15))) & 3u) - z);
    } else {
        i64 r;
        w += q3_at(c, nch, &r);
        const uint32_t a = w[0], b = w[r], h = w[2 * r];
        for (int i = 0; i < 16; i++) {
            v[i] = (float)((int)(((a >> (2 * i)) & 3u) | (((h >> (2 * i + 1)) & 1u) << 2)) - z);
            v[16 + i] = (float)((int)(((b >> (2 * i)) & 3u) | (((h >> (2 * i)) & 1u) << 2)) - z);
        }
    }
}
#if LB_AVX512
/* A chunk -> 16 lanes of 32 bits: lane l holds the code qperm(bits, l) in bits 0..3 and the code qperm(bits, 16 + l)
   in bits 16..19, above the code's own bits whatever follows it: the tables repeat every 2^bits entries and vpermps
   (vpermw) reads 4 (5) index bits. One shift per chunk for int4 and int2 (one load broadcasts the chunk's words);
   int3: A and B side by side, H rotated so that each code's bit 2 lands right above its crumb, one bit select. */
INLINE int qperm(int bits, int j) {
    const int v = j >> 4, l = j & 15;
    if (bits == 4) return 8 * (l & 3) + 4 * v + (l >> 2);
    if (bits == 2) return 16 * (l & 1) + 8 * v + (l >> 1);
    return (l < 8 ? l : l + 8) + 8 * v;
}
/* w: the chunk's first word (int3: its word A, r the chunk count of its quad) */
INLINE __m512i qidx32w(const int32_t *w, const int bits, i64 r) {
    if (bits == 4) {
        const __m512i sh = _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
        return _mm512_srlv_epi32(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)w)), sh);
    }
    if (bits == 2) {
        const __m512i sh = _mm512_setr_epi32(0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14);
        int64_t ww;
        memcpy(&ww, w, 8);
        return _mm512_srlv_epi32(_mm512_set1_epi64(ww), sh);
    }
    const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14);
    const __m512i rot = _mm512_setr_epi32(31, 1, 3, 5, 7, 9, 11, 13, 30, 0, 2, 4, 6, 8, 10, 12);
    const __m512i ab = _mm512_mask_set1_epi32(_mm512_set1_epi32(w[0]), 0xFF00, w[r]); /* A: lanes 0..7, B: 8..15 */
    const __m512i h = _mm512_rorv_epi32(_mm512_set1_epi32(w[2 * r]), rot);
    return _mm512_ternarylogic_epi32(_mm512_srlv_epi32(ab, sh), h, _mm512_set1_epi32(0x00030003), 0xE4); /* crumb | h */
}
INLINE __m512i qidx32(const int32_t *row, const int bits, i64 c, i64 nch) {
    if (bits != 3) return qidx32w(row + bits * c, bits, 0);
    i64 r;
    const i64 at = q3_at(c, nch, &r);
    return qidx32w(row + at, 3, r);
}
/* the chunk's 32 table values: lo[l] of code qperm(bits, l), hi[l] of code qperm(bits, 16 + l) */
INLINE void qlook32(__m512i u, __m512 t, __m512 *lo, __m512 *hi) {
    *lo = _mm512_permutexvar_ps(u, t);
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(u, 16), t);
}
/* int3, a whole quad (128 codes, one table) at once, where the group length is a multiple of 128: 8 words C, each
   8 codes as nibbles (a code's crumb, then its bit 2 from H): lanes 0..3 the even codes < 16 of chunks 0..3
   (from A), 4..7 the even codes >= 16 (from B), 8..15 the same for the odd codes (A, B shifted by 2); v[2t + h]
   lane l = nibble t + 4h of C[l]: code q3blk_code(32t + 16h + l) of the quad. */
INLINE int q3blk_code(int p) {
    const int m = (p >> 5) + 4 * ((p >> 4) & 1), l = p & 15;
    return 32 * (l & 3) + 16 * ((l >> 2) & 1) + 2 * m + (l >> 3);
}
INLINE void q3blk(const int32_t *w, __m512 t, __m512 *v) {
    const __m512i sh = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    const __m512i rot = _mm512_setr_epi32(1, 1, 1, 1, 2, 2, 2, 2, 31, 31, 31, 31, 0, 0, 0, 0);
    const __m512i ab = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)w)); /* A, B, A, B */
    const __m512i h = _mm512_rolv_epi32(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(w + 8))), rot);
    const __m512i c = _mm512_ternarylogic_epi32(_mm512_srlv_epi32(ab, sh), h, _mm512_set1_epi32(0x33333333), 0xE4);
    for (int i = 0; i < 4; i++) {
        const __m512i u = i ? _mm512_srli_epi32(c, 4 * i) : c;
        qlook32(u, t, &v[2 * i], &v[2 * i + 1]);
    }
}
/* 128 codes from k (a multiple of 128, k + 128 <= K) in one table: v[2i], v[2i + 1] = chunk i's lo, hi (qperm
   order), or q3blk's order where blk */
INLINE void q128(const int32_t *row, const int bits, int blk, i64 k, __m512 t, __m512 *v) {
    const int32_t *w = row + bits * (k >> 5);
    if (bits == 3 && blk) { q3blk(w, t, v); return; }
    for (int i = 0; i < 4; i++) qlook32(qidx32w(w + (bits == 3 ? i : bits * i), bits, 4), t, &v[2 * i], &v[2 * i + 1]);
}
/* the code at position p of a span (a 128-code quad where blk, else a 32-code chunk) in the kernels' order */
INLINE int qspan_code(int bits, int blk, int p) { return blk ? q3blk_code(p) : qperm(bits, p); }
/* index vectors to natural order: floats (vpermt2ps of lo, hi) and 16-bit lanes (vpermw of the 32 lookups) */
typedef struct { __m512i f0, f1, h; } qnat_t;
static qnat_t qnat(int bits) {
    int32_t f[32];
    uint16_t h[32];
    for (int j = 0; j < 32; j++) {
        const int p = qperm(bits, j);
        f[p] = j;
        h[p] = (uint16_t)(2 * (j & 15) + (j >> 4));
    }
    return (qnat_t){_mm512_loadu_si512(f), _mm512_loadu_si512(f + 16), _mm512_loadu_si512(h)};
}
/* x (M rows of K) with each span's values in the kernels' order; NULL when it can not be allocated */
static float *qperm_rows(const float *x, i64 M, i64 K, int bits, int blk) {
    const int span = blk ? 128 : 32;
    int perm[128];
    for (int j = 0; j < span; j++) perm[j] = qspan_code(bits, blk, j);
    float *xd = (float *)lb_alloc(M * K, sizeof(float));
    if (!xd) return NULL;
    for (i64 i = 0; i < M * K; i += span)
        for (int j = 0; j < span; j++) xd[i + j] = x[i + perm[j]];
    return xd;
}
static const float QIOTA[5][16] = { /* [bits]: code i & (2^bits - 1) at index i */
    {0}, {0},
    {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3},
    {0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}};
#endif

/* rectangle dequantize: out[r, c] = W[n0 + r, k0 + c], k0 and kc multiples of 32 */
typedef struct { qint_t q; i64 n0, k0, kc; void *out; int dt; } dqi_t;
INLINE void dqi_rows(const dqi_t *a, const int bits, i64 r0, i64 r1) {
    const qint_t *q = &a->q;
    const i64 L = q->L, G = qgroups(q->K, L), nch = q->K / 32;
#if LB_AVX512
    const qnat_t nat = qnat(bits);
    const __m512 iota = _mm512_loadu_ps(QIOTA[bits]);
    __m512 ts = _mm512_setzero_ps();
    __m512i th = _mm512_setzero_si512();
#else
    float s = 0.0f, v[32];
    int z = 0;
#endif
    for (i64 r = r0; r < r1; r++) {
        const i64 n = a->n0 + r;
        const int32_t *row = qrow(q, n);
        for (i64 c = 0, gend = -1; c < a->kc; c += 32) {
            const i64 k = a->k0 + c, i = r * a->kc + c;
            if (k >= gend || c == 0) { /* a new group: its table */
                const i64 g = k / L;
                gend = (g + 1) * L;
#if LB_AVX512
                ts = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps((float)q->zeros[n * G + g])),
                                   _mm512_set1_ps(q->scale[n * G + g]));
                if (a->dt) th = _mm512_broadcast_i64x4(half16(ts, a->dt)); /* vpermw reads 5 bits: table twice */
#else
                s = q->scale[n * G + g];
                z = q->zeros[n * G + g];
#endif
            }
#if LB_AVX512
            const __m512i u = qidx32(row, bits, k >> 5, nch);
            if (a->dt) {
                const __m512i h = _mm512_permutexvar_epi16(nat.h, _mm512_permutexvar_epi16(u, th));
                _mm512_storeu_si512((uint16_t *)a->out + i, h);
            } else {
                __m512 lo, hi;
                qlook32(u, ts, &lo, &hi);
                _mm512_storeu_ps((float *)a->out + i, _mm512_permutex2var_ps(lo, nat.f0, hi));
                _mm512_storeu_ps((float *)a->out + i + 16, _mm512_permutex2var_ps(lo, nat.f1, hi));
            }
#else
            qdec_generic(row, bits, k >> 5, nch, z, v);
            for (int l = 0; l < 32; l++) store1(a->out, i + l, v[l] * s, a->dt);
#endif
        }
    }
}
static void dqi_range(const void *p, i64 r0, i64 r1) {
    const dqi_t *a = (const dqi_t *)p;
    if (a->q.bits == 2) dqi_rows(a, 2, r0, r1);
    else if (a->q.bits == 3) dqi_rows(a, 3, r0, r1);
    else dqi_rows(a, 4, r0, r1);
}
int lb_dqi(const int32_t *codes, const float *scale, const uint8_t *zeros, int bits, i64 L, i64 N, i64 K,
           i64 n0, i64 nr, i64 k0, i64 kc, void *out, int dt, int nt) {
    dqi_t a = {{codes, scale, zeros, bits, L, N, K}, n0, k0, kc, out, dt};
    parallel(dqi_range, &a, nr, MAX(1, 16384 / kc), nt);
    return LB_OK;
}

/* fused y[m, n] = sum_k x[m, k] W[n, k], fp32, K in L1-sized tiles. AVX-512: x arrives with each chunk's values
   in qperm order (a copy per call), so a chunk decodes to two vectors that are never re-ordered. */
typedef struct { const float *x; i64 M, kt; qint_t q; float *y; int blk; } mvi_t;
#if LB_AVX512
INLINE void mvi_rows(const mvi_t *a, const int MM, const int bits, const float *x, float *y, i64 n0, i64 n1,
                     i64 k0, i64 k1) {
    const qint_t *q = &a->q;
    const i64 K = q->K, L = q->L, G = qgroups(K, L), nch = K / 32;
    const __m512 iota = _mm512_loadu_ps(QIOTA[bits]);
    for (i64 n = n0; n < n1; n++) {
        const int32_t *row = qrow(q, n);
        /* two sets of chains (alternate chunks) where MM <= 2: four FMA chains at least, whatever the group size */
        __m512 a0[4], b0[4], a1[4], b1[4];
        for (int m = 0; m < MM; m++) a0[m] = b0[m] = a1[m] = b1[m] = _mm512_setzero_ps();
        int odd = 0;
        for (i64 s0 = k0, g = k0 / L; s0 < k1; g++) { /* one group's part of the tile */
            const i64 s1 = MIN(k1, (g + 1) * L);
            const __m512 ts = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps((float)q->zeros[n * G + g])),
                                            _mm512_set1_ps(q->scale[n * G + g]));
            i64 k = s0;
            if (bits == 4 || (bits == 3 && a->blk)) { /* 128 codes a step (always where blk) */
                for (; (k & 127) == 0 && k + 128 <= s1; k += 128) {
                    __m512 v[8];
                    q128(row, bits, a->blk, k, ts, v);
                    for (int i = 0; i < 4; i++) {
                        const float *xk = x + k + 32 * i;
                        if (MM <= 2 && (i & 1)) {
                            for (int m = 0; m < MM; m++) {
                                a1[m] = _mm512_fmadd_ps(v[2 * i], _mm512_loadu_ps(xk + m * K), a1[m]);
                                b1[m] = _mm512_fmadd_ps(v[2 * i + 1], _mm512_loadu_ps(xk + m * K + 16), b1[m]);
                            }
                        } else {
                            for (int m = 0; m < MM; m++) {
                                a0[m] = _mm512_fmadd_ps(v[2 * i], _mm512_loadu_ps(xk + m * K), a0[m]);
                                b0[m] = _mm512_fmadd_ps(v[2 * i + 1], _mm512_loadu_ps(xk + m * K + 16), b0[m]);
                            }
                        }
                    }
                }
                if (bits == 3) { s0 = s1; continue; } /* blk: s0 and s1 are multiples of 128 (L and K are) */
            }
            for (; k < s1; k += 32) { /* single chunks: groups of 32 or 64, a row's tail */
                __m512 lo, hi;
                qlook32(qidx32(row, bits, k >> 5, nch), ts, &lo, &hi);
                const float *xk = x + k;
                if (MM <= 2 && odd) {
                    for (int m = 0; m < MM; m++) {
                        a1[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xk + m * K), a1[m]);
                        b1[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xk + m * K + 16), b1[m]);
                    }
                } else {
                    for (int m = 0; m < MM; m++) {
                        a0[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xk + m * K), a0[m]);
                        b0[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xk + m * K + 16), b0[m]);
                    }
                }
                odd ^= 1;
            }
            s0 = s1;
        }
        for (int m = 0; m < MM; m++) {
            float t = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0[m], b0[m]), _mm512_add_ps(a1[m], b1[m])));
            y[m * q->N + n] = k0 ? y[m * q->N + n] + t : t;
        }
    }
}
#endif
#define MVI_BITS(MM) \
    if (bits == 2) mvi_rows(a, MM, 2, x, y, n0, n1, k0, k1); \
    else if (bits == 3) mvi_rows(a, MM, 3, x, y, n0, n1, k0, k1); \
    else mvi_rows(a, MM, 4, x, y, n0, n1, k0, k1);
static void mvi_range(const void *p, i64 n0, i64 n1) {
    const mvi_t *a = (const mvi_t *)p;
    const qint_t *q = &a->q;
    const i64 K = q->K, L = q->L, G = qgroups(K, L), nch = K / 32;
    const int bits = q->bits;
    (void)L; (void)G; (void)nch;
    for (i64 k0 = 0; k0 < K; k0 += a->kt) {
        const i64 k1 = MIN(K, k0 + a->kt);
        for (i64 m0 = 0; m0 < a->M; m0 += 4) {
            const float *x = a->x + m0 * K;
            float *y = a->y + m0 * q->N;
            const int mm = (int)MIN(4, a->M - m0);
#if LB_AVX512
            if (mm == 1) { MVI_BITS(1) }
            else if (mm == 2) { MVI_BITS(2) }
            else if (mm == 3) { MVI_BITS(3) }
            else { MVI_BITS(4) }
#else
            for (i64 n = n0; n < n1; n++) {
                const int32_t *row = qrow(q, n);
                float acc[4][16] = {{0}}, v[32];
                for (i64 s0 = k0, g = k0 / L; s0 < k1; g++) {
                    const i64 s1 = MIN(k1, (g + 1) * L);
                    const float s = q->scale[n * G + g];
                    for (i64 k = s0; k < s1; k += 32) {
                        qdec_generic(row, bits, k >> 5, nch, q->zeros[n * G + g], v);
                        for (int l = 0; l < 32; l++) v[l] *= s;
                        for (int m = 0; m < mm; m++)
                            for (int l = 0; l < 16; l++)
                                acc[m][l] += v[l] * x[m * K + k + l] + v[16 + l] * x[m * K + k + 16 + l];
                    }
                    s0 = s1;
                }
                for (int m = 0; m < mm; m++) {
                    float t = 0.0f;
                    for (int l = 0; l < 16; l++) t += acc[m][l];
                    y[m * q->N + n] = k0 ? y[m * q->N + n] + t : t;
                }
            }
#endif
        }
    }
}
int lb_mvi(const float *x, i64 M, const int32_t *codes, const float *scale, const uint8_t *zeros, int bits, i64 L,
           i64 N, i64 K, float *y, int nt) {
    /* whole quads (q3blk) need every group boundary, a ragged last group's end K included, on a quad */
    const int blk = LB_AVX512 && bits == 3 && L % 128 == 0 && K % 128 == 0;
    mvi_t a = {x, M, MAX(128, (8192 / MIN(M, 4)) / 128 * 128), {codes, scale, zeros, bits, L, N, K}, y, blk};
#if LB_AVX512
    float *xd = qperm_rows(x, M, K, bits, blk);
    if (!xd) return LB_ENOMEM;
    a.x = xd;
#endif
    parallel(mvi_range, &a, N, 8, nt);
#if LB_AVX512
    free(xd);
#endif
    return LB_OK;
}

/* fused gx[m, k] = sum_n g[m, n] W[n, k]: as lb_mv4t (column tiles, two-level sums); AVX-512: the tile's columns
   in qperm order, put back in order at the end */
typedef struct { const float *g; i64 M, kt; qint_t q; float *gx; int blk; int *status; } mvit_t;
INLINE void mvit_cols(const mvit_t *a, const int bits, i64 c0, i64 c1) {
    const qint_t *q = &a->q;
    const i64 K = q->K, L = q->L, G = qgroups(K, L), M = a->M, kt = a->kt, nch = K / 32;
    float *tot = (float *)lb_alloc(M * kt * 2, sizeof(float));
    if (!tot) { lb_fail(a->status, LB_ENOMEM); return; }
    float *part = tot + M * kt;
#if LB_AVX512
    const __m512 iota = _mm512_loadu_ps(QIOTA[bits]);
    const int blk = bits == 3 && a->blk, span = blk ? 128 : 32;
    int perm[128];
    for (int j = 0; j < span; j++) perm[j] = qspan_code(bits, blk, j);
#endif
    for (i64 k0 = c0; k0 < c1; k0 += kt) {
        const i64 kw = MIN(kt, c1 - k0);
        memset(tot, 0, sizeof(float) * M * kt * 2);
        for (i64 n = 0; n < q->N; n++) {
            const int32_t *row = qrow(q, n);
#if LB_AVX512
            __m512 ts = _mm512_setzero_ps();
#else
            float s = 0.0f, v[32];
            int z = 0;
#endif
            for (i64 k = k0, gend = -1; k < k0 + kw; k += 32) {
                if (k >= gend) { /* a new group (the first one of the tile) */
                    const i64 g = k / L;
                    gend = (g + 1) * L;
#if LB_AVX512
                    ts = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps((float)q->zeros[n * G + g])),
                                       _mm512_set1_ps(q->scale[n * G + g]));
#else
                    s = q->scale[n * G + g];
                    z = q->zeros[n * G + g];
#endif
                }
#if LB_AVX512
                if (blk) { /* a whole quad in one group: k and kw are multiples of 128 */
                    __m512 v[8];
                    q3blk(row + 3 * (k >> 5), ts, v);
                    for (i64 m = 0; m < M; m++) {
                        __m512 gm = _mm512_set1_ps(a->g[m * q->N + n]);
                        float *t = part + m * kt + (k - k0);
                        for (int i = 0; i < 8; i++)
                            _mm512_storeu_ps(t + 16 * i, _mm512_fmadd_ps(v[i], gm, _mm512_loadu_ps(t + 16 * i)));
                    }
                    k += 96;
                    continue;
                }
                __m512 lo, hi;
                qlook32(qidx32(row, bits, k >> 5, nch), ts, &lo, &hi);
                for (i64 m = 0; m < M; m++) {
                    __m512 gm = _mm512_set1_ps(a->g[m * q->N + n]);
                    float *t = part + m * kt + (k - k0);
                    _mm512_storeu_ps(t, _mm512_fmadd_ps(lo, gm, _mm512_loadu_ps(t)));
                    _mm512_storeu_ps(t + 16, _mm512_fmadd_ps(hi, gm, _mm512_loadu_ps(t + 16)));
                }
#else
                qdec_generic(row, bits, k >> 5, nch, z, v);
                for (int l = 0; l < 32; l++) v[l] *= s;
                for (i64 m = 0; m < M; m++) {
                    float gm = a->g[m * q->N + n], *t = part + m * kt + (k - k0);
                    for (int l = 0; l < 32; l++) t[l] += v[l] * gm;
                }
#endif
            }
            if ((n & 63) == 63 || n == q->N - 1) {
                for (i64 i = 0; i < M * kt; i++) { tot[i] += part[i]; part[i] = 0.0f; }
            }
        }
        for (i64 m = 0; m < M; m++) {
            float *dst = a->gx + m * K + k0;
            const float *src = tot + m * kt;
#if LB_AVX512
            for (i64 j = 0; j < kw; j += span)
                for (int l = 0; l < span; l++) dst[j + perm[l]] = src[j + l];
#else
            memcpy(dst, src, sizeof(float) * kw);
#endif
        }
    }
    free(tot);
}
static void mvit_range(const void *p, i64 c0, i64 c1) {
    const mvit_t *a = (const mvit_t *)p;
    if (a->q.bits == 2) mvit_cols(a, 2, c0, c1);
    else if (a->q.bits == 3) mvit_cols(a, 3, c0, c1);
    else mvit_cols(a, 4, c0, c1);
}
int lb_mvit(const float *g, i64 M, const int32_t *codes, const float *scale, const uint8_t *zeros, int bits, i64 L,
            i64 N, i64 K, float *gx, int nt) {
    const int blk = LB_AVX512 && bits == 3 && L % 128 == 0 && K % 128 == 0, span = blk ? 128 : 32;
    int status = LB_OK;
    mvit_t a = {g, M, MAX(span, (2048 / M) / span * span), {codes, scale, zeros, bits, L, N, K}, gx, blk, &status};
    parallel(mvit_range, &a, K, a.kt, nt);
    return status;
}

/* grad_scale helper: out[r, g] = sum_{k in g} (Q - z)[n0 + r, k] d[r, k] for d = (g^T x) rows [n0, n0 + nr) */
typedef struct { const float *d; qint_t q; i64 n0; float *out; } rdi_t;
INLINE void rdi_rows(const rdi_t *a, const int bits, i64 r0, i64 r1) {
    const qint_t *q = &a->q;
    const i64 K = q->K, L = q->L, G = qgroups(K, L), nch = K / 32;
#if LB_AVX512
    const qnat_t nat = qnat(bits);
    const __m512 iota = _mm512_loadu_ps(QIOTA[bits]);
#endif
    for (i64 r = r0; r < r1; r++) {
        const i64 n = a->n0 + r;
        const int32_t *row = qrow(q, n);
        for (i64 g = 0; g < G; g++) {
            const int z = q->zeros[n * G + g];
            const i64 kend = MIN(K, (g + 1) * L); /* a ragged last group ends at K */
#if LB_AVX512
            const __m512 tq = _mm512_sub_ps(iota, _mm512_set1_ps((float)z));
            __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
            for (i64 k = g * L; k < kend; k += 32) {
                __m512 lo, hi;
                qlook32(qidx32(row, bits, k >> 5, nch), tq, &lo, &hi);
                const float *d = a->d + r * K + k;
                acc0 = _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, nat.f0, hi), _mm512_loadu_ps(d), acc0);
                acc1 = _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, nat.f1, hi), _mm512_loadu_ps(d + 16), acc1);
            }
            a->out[n * G + g] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
            float acc[16] = {0}, v[32];
            for (i64 k = g * L; k < kend; k += 32) {
                qdec_generic(row, bits, k >> 5, nch, z, v);
                const float *d = a->d + r * K + k;
                for (int l = 0; l < 16; l++) acc[l] += v[l] * d[l] + v[16 + l] * d[16 + l];
            }
            float t = 0.0f;
            for (int l = 0; l < 16; l++) t += acc[l];
            a->out[n * G + g] = t;
#endif
        }
    }
}
static void rdi_range(const void *p, i64 r0, i64 r1) {
    const rdi_t *a = (const rdi_t *)p;
    if (a->q.bits == 2) rdi_rows(a, 2, r0, r1);
    else if (a->q.bits == 3) rdi_rows(a, 3, r0, r1);
    else rdi_rows(a, 4, r0, r1);
}
int lb_rdi(const float *d, const int32_t *codes, const uint8_t *zeros, int bits, i64 L, i64 N, i64 K, i64 n0,
           i64 nr, float *out, int nt) {
    rdi_t a = {d, {codes, NULL, zeros, bits, L, N, K}, n0, out};
    parallel(rdi_range, &a, nr, 8, nt);
    return LB_OK;
}
