// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * nofpu - what a program does on a CPU that may lack the FPU, MMX and SSE, printed so that the output is the
 * same wherever it runs: glibc's string functions over many sizes and alignments, FCOMI and FCMOVcc (P6 x87
 * instructions the kernel's math emulator must know), and an SSE2 sum taken only when CPUID says SSE2
 * (otherwise the same sum in plain C).
 * Build: gcc -m32 -march=i686 -static -O1 -o nofpu nofpu.c
 */
#include <cpuid.h>
#include <emmintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SIZE 4096

static uint32_t fnv(const unsigned char *p, size_t n, uint32_t h)
{
	while (n--)
		h = (h ^ *p++) * 16777619u;
	return h;
}

static void strings(void)
{
	static unsigned char src[SIZE + 64], dst[SIZE + 64];
	uint32_t h = 2166136261u;
	long order = 0;

	for (size_t i = 0; i < sizeof(src); i++)
		src[i] = (unsigned char)(i * 131 + (i >> 7) + 1);
	for (size_t n = 0; n <= SIZE; n = n < 300 ? n + 1 : n * 3 / 2) {
		for (size_t a = 0; a < 16; a += 5) {
			memset(dst, 0xa5, sizeof(dst));
			memcpy(dst + a, src + (a * 3) % 16, n);
			memmove(dst + 1, dst, n); /* overlapping, backwards */
			h = fnv(dst, sizeof(dst), h);
			dst[a + n] = 0;
			h = fnv((unsigned char *)&(size_t){strlen((char *)dst + a)}, sizeof(size_t), h);
			order += memcmp(dst, src, n) > 0;
			order += strcmp((char *)dst + a, (char *)src) > 0;
			h = fnv((unsigned char *)&(uintptr_t){(uintptr_t)memchr(dst, 0, sizeof(dst)) - (uintptr_t)dst},
				sizeof(uintptr_t), h);
		}
	}
	printf("strings %08x %ld\n", h, order);
}

/* FCOMI sets ZF, PF, CF; FCMOVB then picks by CF. */
static void p6_x87(void)
{
	static const double values[] = {-2.5, -0.0, 0.0, 1.0, 3.25, 1e300};

	for (unsigned i = 0; i < sizeof(values) / sizeof(values[0]); i++)
		for (unsigned j = 0; j < sizeof(values) / sizeof(values[0]); j++) {
			double smaller;
			uint32_t flags;

			__asm__("fldl %2\n\tfldl %3\n\t" /* st0 = a, st1 = b */
				"fcomi %%st(1), %%st\n\t"
				"pushf\n\tpopl %1\n\t"
				"fcmovnb %%st(1), %%st\n\t" /* a >= b: take b */
				"fstp %%st(1)\n\t"
				: "=t"(smaller), "=r"(flags)
				: "m"(values[j]), "m"(values[i]));
			printf("fcomi %g %g flags %03x min %g\n", values[i], values[j], flags & 0x45, smaller);
		}
}

__attribute__((target("sse2"))) static void sum_sse2(const uint32_t *data, uint32_t *lanes)
{
	__m128i total = _mm_setzero_si128();

	for (unsigned i = 0; i < 256; i += 4)
		total = _mm_add_epi32(total, _mm_load_si128((const __m128i *)(data + i)));
	_mm_storeu_si128((__m128i *)lanes, total);
}

static void sum(void)
{
	unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
	uint32_t lanes[4] = {0, 0, 0, 0};
	static uint32_t data[256] __attribute__((aligned(16)));

	for (unsigned i = 0; i < 256; i++)
		data[i] = i * 2654435761u;
	__get_cpuid(1, &eax, &ebx, &ecx, &edx);
	if (edx & bit_SSE2) {
		sum_sse2(data, lanes);
	} else {
		for (unsigned i = 0; i < 256; i++)
			lanes[i % 4] += data[i];
	}
	printf("sum %08x %08x %08x %08x\n", lanes[0], lanes[1], lanes[2], lanes[3]);
}

int main(void)
{
	strings();
	p6_x87();
	sum();
	return 0;
}
