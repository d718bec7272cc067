/* The SZ encoder's kernels (lowbit/formats/_sz_encode.py declares and calls them; the decoder is sz_decode.c).
   Shared helpers (threads, fp16/bf16 conversions, return codes, LB_AVX512): lowbit.h.
   Bit-identical to the numpy/torch reference in _sz_encode.py (fp32 arithmetic as written, -ffp-contract=off):
   lb_szq1   codes q = clamp(rint(w / step), -512, 512) (fp32 division, round half to even) and their histogram;
   lb_szq2   codes clamped to the radius, stored as symbols q + radius, and the suspects: elements whose fp32
             reconstruction q * step, or that rounded to fp16 or bf16, is more than `limit` from w (fp32
             differences); per block of SZQ_BLOCK elements their offsets in the block, and their count;
   lb_szlb   the bits of every lane (code lengths summed per lane);
   lb_szpack the payload: every lane's code words back to back, LSB first, lanes in stream order;
   lb_szexc, lb_szdm, lb_szhuff: per element and per symbol helpers (below). */
#include "lowbit.h"

#define SZQ_BLOCK 65536 /* suspect offsets are uint16 within a block */
#define SZQ_OFF 512     /* codes are clamped to +-SZQ_OFF before the radius is known */

typedef struct { const float *w; i64 n; float step; int16_t *q; i64 *hist; } szq1_t;
static void szq1_range(const void *p, i64 lo, i64 hi) {
    const szq1_t *a = (const szq1_t *)p;
    i64 h[4][2 * SZQ_OFF + 1];
    memset(h, 0, sizeof h);
    const float s = a->step;
    for (i64 b0 = lo; b0 < hi; b0 += 4096) { /* quantize a block, then count it while it is in L1 */
        const i64 b1 = MIN(hi, b0 + 4096);
        i64 i = b0;
#if LB_AVX512
        const __m512 vs = _mm512_set1_ps(s), vlo = _mm512_set1_ps(-SZQ_OFF), vhi = _mm512_set1_ps(SZQ_OFF);
        for (; i + 16 <= b1; i += 16) {
            __m512 x = _mm512_div_ps(_mm512_loadu_ps(a->w + i), vs);
            x = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            x = _mm512_min_ps(_mm512_max_ps(x, vlo), vhi);
            _mm256_storeu_si256((__m256i *)(a->q + i), _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(x)));
        }
#endif
        for (; i < b1; i++) {
            float x = rintf(a->w[i] / s);
            x = x < -SZQ_OFF ? -SZQ_OFF : (x > SZQ_OFF ? SZQ_OFF : x);
            a->q[i] = (int16_t)x;
        }
        const int16_t *q = a->q;
        i = b0;
        for (; i + 4 <= b1; i += 4) {
            h[0][q[i] + SZQ_OFF]++; h[1][q[i + 1] + SZQ_OFF]++; h[2][q[i + 2] + SZQ_OFF]++; h[3][q[i + 3] + SZQ_OFF]++;
        }
        for (; i < b1; i++) h[0][q[i] + SZQ_OFF]++;
    }
    for (int k = 0; k <= 2 * SZQ_OFF; k++)
        __atomic_fetch_add(&a->hist[k], h[0][k] + h[1][k] + h[2][k] + h[3][k], __ATOMIC_RELAXED);
}
/* hist[2 * 512 + 1] must be zeroed by the caller. */
int lb_szq1(const float *w, i64 n, float step, int16_t *q, i64 *hist, int nt) {
    szq1_t a = {w, n, step, q, hist};
    parallel(szq1_range, &a, n, SZQ_BLOCK, nt);
    return LB_OK;
}

