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
#include <stdint.h>
#include <time.h>
#include <unicorn/unicorn.h>

enum slice_stop {
    SLICE_RUNNING = 0,
    SLICE_DEADLINE = 1,
    SLICE_REQUEST = 2,
    SLICE_IRQ_WINDOW = 3,
};

/* Shared with Python through ctypes: keep in step with conode/vm/slicer.py. */
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
