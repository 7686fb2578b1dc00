/* Persistent worker pool. Workers are created once (first use or gr_threads_set) and wait for a new
 * "generation" of work: they spin briefly, because a model issues matmuls back to back with only
 * microseconds of Python between them, then sleep on a condition variable so an idle process costs
 * nothing. The calling thread always takes part as thread 0.
 *
 * Concurrency contract: one gr_pool_run at a time. dispatch.c serialises its entry points with a
 * mutex, so Python may call from any thread, but concurrent calls queue rather than overlap.
 */
#define _GNU_SOURCE
#include "threadpool.h"
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define SPIN_ITERATIONS 20000  /* roughly 0.1-1 ms depending on the pause latency */

static pthread_mutex_t pool_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work_cv = PTHREAD_COND_INITIALIZER;
static pthread_cond_t done_cv = PTHREAD_COND_INITIALIZER;
static atomic_uint generation;
static atomic_int pending;       /* workers still running the current task */
static int stopping;
static gr_task_fn task_fn;
static void *task_ctx;
static pthread_t *workers;
static int n_threads;            /* 0: pool not created yet */

typedef struct { int index; unsigned start_generation; } worker_arg;

static void *worker_main(void *p) {
    worker_arg arg = *(worker_arg *)p;
    free(p);
    unsigned seen = arg.start_generation;
    for (;;) {
        for (int spin = 0; spin < SPIN_ITERATIONS && atomic_load(&generation) == seen; spin++) cpu_relax();
        if (atomic_load(&generation) == seen) {
            pthread_mutex_lock(&pool_mutex);
            while (atomic_load(&generation) == seen) pthread_cond_wait(&work_cv, &pool_mutex);
            pthread_mutex_unlock(&pool_mutex);
        }
        seen = atomic_load(&generation);
        if (stopping) return NULL;
        task_fn(task_ctx, arg.index, n_threads);
        if (atomic_fetch_sub(&pending, 1) == 1) {
            pthread_mutex_lock(&pool_mutex);
            pthread_cond_signal(&done_cv);
            pthread_mutex_unlock(&pool_mutex);
        }
    }
}

static void pool_stop(void) {
    if (n_threads <= 1) { n_threads = 0; return; }
    pthread_mutex_lock(&pool_mutex);
    stopping = 1;
    atomic_fetch_add(&generation, 1);
    pthread_cond_broadcast(&work_cv);
    pthread_mutex_unlock(&pool_mutex);
    for (int i = 0; i < n_threads - 1; i++) pthread_join(workers[i], NULL);
    free(workers);
    workers = NULL;
    stopping = 0;
    n_threads = 0;
}

static int pool_start(int n) {
    n_threads = 1;
    if (n <= 1) return 1;
    workers = calloc((size_t)(n - 1), sizeof *workers);
    if (!workers) return 1;
    for (int i = 0; i < n - 1; i++) {
        worker_arg *arg = malloc(sizeof *arg);
        if (!arg) break;
        arg->index = i + 1;
        arg->start_generation = atomic_load(&generation);
        if (pthread_create(&workers[i], NULL, worker_main, arg) != 0) { free(arg); break; }
        n_threads++;
    }
    return n_threads;
}

/* A forked child inherits the pool's bookkeeping but not its threads; start afresh on next use. */
static void forget_pool_in_child(void) {
    workers = NULL;
    n_threads = 0;
    stopping = 0;
    atomic_store(&pending, 0);
    pthread_mutex_init(&pool_mutex, NULL);
    pthread_cond_init(&work_cv, NULL);
    pthread_cond_init(&done_cv, NULL);
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(NULL, NULL, forget_pool_in_child); }

/* Physical cores among the CPUs this process may run on: one per distinct SMT sibling set. */
int gr_physical_cores(void) {
    cpu_set_t allowed;
    int have_mask = sched_getaffinity(0, sizeof allowed, &allowed) == 0;
    char seen[256][32];
    int n_seen = 0, n_cpus = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE && n_seen < 256; cpu++) {
        if (have_mask && !CPU_ISSET(cpu, &allowed)) continue;
        char path[128], buf[32] = {0};
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/thread_siblings_list", cpu);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        if (!fgets(buf, sizeof buf, f)) buf[0] = 0;
        fclose(f);
        n_cpus++;
        int dup = 0;
        for (int i = 0; i < n_seen && !dup; i++) dup = strcmp(seen[i], buf) == 0;
        if (!dup) memcpy(seen[n_seen++], buf, sizeof buf);
    }
    if (n_seen > 0) return n_seen;
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    (void)n_cpus;
    return online > 0 ? (int)online : 1;
}

int gr_pool_set(int n) {
    pthread_once(&atfork_once, register_atfork);
    if (n <= 0) n = gr_physical_cores();
    if (n > 256) n = 256;
    if (n == n_threads) return n_threads;
    pool_stop();
    return pool_start(n);
}

int gr_pool_threads(void) {
    if (n_threads == 0) gr_pool_set(0);
    return n_threads;
}

void gr_pool_run(gr_task_fn fn, void *ctx, int max_threads) {
    int nth = gr_pool_threads();
    if (max_threads < 1) max_threads = 1;
    if (nth == 1 || max_threads == 1) { fn(ctx, 0, 1); return; }
    /* Work split always covers all pool threads; a task that wants fewer simply gets empty shares via
     * its own partitioning. max_threads == 1 is the only shortcut (tiny problems, no wake-up cost). */
    task_fn = fn;
    task_ctx = ctx;
    atomic_store(&pending, nth - 1);
    pthread_mutex_lock(&pool_mutex);
    atomic_fetch_add(&generation, 1);
    pthread_cond_broadcast(&work_cv);
    pthread_mutex_unlock(&pool_mutex);
    fn(ctx, 0, nth);
    for (int spin = 0; spin < SPIN_ITERATIONS && atomic_load(&pending) > 0; spin++) cpu_relax();
    if (atomic_load(&pending) > 0) {
        pthread_mutex_lock(&pool_mutex);
        while (atomic_load(&pending) > 0) pthread_cond_wait(&done_cv, &pool_mutex);
        pthread_mutex_unlock(&pool_mutex);
    }
}
