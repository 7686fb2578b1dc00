/* Persistent thread pool used by dispatch.c; see threadpool.c for the concurrency contract. */
#ifndef GGUFRUN_THREADPOOL_H
#define GGUFRUN_THREADPOOL_H

#include <pthread.h>

/* Runs on every pool thread (ith = 0 is the caller) with the same ctx; partitions by ith/nth. */
typedef void (*gr_task_fn)(void *ctx, int ith, int nth);

int  gr_pool_set(int n);          /* n <= 0: physical cores; returns the thread count in effect */
int  gr_pool_threads(void);
void gr_pool_run(gr_task_fn fn, void *ctx, int max_threads);  /* max_threads == 1: caller only */
/* For tasks that claim their work from a shared counter until none is left, so any subset of the
 * threads (the caller alone included) completes them: workers that arrive after the caller has run
 * out of work skip the task, and the caller waits only for workers already inside it. */
void gr_pool_run_dynamic(gr_task_fn fn, void *ctx, int max_threads);
/* A dynamic task whose threads each take whole pieces of a batch (a few tokens' rows through a small
 * layer: the token split, dispatch.c): while a thread runs its share, every library call it makes runs
 * on it alone (gr_pool_threads() is 1, pool runs are inline) and skips the API mutexes, which the caller
 * must hold around the whole run (gr_split_rows); scratch buffers are per thread. */
void gr_pool_run_split(gr_task_fn fn, void *ctx);
int  gr_pool_in_split(void);
/* An API mutex taken (released) by an entry point, unless this thread runs a split piece, whose caller
 * holds it for the whole run. */
void gr_lock_unless_split(pthread_mutex_t *m);
void gr_unlock_unless_split(pthread_mutex_t *m);
int  gr_physical_cores(void);
int  gr_pool_spin_us(int us);   /* a waiting thread's spin before it sleeps (ggufrun.h) */

#endif
