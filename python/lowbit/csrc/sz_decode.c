/* The SZ stream v2 decoder (lowbit/formats/sz.py, docs/sz.md), called by lowbit._cpu.sz_decode: lb_szd.
   The encoder's kernels are in sz_encode.c. Shared helpers (threads, fp16/bf16 conversions, return codes): lowbit.h. */
#include "lowbit.h"

/* =============================== SZ stream v2 decoder (formats/sz.py, docs/sz.md) ===============================
   Chunk c, lane j codes elements c * chunk + j + i * lanes, i < its count; code words LSB first, bit p of the
   payload = bit p % 8 of byte p / 8 (u32 words, little endian). Each lane: peek the 64 bits at its position
   (>= 57 of them valid: 4 code words of <= 14 bits), then 4 lookups in a table built per call from the int16
   decode table (symbol << 4 | length): entry = value bits << 32 (fp32) or << 16 (fp16/bf16) | length, value =
   float32(symbol - radius) * step rounded to the output dtype, exactly the reference's arithmetic. A lane's chain
   (lookup, shift, lookup...) is serial, so many lanes decode in lockstep, independent chains for the out-of-order
   core: with AVX-512 up to 64 (8 octets of 8 neighbouring lanes, one qword gather per octet and symbol, one
   8-element store), in plain C 4 neighbouring lanes. Reads past the payload see zero bits (as the numpy
   decoder's padding). Every lane's end is checked against the next lane's start; threads split the lanes. */
