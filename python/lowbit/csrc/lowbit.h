/* lowbit.h: what every CPU kernel file of lowbit (the .c files beside this one) shares; docs/cpu.md.

   Build. lowbit/_clib.py compiles every .c file of this folder, each its own translation unit, into one shared
   library, once per machine (cached on disk under a hash of these sources, the compiler and the CPU's flags):
       cc -O3 -std=gnu11 -ffp-contract=off -fPIC -shared -pthread -march=native -fopenmp common.c intq.c ... -lm
   -march=native and -fopenmp are dropped in turn when the compiler refuses them; the tests also build -DLB_GENERIC
   (the plain-C kernels) and -mno-gfni. -ffp-contract=off: products and sums round as written, so quantize and
   dequantize are bit-identical to the pure-torch reference in lowbit.formats (fp32 arithmetic, then round to nearest
   even); the matmuls accumulate in fp32. Plain C, plus AVX-512 intrinsics where the compiler targets them
   (LB_AVX512). A family's file includes this header and nothing from another family's file: a new family adds its
   own .c file here and changes no other C file.

   Exported symbols. Every non-static function whose name starts with lb_ is an entry point that Python calls
   through ctypes. Each is declared once in Python, by lowbit._clib.bind() in the module of the family that calls
   it (lowbit._cpu: the 4-bit LUT and integer families and the SZ decoder; lowbit.formats._sz_encode: the SZ
   encoder; lowbit._clib: the probes), with the same parameter names and types in the same order;
   tests/test_c_bindings.py parses the definitions in these files and fails when the two differ, and when the
   library exports anything else. Everything else is static, or hidden (parallel()).

   Return codes. Every entry point returns int: LB_OK, or LB_ENOMEM when an allocation failed (the outputs are then
   unspecified; lowbit._clib raises MemoryError naming the kernel). A kernel may add its own positive codes for
   invalid inputs, documented at its definition (lb_szd). The probes lb_isa() and lb_openmp() return a flag instead.
   Allocate with lb_alloc(): NULL when count * size overflows as well as when malloc fails; a worker inside
   parallel() reports a failure with lb_fail(), into a status its entry point returns. */
#ifndef LOWBIT_H
#define LOWBIT_H
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

#define LB_OK 0
#define LB_ENOMEM (-1)

typedef int64_t i64;
#define INLINE static inline __attribute__((always_inline))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

/* count elements of size bytes, or NULL (count < 0, count * size overflows, malloc fails) */
static inline void *lb_alloc(i64 count, size_t size) {
    size_t bytes;
    if (count < 0 || __builtin_mul_overflow((size_t)count, size, &bytes)) return NULL;
    return malloc(bytes ? bytes : 1);
}
/* a worker's failure, for its entry point to return (the last one written wins; any is an error) */
INLINE void lb_fail(int *status, int code) { __atomic_store_n(status, code, __ATOMIC_RELAXED); }

/* ---- threads (common.c): fn(ctx, lo, hi) over [0, n) in nt contiguous ranges, multiples of grain ----
   With OpenMP (-fopenmp): torch's own OpenMP runtime, already loaded under the same soname, so that lowbit and
   torch's BLAS share one pool of workers (two pools would fight: libgomp's idle workers spin for milliseconds
   after every torch op). Without: pthreads started per call, the calling thread runs the first range. */
typedef void (*range_fn)(const void *ctx, i64 lo, i64 hi);
__attribute__((visibility("hidden"))) void parallel(range_fn fn, const void *ctx, i64 n, i64 grain, int nt);

/* ---- fp32 <-> dtype (0 fp32, 1 bf16, 2 fp16), round to nearest even as torch does ---- */
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
#endif
#endif
