/* Persistent thread pool used by dispatch.c; see threadpool.c for the concurrency contract. */
#ifndef GGUFRUN_THREADPOOL_H
#define GGUFRUN_THREADPOOL_H

/* Runs on every pool thread (ith = 0 is the caller) with the same ctx; partitions by ith/nth. */
typedef void (*gr_task_fn)(void *ctx, int ith, int nth);

int  gr_pool_set(int n);          /* n <= 0: physical cores; returns the thread count in effect */
int  gr_pool_threads(void);
void gr_pool_run(gr_task_fn fn, void *ctx, int max_threads);  /* max_threads == 1: caller only */
/* For tasks that claim their work from a shared counter until none is left, so any subset of the
 * threads (the caller alone included) completes them: workers that arrive after the caller has run
 * out of work skip the task, and the caller waits only for workers already inside it. */
void gr_pool_run_dynamic(gr_task_fn fn, void *ctx, int max_threads);
int  gr_physical_cores(void);

#endif