typedef struct { const float *w; i64 n; float step, limit; int radius; int16_t *q; uint16_t *sus; i64 *cnt; } szq2_t;
INLINE float err3(float a, float w) { /* max |a - w|, |fp16(a) - w|, |bf16(a) - w|, each in fp32 */
    const float e0 = fabsf(a - w), e1 = fabsf(from_fp16(to_fp16(a)) - w), e2 = fabsf(u2f((uint32_t)to_bf16(a) << 16) - w);
    return MAX(MAX(e0, e1), e2);
}
static void szq2_range(const void *p, i64 lo, i64 hi) {
    const szq2_t *a = (const szq2_t *)p;
    const int r = a->radius;
    const float s = a->step;
    for (i64 b0 = lo; b0 < hi; b0 += SZQ_BLOCK) {
        const i64 b1 = MIN(hi, b0 + SZQ_BLOCK);
        uint16_t *sus = a->sus + b0;
        i64 c = 0, i = b0;
#if LB_AVX512
        const __m512 vs = _mm512_set1_ps(s), vlim = _mm512_set1_ps(a->limit);
        const __m512i vr = _mm512_set1_epi32(r), vnr = _mm512_set1_epi32(-r), absm = _mm512_set1_epi32(0x7fffffff);
        const __m512i rnd = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), hi16 = _mm512_set1_epi32((int)0xffff0000u);
        for (; i + 16 <= b1; i += 16) {
            __m512i qi = _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)(a->q + i)));
            qi = _mm512_min_epi32(_mm512_max_epi32(qi, vnr), vr);
            const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(qi), vs), w = _mm512_loadu_ps(a->w + i);
            const __m512 h = _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            const __m512i u = _mm512_castps_si512(v); /* bf16, round to nearest even (v is never NaN) */
            const __m512 bf = _mm512_castsi512_ps(_mm512_and_si512(
                _mm512_add_epi32(_mm512_add_epi32(u, rnd), _mm512_and_si512(_mm512_srli_epi32(u, 16), one)), hi16));
#define LB_ABS(x) _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), absm))
            const __m512 e = _mm512_max_ps(_mm512_max_ps(LB_ABS(_mm512_sub_ps(v, w)), LB_ABS(_mm512_sub_ps(h, w))),
                                           LB_ABS(_mm512_sub_ps(bf, w)));
#undef LB_ABS
            _mm256_storeu_si256((__m256i *)(a->q + i), _mm512_cvtepi32_epi16(_mm512_add_epi32(qi, vr)));
            __mmask16 m = _mm512_cmp_ps_mask(e, vlim, _CMP_GT_OQ);
            while (m) {
                sus[c++] = (uint16_t)(i - b0 + __builtin_ctz(m));
                m &= m - 1;
            }
        }
#endif
        for (; i < b1; i++) {
            int q = a->q[i];
            q = q < -r ? -r : (q > r ? r : q);
            if (err3((float)q * s, a->w[i]) > a->limit) sus[c++] = (uint16_t)(i - b0);
            a->q[i] = (int16_t)(q + r);
        }
        a->cnt[b0 / SZQ_BLOCK] = c;
    }
}
/* q: lb_szq1's codes in, symbols out; sus[n]: suspect offsets, block b's at b * SZQ_BLOCK; cnt[ceil(n / SZQ_BLOCK)]. */
int lb_szq2(const float *w, i64 n, float step, int radius, float limit, int16_t *q, uint16_t *sus, i64 *cnt, int nt) {
    szq2_t a = {w, n, step, limit, radius, q, sus, cnt};
    parallel(szq2_range, &a, n, SZQ_BLOCK, nt);
    return LB_OK;
}

typedef struct { const int16_t *sym; i64 n; const uint8_t *len; i64 chunk, lanes; i64 *bits; } szlb_t;
static void szlb_range(const void *p, i64 c0, i64 c1) {
    const szlb_t *a = (const szlb_t *)p;
    for (i64 c = c0; c < c1; c++) {
        const i64 base = c * a->chunk, cnt = MIN(a->chunk, a->n - base);
        i64 *lb = a->bits + c * a->lanes;
        for (i64 j = 0; j < a->lanes; j++) lb[j] = 0;
        for (i64 r = 0; r < cnt; r += a->lanes) {
            const int16_t *s = a->sym + base + r;
            const i64 m = MIN(a->lanes, cnt - r);
            for (i64 j = 0; j < m; j++) lb[j] += a->len[s[j]];
        }
    }
}
/* bits[ceil(n / chunk) * lanes]: the bits of every lane (element base + j + i * lanes of a chunk in lane j). */
int lb_szlb(const int16_t *sym, i64 n, const uint8_t *len, i64 chunk, i64 lanes, i64 *bits, int nt) {
    szlb_t a = {sym, n, len, chunk, lanes, bits};
    parallel(szlb_range, &a, (n + chunk - 1) / chunk, 1, nt);
    return LB_OK;
}

