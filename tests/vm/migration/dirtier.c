/* A job for migration: computes and writes memory, deterministically or at a set rate.
 *
 *   dirtier steps STEPS TOUCHES SPIN MIB   each step: SPIN rounds of arithmetic, then TOUCHES pages of a
 *                                          MIB-MiB buffer written; a line every STEPS/10 steps (deterministic)
 *   dirtier rate MIB_PER_S SECONDS MIB     writes MIB_PER_S MiB/s of pages of a MIB-MiB buffer for SECONDS
 *   dirtier cpu SECONDS                    arithmetic only, for SECONDS
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint32_t state = 12345;

static uint32_t next(void) {
    state = state * 1103515245u + 12345u;
    return state;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static uint32_t checksum(const uint32_t *words, size_t count) {
    uint32_t sum = 0;
    for (size_t i = 0; i < count; i += 1024) sum = sum * 31 + words[i];
    return sum;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 6 && !strcmp(argv[1], "steps")) {
        long steps = atol(argv[2]), touches = atol(argv[3]), spin = atol(argv[4]);
        size_t pages = (size_t)atol(argv[5]) << 8;
        uint32_t *buf = calloc(pages, 4096);
        for (long s = 1; s <= steps; s++) {
            for (long k = 0; k < spin; k++) next();
            for (long t = 0; t < touches; t++) {
                uint32_t v = next();
                buf[(size_t)(v >> 4) % pages * 1024 + (v & 1023)] += v;
            }
            if (s % (steps / 10 ? steps / 10 : 1) == 0)
                printf("step %ld state %08x memory %08x\n", s, state, checksum(buf, pages * 1024));
        }
        return 0;
    }
    if (argc == 5 && !strcmp(argv[1], "rate")) {
        double rate = atof(argv[2]) * 256, seconds = atof(argv[3]);  /* pages per second */
        size_t pages = (size_t)atol(argv[4]) << 8;
        uint32_t *buf = calloc(pages, 4096);
        double start = now(), t;
        long written = 0;
        while ((t = now() - start) < seconds) {
            for (; written < (long)(t * rate); written++) buf[(size_t)written % pages * 1024 + (next() & 1023)] = state;
        }
        printf("wrote %ld pages\n", written);
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "cpu")) {
        double start = now(), seconds = atof(argv[2]);
        long rounds = 0;
        while (now() - start < seconds) {
            for (int k = 0; k < 100000; k++) next();
            rounds++;
        }
        printf("computed %ld rounds\n", rounds);
        return 0;
    }
    fprintf(stderr, "usage: dirtier steps STEPS TOUCHES SPIN MIB | rate MIB_PER_S SECONDS MIB | cpu SECONDS\n");
    return 2;
}
