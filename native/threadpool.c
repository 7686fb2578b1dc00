/* Persistent worker pool. Workers are created once (first use or gr_threads_set) and wait for a new
 * "generation" of work: they spin briefly, because a model issues matmuls back to back with only
 * microseconds of Python between them, then sleep on a condition variable so an idle process costs
 * nothing. The calling thread always takes part as thread 0.
 *
 * Two kinds of task. gr_pool_run: every thread runs the task exactly once (tasks may partition work
 * statically by ith/nth), so the caller waits for every worker. gr_pool_run_dynamic: the task claims
 * work from a shared counter, so the caller, once it has run out of work, closes the task and waits
 * only for the workers that joined; a worker that was not scheduled in time (another process owns the
 * core) skips it instead of holding the whole call up for a scheduler time slice. On a loaded machine
 * that is the difference between a decode step of 25 ms and one of 250 ms.
 *
 * Concurrency contract: runs are serialised by run_mutex (dispatch.c and ops.c each hold their own
 * API mutex, so both may call in from different Python threads).
 */
#define _GNU_SOURCE
#include "threadpool.h"
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

/* How long a waiting thread spins before it sleeps. Within a decode step the native calls come
 * microseconds apart, but between steps there are a step's sampling, detokenization and (with MTP) its
 * acceptance and bookkeeping: 0.1-0.3 ms of Python. A worker asleep by then is woken through the kernel
 * (a futex wake the caller pays for, and in a VM a halted vCPU to resume), and the first calls of the
 * next step run without it: with split verify batches (dispatch.c) a whole piece. Spinning through that
 * gap (1 ms against 0.1 ms; five A/Bs of 10 held-out prompts x 128 tokens x 8 rounds alternating in one
 * process, trained MTP model, bench/mtp_threads_ab.py: plain +1-7%, MTP k = 3 +4-10%) keeps the worker
 * there for the whole generation; past it, the process is idle or busy elsewhere and a spinning worker
 * only takes a core from whoever else needs it (another process, or a llama.cpp in this one). The
 * caller never waits for a sleeping worker (dynamic tasks), so a late wake-up costs one call's
 * parallelism, not latency.
 * Measured by the clock, not pause counts: a pause is ~10 ns on some cores and ~140 ns on others.
 * GGUFRUN_SPIN_US overrides the default (0: sleep at once); gr_pool_spin_us sets it at run time. */
#define SPIN_US_DEFAULT 1000
#define SPIN_CHECK_EVERY 64    /* pauses between clock reads (a read costs 20-110 ns) */
static _Atomic int64_t spin_ns = -1;   /* set by spin_init_locked (GGUFRUN_SPIN_US) or gr_pool_spin_us */

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Spin until cond(arg) is false or the spin budget is spent; returns whether it still holds. */
static int spin_while(int (*cond)(const void *), const void *arg) {
    if (!cond(arg)) return 0;
    if (spin_ns <= 0) return 1;
    const int64_t end = now_ns() + spin_ns;
    for (;;) {
        for (int i = 0; i < SPIN_CHECK_EVERY; i++) {
            if (!cond(arg)) return 0;
            cpu_relax();
        }
        if (now_ns() >= end) return cond(arg);
    }
}

static pthread_mutex_t run_mutex = PTHREAD_MUTEX_INITIALIZER;  /* one run (or resize) at a time */
static pthread_mutex_t pool_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work_cv = PTHREAD_COND_INITIALIZER;
static pthread_cond_t done_cv = PTHREAD_COND_INITIALIZER;
static atomic_uint generation;
static atomic_int pending;       /* static task: workers still to finish it */
static atomic_int active;        /* dynamic task: workers inside it */
static atomic_uint open_gen;     /* dynamic task: the generation workers may still join, 0 when closed */
static int stopping;
static _Atomic(gr_task_fn) task_fn;
static _Atomic(void *) task_ctx;
static atomic_int task_dynamic;
static pthread_t *workers;
static int n_threads;            /* 0: pool not created yet */
/* Set while this thread runs its share of a token-split task (gr_pool_run_split): the calls it makes
 * then run on it alone, without the pool (whose run this is) or the API mutexes (which the task's caller
 * holds for all of it). */
static _Thread_local int in_split;

static void signal_done(void) {
    pthread_mutex_lock(&pool_mutex);
    pthread_cond_signal(&done_cv);
    pthread_mutex_unlock(&pool_mutex);
}

typedef struct { int index; unsigned start_generation; } worker_arg;

static int generation_is(const void *seen) { return atomic_load(&generation) == *(const unsigned *)seen; }
static int positive(const void *counter) { return atomic_load((atomic_int *)counter) > 0; }