typedef struct { const int16_t *sym; i64 n; const uint32_t *code; i64 chunk, lanes; const i64 *start; uint32_t *out; } szp_t;
static void szp_range(const void *p, i64 l0, i64 l1) {
    const szp_t *a = (const szp_t *)p;
    const i64 first = a->start[l0] >> 5, shared = a->start[l0] & 31, S = a->chunk / a->lanes;
    i64 wpos = first;
    uint64_t acc = 0;
    int fill = (int)shared; /* the low `fill` bits of acc belong to the lanes before l0 (zeros here) */
    for (i64 l = l0; l < l1; l++) {
        const i64 c = l / a->lanes, j = l % a->lanes, base = c * a->chunk + j;
        const i64 cnt = MIN(S, (a->n - base + a->lanes - 1) / a->lanes);
        const int16_t *s = a->sym + base;
        for (i64 i = 0; i < cnt; i++) {
            const uint32_t e = a->code[s[i * a->lanes]];
            acc |= (uint64_t)(e & 0xffffu) << fill;
            fill += (int)(e >> 16);
            if (fill >= 32) { /* a word shared with the thread before (only the first) is OR-ed atomically */
                if (wpos == first && shared) __atomic_fetch_or(&a->out[wpos], (uint32_t)acc, __ATOMIC_RELAXED);
                else a->out[wpos] = (uint32_t)acc;
                wpos++;
                acc >>= 32;
                fill -= 32;
            }
        }
    }
    if (fill > 0) __atomic_fetch_or(&a->out[wpos], (uint32_t)acc, __ATOMIC_RELAXED); /* shared with the next */
}
/* out: the payload words, zeroed by the caller; code[sym] = reversed code word | length << 16; start[n_lanes + 1]
   the lanes' bit offsets (their prefix sum). */
int lb_szpack(const int16_t *sym, i64 n, const uint32_t *code, i64 chunk, i64 lanes, const i64 *start, uint32_t *out,
              int nt) {
    szp_t a = {sym, n, code, chunk, lanes, start, out};
    parallel(szp_range, &a, (n + chunk - 1) / chunk * lanes, 64, nt);
    return LB_OK;
}

/* ---- per element and per symbol helpers of the encoder, bit-identical to their numpy/torch versions ---- */

/* out[k] = 1 when, for some output dtype d (fp32, fp16, bf16), |d(v[k]) - w[k]| > max(|d(w[k]) - w[k]|, eb) in
   float64 (_sz_encode._exceeds); v and w hold fp32 (fp16/bf16 values widened exactly). */
int lb_szexc(const float *v, const float *w, i64 m, double eb, uint8_t *out) {
    for (i64 k = 0; k < m; k++) {
        const double wd = (double)w[k];
        const double dv[3] = {(double)v[k], (double)from_fp16(to_fp16(v[k])), (double)u2f((uint32_t)to_bf16(v[k]) << 16)};
        const double dw[3] = {wd, (double)from_fp16(to_fp16(w[k])), (double)u2f((uint32_t)to_bf16(w[k]) << 16)};
        uint8_t bad = 0;
        for (int d = 0; d < 3; d++) {
            double floor = fabs(dw[d] - wd);
            floor = floor < eb ? eb : floor;
            bad |= fabs(dv[d] - wd) > floor;
        }
        out[k] = bad;
    }
    return LB_OK;
}

