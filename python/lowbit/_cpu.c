/* lowbit CPU kernels: lowbit/_cpu.py builds this once per machine with the system C compiler
   (-O3 -march=native -fopenmp -ffp-contract=off) and calls it through ctypes; docs/cpu.md.
   Plain C, plus AVX-512 intrinsics where the compiler targets them. -ffp-contract=off: products and sums
   round as written, so quantize and dequantize are bit-identical to the pure-torch reference in
   lowbit.formats (fp32 arithmetic, then round to nearest even); the matmuls accumulate in fp32.
   Contents: threads; fp32 -> bf16/fp16; the 4-bit LUT family (dequantize, quantize, fused GEMV and its
   transpose); the integer family (dequantize, fused GEMV and its transpose, the grad_scale reduction); the SZ
   stream v2 decoder. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(LB_GENERIC)
#include <immintrin.h>
#define LB_AVX512 1
#else
#define LB_AVX512 0
#endif

typedef int64_t i64;
#define INLINE static inline __attribute__((always_inline))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

int lb_isa(void) { return LB_AVX512; }

/* ---- threads: [0, n) in nt contiguous ranges (multiples of grain) ----
   With OpenMP (-fopenmp): torch's own OpenMP runtime, already loaded under the same soname, so that lowbit
   and torch's BLAS share one pool of workers (two pools would fight: libgomp's idle workers spin for
   milliseconds after every torch op). Without: pthreads started per call, the calling thread runs the first. */
typedef void (*range_fn)(const void *ctx, i64 lo, i64 hi);
#ifdef _OPENMP
#include <omp.h>
int lb_openmp(void) { return 1; }
static void parallel(range_fn fn, const void *ctx, i64 n, i64 grain, int nt) {
    const i64 units = (n + grain - 1) / grain;
    nt = (int)MIN((i64)nt, units);
    if (nt <= 1) { if (n > 0) fn(ctx, 0, n); return; }
#pragma omp parallel num_threads(nt)
    {
        const i64 t = omp_get_thread_num(), T = omp_get_num_threads();
        const i64 lo = units * t / T * grain, hi = MIN(units * (t + 1) / T * grain, n);
        if (lo < hi) fn(ctx, lo, hi);
    }
}
#else
int lb_openmp(void) { return 0; }
typedef struct { range_fn fn; const void *ctx; i64 lo, hi; } task_t;
static void *task_main(void *p) {
    task_t *t = (task_t *)p;
    if (t->lo < t->hi) t->fn(t->ctx, t->lo, t->hi);
    return NULL;
}
static void parallel(range_fn fn, const void *ctx, i64 n, i64 grain, int nt) {
    i64 units = (n + grain - 1) / grain;
    nt = (int)MIN(MIN((i64)nt, units), 64);
    if (nt <= 1) { if (n > 0) fn(ctx, 0, n); return; }
    pthread_t th[64]; task_t tk[64]; int ok[64];
    for (int t = 0; t < nt; t++)
        tk[t] = (task_t){fn, ctx, units * t / nt * grain, MIN(units * (t + 1) / nt * grain, n)};
    for (int t = 1; t < nt; t++) ok[t] = pthread_create(&th[t], NULL, task_main, &tk[t]) == 0;
    task_main(&tk[0]);
    for (int t = 1; t < nt; t++) { if (ok[t]) pthread_join(th[t], NULL); else task_main(&tk[t]); }
}
#endif

/* ---- fp32 -> dtype (0 fp32, 1 bf16, 2 fp16), round to nearest even as torch does ---- */
INLINE uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
INLINE float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
INLINE uint16_t to_bf16(float f) {
    uint32_t u = f2u(f);
    return f != f ? 0x7fc0 : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
INLINE uint16_t to_fp16(float f) { /* the FP16 library's fp16_ieee_from_fp32_value, as c10 */
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t w = f2u(f), shl1_w = w + w, sign = w & 0x80000000u, bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = u2f((bias >> 1) + 0x07800000u) + base;
    uint32_t bits = f2u(base), nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}
INLINE void store1(void *out, i64 i, float v, int dt) {
    if (dt == 0) ((float *)out)[i] = v;
    else ((uint16_t *)out)[i] = dt == 1 ? to_bf16(v) : to_fp16(v);
}
#if LB_AVX512
INLINE __m256i half16(__m512 v, int dt) { /* 16 floats -> 16 bf16 (dt 1) or fp16 (dt 2) */
    if (dt == 2) return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                 _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), _mm512_set1_epi32(0x7fc0),
                                _mm512_srli_epi32(r, 16));
    return _mm512_cvtepi32_epi16(r);
}
INLINE void store16(void *out, i64 i, __m512 v, int dt) {
    if (dt == 0) _mm512_storeu_ps((float *)out + i, v);
    else _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), half16(v, dt));
}
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
void lb_dq4(const uint8_t *codes, const float *absmax, const uint8_t *qabs, const float *ncode, const float *nabs,
            float offset, i64 nbs, const float *table, i64 bs, i64 K, i64 n0, i64 nr, i64 k0, i64 kc, void *out,
            int dt, int nt) {
    int bsh = 0; /* blocksize is a power of two */
    while (((i64)1 << bsh) < bs) bsh++;
    dq4_t a = {codes, mk_scales(absmax, qabs, ncode, nabs, offset, nbs), table, bs, K, n0, k0, nr, kc, out, dt, bsh};
    parallel(dq4_range, &a, nr * ((kc + DQ_CHUNK - 1) / DQ_CHUNK), 1, nt);
}