static void *worker_main(void *p) {
    worker_arg arg = *(worker_arg *)p;
    free(p);
    unsigned seen = arg.start_generation;
    for (;;) {
        if (spin_while(generation_is, &seen)) {
            pthread_mutex_lock(&pool_mutex);
            while (atomic_load(&generation) == seen) pthread_cond_wait(&work_cv, &pool_mutex);
            pthread_mutex_unlock(&pool_mutex);
        }
        unsigned g = atomic_load(&generation);
        seen = g;
        if (stopping) return NULL;
        gr_task_fn fn = atomic_load(&task_fn);
        void *ctx = atomic_load(&task_ctx);
        int dynamic = atomic_load(&task_dynamic);
        /* The fields belong to generation g only if no newer run began while we read them; a static
         * run cannot end (and so no newer one begin) without this worker. */
        if (atomic_load(&generation) != g) { seen = g - 1; continue; }
        if (!dynamic) {
            fn(ctx, arg.index, n_threads);
            if (atomic_fetch_sub(&pending, 1) == 1) signal_done();
            continue;
        }
        /* Join only while the caller still accepts workers for generation g; once inside, the caller
         * waits for us, so ctx stays valid. */
        atomic_fetch_add(&active, 1);
        if (atomic_load(&open_gen) == g) fn(ctx, arg.index, n_threads);
        if (atomic_fetch_sub(&active, 1) == 1) signal_done();
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

/* spin_ns from GGUFRUN_SPIN_US (or the default) on first use; run_mutex held */
static void spin_init_locked(void) {
    if (spin_ns < 0) {
        const char *e = getenv("GGUFRUN_SPIN_US");
        long us = e && *e ? strtol(e, NULL, 10) : SPIN_US_DEFAULT;
        spin_ns = us < 0 ? 0 : (int64_t)us * 1000;
    }
}

static int pool_set_locked(int n) {
    pthread_once(&atfork_once, register_atfork);
    spin_init_locked();
    if (n <= 0) n = gr_physical_cores();
    if (n > 256) n = 256;
    if (n == n_threads) return n_threads;
    pool_stop();
    return pool_start(n);
}

int gr_pool_set(int n) {
    pthread_mutex_lock(&run_mutex);
    int r = pool_set_locked(n);
    pthread_mutex_unlock(&run_mutex);
    return r;
}

int gr_pool_threads(void) {
    if (in_split) return 1;
    pthread_mutex_lock(&run_mutex);
    if (n_threads == 0) pool_set_locked(0);
    int r = n_threads;
    pthread_mutex_unlock(&run_mutex);
    return r;
}

static void wait_for_zero(atomic_int *counter) {
    if (spin_while(positive, counter)) {
        pthread_mutex_lock(&pool_mutex);
        while (atomic_load(counter) > 0) pthread_cond_wait(&done_cv, &pool_mutex);
        pthread_mutex_unlock(&pool_mutex);
    }
}

static void pool_run(gr_task_fn fn, void *ctx, int max_threads, int dynamic) {
    if (in_split) {
        fn(ctx, 0, 1);
        return;
    }
    pthread_mutex_lock(&run_mutex);
    if (n_threads == 0) pool_set_locked(0);
    int nth = n_threads;
    if (max_threads < 1) max_threads = 1;
    if (nth == 1 || max_threads == 1) {
        pthread_mutex_unlock(&run_mutex);
        fn(ctx, 0, 1);
        return;
    }
    /* Work split always covers all pool threads; a task that wants fewer simply gets empty shares via
     * its own partitioning. max_threads == 1 is the only shortcut (tiny problems, no wake-up cost). */
    atomic_store(&task_fn, fn);
    atomic_store(&task_ctx, ctx);
    atomic_store(&task_dynamic, dynamic);
    if (!dynamic) atomic_store(&pending, nth - 1);
    pthread_mutex_lock(&pool_mutex);
    unsigned g = atomic_fetch_add(&generation, 1) + 1;
    if (dynamic) atomic_store(&open_gen, g);
    pthread_cond_broadcast(&work_cv);
    pthread_mutex_unlock(&pool_mutex);
    fn(ctx, 0, nth);
    if (dynamic) {
        atomic_store(&open_gen, 0);  /* all work is claimed: late workers need not join */
        wait_for_zero(&active);
    } else {
        wait_for_zero(&pending);
    }
    pthread_mutex_unlock(&run_mutex);
}

void gr_pool_run(gr_task_fn fn, void *ctx, int max_threads) { pool_run(fn, ctx, max_threads, 0); }

int gr_pool_in_split(void) { return in_split; }

void gr_lock_unless_split(pthread_mutex_t *m) {
    if (!in_split) pthread_mutex_lock(m);
}

void gr_unlock_unless_split(pthread_mutex_t *m) {
    if (!in_split) pthread_mutex_unlock(m);
}

int gr_pool_spin_us(int us) {
    pthread_mutex_lock(&run_mutex);
    spin_init_locked();   /* reading or setting the spin starts no threads */
    int old = (int)(atomic_load(&spin_ns) / 1000);
    if (us >= 0) atomic_store(&spin_ns, (int64_t)us * 1000);
    pthread_mutex_unlock(&run_mutex);
    return old;
}

typedef struct { gr_task_fn fn; void *ctx; } split_task;

static void run_split(void *p, int ith, int nth) {
    const split_task *s = p;
    const int outer = in_split;
    in_split = 1;
    s->fn(s->ctx, ith, nth);
    in_split = outer;
}

void gr_pool_run_split(gr_task_fn fn, void *ctx) {
    split_task s = {fn, ctx};
    pool_run(run_split, &s, 256, 1);
}
void gr_pool_run_dynamic(gr_task_fn fn, void *ctx, int max_threads) { pool_run(fn, ctx, max_threads, 1); }