/* out[2 * b], out[2 * b + 1]: max |fp16(w) - w| and |bf16(w) - w| (float64) over block b of SZQ_BLOCK elements. */
typedef struct { const float *w; i64 n; double *out; } szdm_t;
static void szdm_range(const void *p, i64 lo, i64 hi) {
    const szdm_t *a = (const szdm_t *)p;
    for (i64 b0 = lo; b0 < hi; b0 += SZQ_BLOCK) {
        const i64 b1 = MIN(hi, b0 + SZQ_BLOCK);
        double m16 = 0, mbf = 0;
        for (i64 i = b0; i < b1; i++) {
            const float x = a->w[i];
            const double e16 = fabs((double)from_fp16(to_fp16(x)) - (double)x);
            const double ebf = fabs((double)u2f((uint32_t)to_bf16(x) << 16) - (double)x);
            m16 = e16 > m16 ? e16 : m16;
            mbf = ebf > mbf ? ebf : mbf;
        }
        a->out[2 * (b0 / SZQ_BLOCK)] = m16;
        a->out[2 * (b0 / SZQ_BLOCK) + 1] = mbf;
    }
}
int lb_szdm(const float *w, i64 n, double *out, int nt) {
    szdm_t a = {w, n, out};
    parallel(szdm_range, &a, n, SZQ_BLOCK, nt);
    return LB_OK;
}

/* Huffman code lengths of n >= 2 positive weights f (overwritten), limited to max_len: _entropy.huffman_lengths.
   Its heap pops the least (weight, id) pair, internal nodes numbered n, n + 1, ... in the order they are made;
   the two-queue method pops the same pairs (merged weights never decrease, and their ids increase), so the
   lengths are the same, ties included. Over-long codes: f = max(f >> 1, 1), rebuild. len[n] out. */
typedef struct { i64 w, id; } hnode_t;
static int hnode_cmp(const void *x, const void *y) {
    const hnode_t *a = (const hnode_t *)x, *b = (const hnode_t *)y;
    if (a->w != b->w) return a->w < b->w ? -1 : 1;
    return a->id < b->id ? -1 : (a->id > b->id);
}
int lb_szhuff(int64_t *f, i64 n, int max_len, uint8_t *len) {
    hnode_t *leaf = lb_alloc(n, sizeof *leaf), *inner = lb_alloc(n, sizeof *inner);
    i64 *parent = lb_alloc(2 * n - 1, sizeof *parent), *depth = lb_alloc(2 * n - 1, sizeof *depth);
    if (!leaf || !inner || !parent || !depth) { free(leaf); free(inner); free(parent); free(depth); return LB_ENOMEM; }
    for (;;) {
        for (i64 i = 0; i < n; i++) leaf[i] = (hnode_t){f[i], i};
        qsort(leaf, n, sizeof *leaf, hnode_cmp);
        i64 li = 0, ih = 0, it = 0, nxt = n;
        for (i64 k = 0; k < n - 1; k++) {
            hnode_t ab[2];
            for (int t = 0; t < 2; t++) {
                if (li < n && (ih == it || hnode_cmp(&leaf[li], &inner[ih]) < 0)) ab[t] = leaf[li++];
                else ab[t] = inner[ih++];
            }
            parent[ab[0].id] = parent[ab[1].id] = nxt;
            inner[it++] = (hnode_t){ab[0].w + ab[1].w, nxt++};
        }
        depth[2 * n - 2] = 0;
        i64 longest = 0;
        for (i64 i = 2 * n - 3; i >= 0; i--) depth[i] = depth[parent[i]] + 1;
        for (i64 i = 0; i < n; i++) longest = MAX(longest, depth[i]);
        if (longest <= max_len) break;
        for (i64 i = 0; i < n; i++) f[i] = MAX(f[i] >> 1, 1);
    }
    for (i64 i = 0; i < n; i++) len[i] = (uint8_t)depth[i];
    free(leaf); free(inner); free(parent); free(depth);
    return LB_OK;
}
