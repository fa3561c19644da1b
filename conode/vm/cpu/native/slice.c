// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * Slice control for conode's cooperative machine.
 *
 * The host runs the guest CPU in slices and must get the CPU back at a deadline, on request from another
 * thread (the owner came back), or as soon as the guest re-enables interrupts while one is pending.
 * Unicorn's own timeout stops the guest at unsafe points and its instruction count is slow, so the slice is
 * ended from a block hook, i.e. always at a translation-block boundary.  The hook runs once per executed
 * block, so it is written in C: a Python hook would cost more than the block it guards.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unicorn/unicorn.h>

enum slice_stop {
    SLICE_RUNNING = 0,
    SLICE_DEADLINE = 1,
    SLICE_REQUEST = 2,
    SLICE_IRQ_WINDOW = 3,
};

/* Shared with Python through ctypes: keep in step with conode/vm/cpu/slicer.py. */
struct conode_slice {
    int64_t deadline_ns;    /* CLOCK_MONOTONIC; the slice ends at the first block boundary after it */
    int32_t stop_request;   /* set from any thread: end the slice at the next block boundary */
    int32_t wait_for_if;    /* an interrupt is pending: end the slice once EFLAGS.IF is set */
    int32_t countdown;      /* blocks left until the clock is read again */
    int32_t reason;         /* enum slice_stop: why the hook ended this slice */
    uint64_t blocks;        /* blocks executed, for statistics */
};

/* Reading the clock costs ~20 ns; a block costs tens of ns.  Every 16th block keeps the overhead small
 * while the slice still ends within a few microseconds of its deadline. */
#define CLOCK_EVERY 16
#define EFLAGS_IF 0x200u

static void slice_stop(uc_engine *uc, struct conode_slice *s, int reason)
{
    s->reason = reason;
    uc_emu_stop(uc);
}

static void on_block(uc_engine *uc, uint64_t address, uint32_t size, void *opaque)
{
    struct conode_slice *s = opaque;
    (void)address;
    (void)size;

    s->blocks++;
    if (s->reason != SLICE_RUNNING)
        return;
    if (__atomic_load_n(&s->stop_request, __ATOMIC_RELAXED)) {
        slice_stop(uc, s, SLICE_REQUEST);
        return;
    }
    if (s->wait_for_if) {
        uint32_t eflags = 0;
        uc_reg_read(uc, UC_X86_REG_EFLAGS, &eflags);
        if (eflags & EFLAGS_IF) {
            slice_stop(uc, s, SLICE_IRQ_WINDOW);
            return;
        }
    }
    if (--s->countdown <= 0) {
        struct timespec ts;
        s->countdown = CLOCK_EVERY;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        if ((int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec >= s->deadline_ns)
            slice_stop(uc, s, SLICE_DEADLINE);
    }
}

int conode_slice_attach(uc_engine *uc, struct conode_slice *s, uc_hook *hook)
{
    return uc_hook_add(uc, hook, UC_HOOK_BLOCK, (void *)on_block, s, 1, 0);
}

/*
 * The deadline timer, for conode's engine: there, blocks check for an exit request only at their start, so
 * another thread may end a slice at any moment (uc_conode_kick) and no block hook is needed at all.  One
 * thread per CPU sleeps until the armed deadline, notes why, and kicks.
 */
typedef uc_err (*kick_fn)(uc_engine *uc);

struct conode_timer {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    pthread_t thread;
    int64_t deadline_ns;  /* 0: disarmed */
    int quit;
    uc_engine *uc;
    kick_fn kick;
    struct conode_slice *slice;
};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void *timer_main(void *opaque)
{
    struct conode_timer *t = opaque;

    pthread_mutex_lock(&t->lock);
    while (!t->quit) {
        if (t->deadline_ns == 0) {
            pthread_cond_wait(&t->cond, &t->lock);
            continue;
        }
        if (now_ns() >= t->deadline_ns) {
            t->deadline_ns = 0;
            t->slice->reason = SLICE_DEADLINE;
            t->kick(t->uc);
            continue;
        }
        struct timespec until = {t->deadline_ns / 1000000000LL, t->deadline_ns % 1000000000LL};
        pthread_cond_timedwait(&t->cond, &t->lock, &until);
    }
    pthread_mutex_unlock(&t->lock);
    return NULL;
}

struct conode_timer *conode_timer_start(uc_engine *uc, kick_fn kick, struct conode_slice *slice)
{
    struct conode_timer *t = calloc(1, sizeof(*t));
    pthread_condattr_t attr;

    if (t == NULL)
        return NULL;
    t->uc = uc;
    t->kick = kick;
    t->slice = slice;
    pthread_mutex_init(&t->lock, NULL);
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);  /* deadlines are CLOCK_MONOTONIC, like the host's */
    pthread_cond_init(&t->cond, &attr);
    pthread_condattr_destroy(&attr);
    if (pthread_create(&t->thread, NULL, timer_main, t) != 0) {
        free(t);
        return NULL;
    }
    return t;
}

void conode_timer_arm(struct conode_timer *t, int64_t deadline_ns)
{
    pthread_mutex_lock(&t->lock);
    t->deadline_ns = deadline_ns > 0 ? deadline_ns : 1;
    pthread_cond_signal(&t->cond);
    pthread_mutex_unlock(&t->lock);
}

void conode_timer_disarm(struct conode_timer *t)
{
    pthread_mutex_lock(&t->lock);
    t->deadline_ns = 0;
    pthread_mutex_unlock(&t->lock);
}

void conode_timer_stop(struct conode_timer *t)
{
    pthread_mutex_lock(&t->lock);
    t->quit = 1;
    pthread_cond_signal(&t->cond);
    pthread_mutex_unlock(&t->lock);
    pthread_join(t->thread, NULL);
    pthread_cond_destroy(&t->cond);
    pthread_mutex_destroy(&t->lock);
    free(t);
}