typedef struct {
    const uint8_t *payload; i64 nbytes; const void *start; int s64; const void *tab; int wide /* 8-byte entries */;
    i64 numel, chunk, lanes; uint64_t mask; void *out; int dt;
    pthread_mutex_t mu; i64 bad_lane, bad_end; /* the first lane that does not end at its recorded length */
} szd_t;
INLINE i64 sz_start(const szd_t *a, i64 l) {
    return a->s64 ? ((const int64_t *)a->start)[l] : (i64)((const int32_t *)a->start)[l];
}
INLINE uint64_t sz_peek(const szd_t *a, i64 pos) { /* the 64 bits from byte pos / 8, >> pos % 8 */
    const i64 b = pos >> 3;
    uint64_t v = 0;
    if (b >= 0 && b + 8 <= a->nbytes) {
        memcpy(&v, a->payload + b, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
#endif
    } else {
        for (int k = 0; k < 8; k++)
            if (b + k >= 0 && b + k < a->nbytes) v |= (uint64_t)a->payload[b + k] << (8 * k);
    }
    return v >> (pos & 7);
}
INLINE i64 sz_count(const szd_t *a, i64 c, i64 j) { /* symbols of lane j of chunk c */
    const i64 n = MIN(a->numel - c * a->chunk, a->chunk);
    return n > j ? (n - j + a->lanes - 1) / a->lanes : 0;
}
/* G lanes j0.. of chunk c, S symbols each: pos[] in (lane starts), out (lane ends) */
#define SZ_STEP(T, OT, SH)                                                                                     \
    {                                                                                                          \
        const T e = tab[b[g] & mask];                                                                          \
        b[g] >>= (e & 15);                                                                                     \
        used[g] += (int)(e & 15);                                                                              \
        o[g + (i + t) * lanes] = (OT)(e >> SH);                                                                \
    }
#define SZ_GROUP_BODY(T, OT, SH)                                                                               \
    {                                                                                                          \
        const T *tab = (const T *)a->tab;                                                                      \
        OT *o = (OT *)a->out + c * a->chunk + j0;                                                              \
        const uint64_t mask = a->mask;                                                                         \
        const i64 lanes = a->lanes;                                                                            \
        uint64_t b[4];                                                                                         \
        int used[4];                                                                                           \
        i64 i = 0;                                                                                             \
        for (; i + 4 <= S; i += 4) {                                                                           \
            for (int g = 0; g < G; g++) { b[g] = sz_peek(a, pos[g]); used[g] = 0; }                           \
            for (int t = 0; t < 4; t++)                                                                        \
                for (int g = 0; g < G; g++) SZ_STEP(T, OT, SH)                                                 \
            for (int g = 0; g < G; g++) pos[g] += used[g];                                                     \
        }                                                                                                      \
        if (i < S) {                                                                                           \
            for (int g = 0; g < G; g++) { b[g] = sz_peek(a, pos[g]); used[g] = 0; }                           \
            for (int t = 0; t < S - i; t++)                                                                    \
                for (int g = 0; g < G; g++) SZ_STEP(T, OT, SH)                                                 \
            for (int g = 0; g < G; g++) pos[g] += used[g];                                                     \
        }                                                                                                      \
    }
INLINE void sz_group(const szd_t *a, const int G, i64 c, i64 j0, i64 S, i64 *pos) {
    if (a->wide) SZ_GROUP_BODY(uint64_t, uint32_t, 32)
    else SZ_GROUP_BODY(uint32_t, uint16_t, 16)
}
#if LB_AVX512
/* AVX-512: K octets (8 consecutive lanes of one chunk each, K <= 8, all S symbols) in lockstep, a lane per
   64-bit element: the refill is a qword gather at byte pos / 8 (then >> pos % 8), each lookup a gather from
   the table, each step one 8-element store per octet. base[k]: octet k's first output; pos: 8K lanes' starts,
   on return their ends. */
INLINE __m512i sz_refill(const szd_t *a, __m512i pos) {
    const __m512i byte = _mm512_srai_epi64(pos, 3);
    __m512i v;
    if (_mm512_cmp_epi64_mask(byte, _mm512_set1_epi64(a->nbytes - 8), _MM_CMPINT_LE) == 0xff &&
        _mm512_cmp_epi64_mask(byte, _mm512_setzero_si512(), _MM_CMPINT_NLT) == 0xff) {
        v = _mm512_i64gather_epi64(byte, (const void *)a->payload, 1);
    } else { /* near the payload's end (or a lying start): byte by byte, zeros past the end */
        int64_t p8[8], w[8];
        _mm512_storeu_si512(p8, pos);
        for (int g = 0; g < 8; g++) w[g] = (int64_t)(sz_peek(a, p8[g] & ~(i64)7));
        v = _mm512_loadu_si512(w);
    }
    return _mm512_srlv_epi64(v, _mm512_and_si512(pos, _mm512_set1_epi64(7)));
}
#define SZ_V_STEP(t)                                                                                           \
    for (int k = 0; k < K; k++) {                                                                              \
        const __m512i win = _mm512_and_si512(bits[k], mask);                                                   \
        __m512i ln;                                                                                            \
        if (wide) {                                                                                            \
            const __m512i e = _mm512_i64gather_epi64(win, a->tab, 8);                                          \
            _mm256_storeu_si256((__m256i *)((uint32_t *)a->out + base[k] + (i + (t)) * lanes),                 \
                                _mm512_cvtepi64_epi32(_mm512_srli_epi64(e, 32)));                              \
            ln = _mm512_and_si512(e, m15);                                                                     \
        } else {                                                                                               \
            const __m256i e = _mm512_i64gather_epi32(win, a->tab, 4);                                          \
            _mm_storeu_si128((__m128i *)((uint16_t *)a->out + base[k] + (i + (t)) * lanes),                    \
                             _mm256_cvtepi32_epi16(_mm256_srli_epi32(e, 16)));                                 \
            ln = _mm512_cvtepu32_epi64(_mm256_and_si256(e, _mm256_set1_epi32(15)));                            \
        }                                                                                                      \
        bits[k] = _mm512_srlv_epi64(bits[k], ln);                                                              \
        used[k] = _mm512_add_epi64(used[k], ln);                                                               \
    }
INLINE void sz_octets(const szd_t *a, const int K, const int wide, const i64 *base, i64 S, int64_t *posv) {
    const __m512i mask = _mm512_set1_epi64((long long)a->mask), m15 = _mm512_set1_epi64(15);
    const i64 lanes = a->lanes;
    __m512i pos[8], bits[8], used[8];
    for (int k = 0; k < K; k++) pos[k] = _mm512_loadu_si512(posv + 8 * k);
    i64 i = 0;
    for (; i + 4 <= S; i += 4) {
        for (int k = 0; k < K; k++) { bits[k] = sz_refill(a, pos[k]); used[k] = _mm512_setzero_si512(); }
        SZ_V_STEP(0) SZ_V_STEP(1) SZ_V_STEP(2) SZ_V_STEP(3)
        for (int k = 0; k < K; k++) pos[k] = _mm512_add_epi64(pos[k], used[k]);
    }
    if (i < S) {
        for (int k = 0; k < K; k++) { bits[k] = sz_refill(a, pos[k]); used[k] = _mm512_setzero_si512(); }
        for (int t = 0; t < S - i; t++) { SZ_V_STEP(t) }
        for (int k = 0; k < K; k++) pos[k] = _mm512_add_epi64(pos[k], used[k]);
    }
    for (int k = 0; k < K; k++) _mm512_storeu_si512(posv + 8 * k, pos[k]);
}
#define SZ_OCTETS(K) (a->wide ? sz_octets(a, K, 1, base, S, posv) : sz_octets(a, K, 0, base, S, posv))
#endif
static void szd_range(const void *p, i64 l0, i64 l1) {
    szd_t *a = (szd_t *)p;
    i64 bad = -1, bad_end = 0, l = l0;
#if LB_AVX512
    /* up to 8 octets of lanes with equal counts (l0, l1 and chunks start at multiples of 8 lanes) */
    while (a->lanes % 8 == 0 && l + 8 <= l1) {
        i64 base[8], S = -1;
        int64_t posv[64];
        int K = 0;
        for (i64 m = l; K < 8 && m + 8 <= l1; m += 8, K++) {
            const i64 c = m / a->lanes, j = m % a->lanes, s = sz_count(a, c, j);
            if (sz_count(a, c, j + 7) != s || (K && s != S)) break;
            S = s;
            base[K] = c * a->chunk + j;
            for (int g = 0; g < 8; g++) posv[8 * K + g] = sz_start(a, m + g);
        }
        if (K == 0) break; /* unequal counts within an octet: the scalar code below takes the rest */
        if (K == 8) SZ_OCTETS(8);
        else if (K == 7) SZ_OCTETS(7);
        else if (K == 6) SZ_OCTETS(6);
        else if (K == 5) SZ_OCTETS(5);
        else if (K == 4) SZ_OCTETS(4);
        else if (K == 3) SZ_OCTETS(3);
        else if (K == 2) SZ_OCTETS(2);
        else SZ_OCTETS(1);
        for (int g = 0; g < 8 * K; g++)
            if (bad < 0 && posv[g] != sz_start(a, l + g + 1)) { bad = l + g; bad_end = posv[g]; }
        l += 8 * K;
    }
#endif
    while (l < l1) {
        const i64 c = l / a->lanes, j = l % a->lanes, S = sz_count(a, c, j);
        const i64 room = MIN(a->lanes - j, l1 - l); /* lanes of this chunk in this range */
        i64 pos[4];
        /* lockstep needs equal counts (in the last chunk they differ by one, at one lane) */
        const int G = room >= 4 && sz_count(a, c, j + 3) == S ? 4 : 1;
        for (int g = 0; g < G; g++) pos[g] = sz_start(a, l + g);
        if (G == 4) sz_group(a, 4, c, j, S, pos);
        else sz_group(a, 1, c, j, S, pos);
        for (int g = 0; g < G; g++)
            if (bad < 0 && pos[g] != sz_start(a, l + g + 1)) { bad = l + g; bad_end = pos[g]; }
        l += G;
    }
    if (bad >= 0) {
        pthread_mutex_lock(&a->mu);
        if (a->bad_lane < 0 || bad < a->bad_lane) { a->bad_lane = bad; a->bad_end = bad_end; }
        pthread_mutex_unlock(&a->mu);
    }
}
/* out[numel] (dt) from an SZ v2 stream; then out[oidx[k]] = ovals[k] (already in dt). Returns LB_OK, LB_ENOMEM, or
   one of these, with err[2] saying where (lowbit._cpu.sz_decode turns each into the numpy decoder's exception): */
#define SZD_LANE_END 1   /* lane err[0] ends at bit err[1] instead of its recorded length (the first such lane) */
#define SZD_LONG_CODE 2  /* a table entry longer than 14 bits: not decoded (the caller takes the numpy decoder) */
#define SZD_OUTLIER 3    /* outlier index err[0] outside [0, numel) */
#define SZD_LANE_START 4 /* lane err[0] starts at bit err[1], outside the payload: not decoded */
int lb_szd(const int32_t *payload, i64 nwords, const void *start, int s64, const int16_t *table, int max_len,
           float step, i64 radius, i64 numel, i64 chunk, i64 lanes, const int64_t *oidx, const void *ovals,
           i64 nout, void *out, int dt, int nt, int64_t *err) {
    const i64 nwin = (i64)1 << max_len, n_lanes = (numel + chunk - 1) / chunk * lanes;
    err[0] = err[1] = 0;
    for (i64 l = 0; l <= n_lanes; l++) { /* so that no position below can overflow */
        const i64 s = s64 ? ((const int64_t *)start)[l] : (i64)((const int32_t *)start)[l];
        if (s < 0 || s > nwords * 32) { err[0] = l; err[1] = s; return SZD_LANE_START; }
    }
    void *tab = lb_alloc(nwin, dt == 0 ? 8 : 4);
    if (!tab) return LB_ENOMEM;
    int longest = 0;
    for (i64 w = 0; w < nwin; w++) {
        const uint32_t e = (uint16_t)table[w], ln = e & 15;
        const float v = (float)((i64)(e >> 4) - radius) * step;
        longest = MAX(longest, (int)ln);
        if (dt == 0) ((uint64_t *)tab)[w] = (uint64_t)f2u(v) << 32 | ln;
        else ((uint32_t *)tab)[w] = (uint32_t)(dt == 1 ? to_bf16(v) : to_fp16(v)) << 16 | ln;
    }
    if (longest > 14) { free(tab); return SZD_LONG_CODE; }
    szd_t a = {(const uint8_t *)payload, nwords * 4, start, s64, tab, dt == 0, numel, chunk, lanes,
               (uint64_t)nwin - 1, out, dt, PTHREAD_MUTEX_INITIALIZER, -1, 0};
    parallel(szd_range, &a, n_lanes, 8, nt); /* whole octets per thread */
    free(tab);
    pthread_mutex_destroy(&a.mu);
    if (a.bad_lane >= 0) { err[0] = a.bad_lane; err[1] = a.bad_end; return SZD_LANE_END; }
    const int esz = dt == 0 ? 4 : 2;
    for (i64 k = 0; k < nout; k++) {
        const i64 i = oidx[k];
        if (i < 0 || i >= numel) { err[0] = i; return SZD_OUTLIER; }
        memcpy((char *)out + i * esz, (const char *)ovals + k * esz, esz);
    }
    return LB_OK;
}
