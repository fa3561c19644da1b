// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * probe - for every CPU feature conode knows of, say whether CPUID advertises
 * it and whether an instruction of that feature executes (or raises SIGILL),
 * and print what it computed on fixed inputs.  One line per feature:
 *
 *     name advertised executed result
 *
 * Build: gcc -m32 -static -O1 -o probe probe.c
 */
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static sigjmp_buf escape;

static void on_fault(int sig)
{
	siglongjmp(escape, sig);
}

static void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static uint32_t max_leaf, max_ext;

static int advertised(uint32_t leaf, int reg, int bit)
{
	uint32_t r[4];

	if ((leaf < 0x80000000u && leaf > max_leaf) || (leaf >= 0x80000000u && leaf > max_ext))
		return 0;
	cpuid(leaf, 0, r);
	return (r[reg] >> bit) & 1;
}

static uint8_t in_a[16] __attribute__((aligned(16))) = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
static uint8_t in_b[16] __attribute__((aligned(16))) = {200, 3, 99, 7, 0, 255, 16, 33, 1, 1, 2, 3, 5, 8, 13, 21};
static uint8_t out[16] __attribute__((aligned(16)));
static uint8_t area[512] __attribute__((aligned(16)));

static uint32_t t_cmov(void) { uint32_t a = 1, b = 7; __asm__ volatile("cmp %1, %1; cmove %1, %0" : "+r"(a) : "r"(b)); return a; }
static uint32_t t_cx8(void) { uint64_t m = 5; uint32_t lo = 5, hi = 0; __asm__ volatile("lock cmpxchg8b %0" : "+m"(m), "+a"(lo), "+d"(hi) : "b"(9), "c"(0)); return (uint32_t)m; }
static uint32_t t_tsc(void) { uint32_t lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return 1; }
static uint32_t t_mmx(void) { uint32_t r; __asm__ volatile("movd %1, %%mm0; paddb %%mm0, %%mm0; movd %%mm0, %0; emms" : "=r"(r) : "r"(0x01020304)); return r; }
static uint32_t t_fxsr(void) { __asm__ volatile("fxsave %0" : "=m"(area)); return 1; }
static uint32_t t_clflush(void) { __asm__ volatile("clflush %0" : "+m"(area[0])); return 1; }
static uint32_t t_sse(void) { __asm__ volatile("movaps %1, %%xmm0; xorps %2, %%xmm0; movaps %%xmm0, %0" : "=m"(out) : "m"(in_a), "m"(in_b)); return out[0] | out[15] << 8; }
static uint32_t t_sse2(void) { __asm__ volatile("movdqa %1, %%xmm0; paddq %2, %%xmm0; movdqa %%xmm0, %0" : "=m"(out) : "m"(in_a), "m"(in_b)); return out[0] | out[8] << 8; }
static uint32_t t_sse3(void) { __asm__ volatile("movdqa %1, %%xmm0; movdqa %2, %%xmm1; haddps %%xmm1, %%xmm0; movdqa %%xmm0, %0" : "=m"(out) : "m"(in_a), "m"(in_b)); return out[0] | out[15] << 8; }
static uint32_t t_ssse3(void) { __asm__ volatile("movdqa %1, %%xmm0; pshufb %2, %%xmm0; movdqa %%xmm0, %0" : "=m"(out) : "m"(in_a), "m"(in_b)); return out[0] | out[7] << 8; }
static uint32_t t_sse41(void) { __asm__ volatile("movdqa %1, %%xmm0; pminsd %2, %%xmm0; movdqa %%xmm0, %0" : "=m"(out) : "m"(in_a), "m"(in_b)); return out[0] | out[12] << 8; }
static uint32_t t_sse42(void) { uint32_t c = 0xffffffff; __asm__ volatile("crc32l %1, %0" : "+r"(c) : "r"(0x12345678)); return c; }
static uint32_t t_popcnt(void) { uint32_t r; __asm__ volatile("popcnt %1, %0" : "=r"(r) : "r"(0xf0f0f00f)); return r; }
static uint32_t t_movbe(void) { uint32_t r, m = 0x11223344; __asm__ volatile("movbe %1, %0" : "=r"(r) : "m"(m)); return r; }
static uint32_t t_aes(void) { __asm__ volatile("movdqa %1, %%xmm0; aesenc %2, %%xmm0; movdqa %%xmm0, %0" : "=m"(out) : "m"(in_a), "m"(in_b)); return out[0] | out[15] << 8; }
static uint32_t t_pclmul(void) { __asm__ volatile("movdqa %1, %%xmm0; pclmulqdq $0, %2, %%xmm0; movdqa %%xmm0, %0" : "=m"(out) : "m"(in_a), "m"(in_b)); return out[0] | out[5] << 8; }
static uint32_t t_rdrand(void) { uint32_t r; __asm__ volatile("rdrand %0" : "=r"(r)); return 1; }
static uint32_t t_avx(void) { __asm__ volatile("vxorps %%xmm0, %%xmm0, %%xmm0" ::: "memory"); return 1; }
static uint32_t t_bmi1(void) { uint32_t r; __asm__ volatile("andn %2, %1, %0" : "=r"(r) : "r"(0xff00ff00), "r"(0x0ff00ff0)); return r; }
static uint32_t t_bmi2(void) { uint32_t r; __asm__ volatile("pdep %2, %1, %0" : "=r"(r) : "r"(0x12345678), "r"(0x0f0f0f0f)); return r; }
static uint32_t t_adx(void) { uint32_t r = 5; __asm__ volatile("stc; adcx %1, %0" : "+r"(r) : "r"(7)); return r; }
static uint32_t t_lzcnt(void) { uint32_t r; __asm__ volatile("lzcnt %1, %0" : "=r"(r) : "r"(0x00f00000)); return r; }
static uint32_t t_sha(void) { __asm__ volatile("movdqa %1, %%xmm0; sha1msg1 %2, %%xmm0; movdqa %%xmm0, %0" : "=m"(out) : "m"(in_a), "m"(in_b)); return out[0]; }
static uint32_t t_sysenter(void) { return 1; }  /* advertised only: executing it needs the kernel's MSRs */

