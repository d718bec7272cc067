/* What the families share at run time: the ISA and OpenMP probes, and parallel() (declared in lowbit.h, which
   says why it runs on torch's OpenMP workers). */
#include "lowbit.h"

int lb_isa(void) { return LB_AVX512; } /* 1: built with the AVX-512 kernels */
#ifdef _OPENMP
#include <omp.h>
int lb_openmp(void) { return 1; } /* 1: built with OpenMP (parallel() runs on its workers) */
void parallel(range_fn fn, const void *ctx, i64 n, i64 grain, int nt) {
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
void parallel(range_fn fn, const void *ctx, i64 n, i64 grain, int nt) {
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