/* quantize (formats.nf4.quantize_flat, bit for bit): per block absmax = max |x| (stored as d in a short last
   block), d = max(absmax, 1e-38),
   s = x * (1 / d) (x / d in a short last block), clamped to [-1, 1]; code order[#(bounds < s)]; element 2i
   in the high nibble of byte i; an odd tail is padded with the code of 0. x: fp32, bf16 or fp16 (dt). */
INLINE float from_fp16(uint16_t h) { /* the FP16 library's fp16_ieee_to_fp32_value, as c10 */
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = u2f((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
    return u2f(sign | (two_w < (1u << 27) ? f2u(denormalized) : f2u(normalized)));
}
INLINE float load_any(const void *x, int dt, i64 i) {
    if (dt == 0) return ((const float *)x)[i];
    uint16_t h = ((const uint16_t *)x)[i];
    return dt == 1 ? u2f((uint32_t)h << 16) : from_fp16(h);
}
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
void lb_q4(const void *x, int dt, i64 n, i64 bs, const float *bounds, int nbounds, const uint8_t *order,
           uint8_t *packed, float *absmax, int nt) {
    q4_t a = {x, dt, nbounds, n, bs, bounds, order, packed, absmax};
    parallel(q4_range, &a, (n + bs - 1) / bs, MAX(1, 65536 / bs), nt);
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
void lb_mv4(const float *x, i64 M, i64 K, const uint8_t *codes, const float *absmax, const uint8_t *qabs,
            const float *ncode, const float *nabs, float offset, i64 nbs, const float *table, i64 bs, i64 N,
            float *y, int nt) {
    i64 kt = MIN(256 * bs, MAX(bs, (8192 / MIN(M, 4)) / bs * bs)); /* x tile <= 32 KiB, <= 256 blocks */
    mv4_t a = {x, M, K, kt, codes, mk_scales(absmax, qabs, ncode, nabs, offset, nbs), table, bs, N, y};
#if LB_AVX512
    float *xd = (float *)malloc(sizeof(float) * M * K);
    for (i64 i = 0; i < M * K; i += 32)
        for (int l = 0; l < 16; l++) { xd[i + l] = x[i + 2 * l]; xd[i + 16 + l] = x[i + 2 * l + 1]; }
    a.x = xd;
#endif
    parallel(mv4_range, &a, N, 8, nt);
#if LB_AVX512
    free(xd);
#endif
}

/* fused gx[m, k] = sum_n g[m, n] w[n, k] (the input gradient), fp32, rows of whole blocks. Threads own
   column ranges; each walks all rows for a tile of columns held in L1, summing 64 rows at a time before
   adding to the tile's total (two-level summation). w = table * scale is rounded as the reference rounds it. */
typedef struct {
    const float *g; i64 M, N, kt; const uint8_t *codes; scales_t sc; const float *table; i64 bs, K; float *gx;
} mv4t_t;
static void mv4t_range(const void *p, i64 c0, i64 c1) {
    const mv4t_t *a = (const mv4t_t *)p;
    const i64 K = a->K, bs = a->bs, nb = K / bs, M = a->M, kt = a->kt;
    float *tot = (float *)malloc(sizeof(float) * M * kt * 2), *part = tot + M * kt;
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
void lb_mv4t(const float *g, i64 M, i64 N, const uint8_t *codes, const float *absmax, const uint8_t *qabs,
             const float *ncode, const float *nabs, float offset, i64 nbs, const float *table, i64 bs, i64 K,
             float *gx, int nt) {
    i64 kt = MAX(bs, (2048 / M) / bs * bs);
    mv4t_t a = {g, M, N, kt, codes, mk_scales(absmax, qabs, ncode, nabs, offset, nbs), table, bs, K, gx};
    parallel(mv4t_range, &a, K, kt, nt);
}

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
/* x (M rows of K) with each span's values in the kernels' order */
static float *qperm_rows(const float *x, i64 M, i64 K, int bits, int blk) {
    const int span = blk ? 128 : 32;
    int perm[128];
    for (int j = 0; j < span; j++) perm[j] = qspan_code(bits, blk, j);
    float *xd = (float *)malloc(sizeof(float) * M * K);
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
void lb_dqi(const int32_t *codes, const float *scale, const uint8_t *zeros, int bits, i64 L, i64 N, i64 K,
            i64 n0, i64 nr, i64 k0, i64 kc, void *out, int dt, int nt) {
    dqi_t a = {{codes, scale, zeros, bits, L, N, K}, n0, k0, kc, out, dt};
    parallel(dqi_range, &a, nr, MAX(1, 16384 / kc), nt);
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
void lb_mvi(const float *x, i64 M, const int32_t *codes, const float *scale, const uint8_t *zeros, int bits, i64 L,
            i64 N, i64 K, float *y, int nt) {
    /* whole quads (q3blk) need every group boundary, a ragged last group's end K included, on a quad */
    const int blk = LB_AVX512 && bits == 3 && L % 128 == 0 && K % 128 == 0;
    mvi_t a = {x, M, MAX(128, (8192 / MIN(M, 4)) / 128 * 128), {codes, scale, zeros, bits, L, N, K}, y, blk};
#if LB_AVX512
    float *xd = qperm_rows(x, M, K, bits, blk);
    a.x = xd;
#endif
    parallel(mvi_range, &a, N, 8, nt);
#if LB_AVX512
    free(xd);
#endif
}

/* fused gx[m, k] = sum_n g[m, n] W[n, k]: as lb_mv4t (column tiles, two-level sums); AVX-512: the tile's columns
   in qperm order, put back in order at the end */
typedef struct { const float *g; i64 M, kt; qint_t q; float *gx; int blk; } mvit_t;
INLINE void mvit_cols(const mvit_t *a, const int bits, i64 c0, i64 c1) {
    const qint_t *q = &a->q;
    const i64 K = q->K, L = q->L, G = qgroups(K, L), M = a->M, kt = a->kt, nch = K / 32;
    float *tot = (float *)malloc(sizeof(float) * M * kt * 2), *part = tot + M * kt;
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
void lb_mvit(const float *g, i64 M, const int32_t *codes, const float *scale, const uint8_t *zeros, int bits, i64 L,
             i64 N, i64 K, float *gx, int nt) {
    const int blk = LB_AVX512 && bits == 3 && L % 128 == 0 && K % 128 == 0, span = blk ? 128 : 32;
    mvit_t a = {g, M, MAX(span, (2048 / M) / span * span), {codes, scale, zeros, bits, L, N, K}, gx, blk};
    parallel(mvit_range, &a, K, a.kt, nt);
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
void lb_rdi(const float *d, const int32_t *codes, const uint8_t *zeros, int bits, i64 L, i64 N, i64 K, i64 n0,
            i64 nr, float *out, int nt) {
    rdi_t a = {d, {codes, NULL, zeros, bits, L, N, K}, n0, out};
    parallel(rdi_range, &a, nr, 8, nt);
}

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
/* out[numel] (dt) from an SZ v2 stream; then out[oidx[k]] = ovals[k] (already in dt). err[3]: err[0] = 0 ok,
   1 lane err[1] ends at bit err[2] instead of its recorded length (the first such lane), 2 a table entry longer
   than 14 bits (not decoded), 3 outlier index err[1] outside [0, numel), 4 lane err[1] starts at bit err[2],
   outside the payload (not decoded). */
void lb_szd(const int32_t *payload, i64 nwords, const void *start, int s64, const int16_t *table, int max_len,
            float step, i64 radius, i64 numel, i64 chunk, i64 lanes, const int64_t *oidx, const void *ovals,
            i64 nout, void *out, int dt, int nt, int64_t *err) {
    const i64 nwin = (i64)1 << max_len, n_lanes = (numel + chunk - 1) / chunk * lanes;
    err[0] = err[1] = err[2] = 0;
    for (i64 l = 0; l <= n_lanes; l++) { /* so that no position below can overflow */
        const i64 s = s64 ? ((const int64_t *)start)[l] : (i64)((const int32_t *)start)[l];
        if (s < 0 || s > nwords * 32) { err[0] = 4; err[1] = l; err[2] = s; return; }
    }
    void *tab = malloc(nwin * (dt == 0 ? 8 : 4));
    if (!tab) { err[0] = 2; return; }
    int longest = 0;
    for (i64 w = 0; w < nwin; w++) {
        const uint32_t e = (uint16_t)table[w], ln = e & 15;
        const float v = (float)((i64)(e >> 4) - radius) * step;
        longest = MAX(longest, (int)ln);
        if (dt == 0) ((uint64_t *)tab)[w] = (uint64_t)f2u(v) << 32 | ln;
        else ((uint32_t *)tab)[w] = (uint32_t)(dt == 1 ? to_bf16(v) : to_fp16(v)) << 16 | ln;
    }
    if (longest > 14) { free(tab); err[0] = 2; return; }
    szd_t a = {(const uint8_t *)payload, nwords * 4, start, s64, tab, dt == 0, numel, chunk, lanes,
               (uint64_t)nwin - 1, out, dt, PTHREAD_MUTEX_INITIALIZER, -1, 0};
    parallel(szd_range, &a, n_lanes, 8, nt); /* whole octets per thread */
    free(tab);
    pthread_mutex_destroy(&a.mu);
    if (a.bad_lane >= 0) { err[0] = 1; err[1] = a.bad_lane; err[2] = a.bad_end; return; }
    const int esz = dt == 0 ? 4 : 2;
    for (i64 k = 0; k < nout; k++) {
        const i64 i = oidx[k];
        if (i < 0 || i >= numel) { err[0] = 3; err[1] = i; return; }
        memcpy((char *)out + i * esz, (const char *)ovals + k * esz, esz);
    }
}