struct feature {
	const char *name;
	uint32_t leaf;
	int reg;        /* 0 eax, 1 ebx, 2 ecx, 3 edx */
	int bit;
	uint32_t (*test)(void);
	int probe;      /* execute the instruction? */
};

static const struct feature features[] = {
	{"tsc", 1, 3, 4, t_tsc, 1},
	{"cx8", 1, 3, 8, t_cx8, 1},
	{"sep", 1, 3, 11, t_sysenter, 0},
	{"cmov", 1, 3, 15, t_cmov, 1},
	{"clflush", 1, 3, 19, t_clflush, 1},
	{"mmx", 1, 3, 23, t_mmx, 1},
	{"fxsr", 1, 3, 24, t_fxsr, 1},
	{"sse", 1, 3, 25, t_sse, 1},
	{"sse2", 1, 3, 26, t_sse2, 1},
	{"sse3", 1, 2, 0, t_sse3, 1},
	{"pclmulqdq", 1, 2, 1, t_pclmul, 1},
	{"ssse3", 1, 2, 9, t_ssse3, 1},
	{"sse4_1", 1, 2, 19, t_sse41, 1},
	{"sse4_2", 1, 2, 20, t_sse42, 1},
	{"movbe", 1, 2, 22, t_movbe, 1},
	{"popcnt", 1, 2, 23, t_popcnt, 1},
	{"aes", 1, 2, 25, t_aes, 1},
	{"avx", 1, 2, 28, t_avx, 1},
	{"rdrand", 1, 2, 30, t_rdrand, 1},
	{"bmi1", 7, 1, 3, t_bmi1, 1},
	{"bmi2", 7, 1, 8, t_bmi2, 1},
	{"adx", 7, 1, 19, t_adx, 1},
	{"sha_ni", 7, 1, 29, t_sha, 1},
	{"lzcnt", 0x80000001u, 2, 5, t_lzcnt, 1},
};

int main(void)
{
	uint32_t r[4];
	struct sigaction sa;
	char vendor[13];

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_fault;
	sigaction(SIGILL, &sa, NULL);
	sigaction(SIGSEGV, &sa, NULL);
	cpuid(0, 0, r);
	max_leaf = r[0];
	memcpy(vendor, &r[1], 4);
	memcpy(vendor + 4, &r[3], 4);
	memcpy(vendor + 8, &r[2], 4);
	vendor[12] = 0;
	cpuid(0x80000000u, 0, r);
	max_ext = r[0];
	printf("vendor %s\n", vendor);
	for (size_t i = 0; i < sizeof(features) / sizeof(features[0]); i++) {
		const struct feature *f = &features[i];
		int adv = advertised(f->leaf, f->reg, f->bit);
		volatile int sig;
		volatile uint32_t result = 0;

		if (!f->probe) {
			printf("%s %d - -\n", f->name, adv);
			continue;
		}
		sig = sigsetjmp(escape, 1);
		if (sig == 0)
			result = f->test();
		printf("%s %d %d %08x\n", f->name, adv, sig == 0, sig == 0 ? result : 0);
	}
	return 0;
}
