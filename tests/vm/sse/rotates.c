/* ROL and ROR by immediate counts, of 8-, 16- and 32-bit registers and memory, after each kind of instruction
   that sets the flags before them (the rotate keeps S, Z, A and P from it and sets C and O), alone and chained,
   read back with PUSHF, with SETcc and ADC (C alone), and across a page fault taken between the rotate and the
   read: prints the values and the flags. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>

#define FLAGS 0x8d5u /* O, S, Z, A, P, C */

static uint64_t state = 0x9E3779B97F4A7C15ull;

static uint32_t next(void)
{
	state ^= state << 13;
	state ^= state >> 7;
	state ^= state << 17;
	return (uint32_t)(state >> 16);
}

/* PRIOR sets the flags from %0 and %3, then ROT rotates %1; PUSHF reads them, those PRIOR leaves undefined
   (KEEP clears them: A after a shift) left out. */
#define CASE_KEEP(name, prior, rot, keep) \
	static void name(uint32_t a, uint32_t b, uint32_t v) \
	{ \
		uint32_t x = a, y = v, flags; \
		__asm__ volatile(prior "\n\t" rot "\n\tpushf\n\tpopl %2" : "+q"(x), "+q"(y), "=r"(flags) : "q"(b) : "cc"); \
		printf("%s %08x %08x %08x -> %08x %03x\n", #name, a, b, v, y, flags & (keep)); \
	}
#define CASE(name, prior, rot) CASE_KEEP(name, prior, rot, FLAGS)

#define PRIORS(rot, tag) \
	CASE(add_##tag, "addl %3, %0", rot) \
	CASE(sub_##tag, "subl %3, %0", rot) \
	CASE(cmp_##tag, "cmpl %3, %0", rot) \
	CASE(xor_##tag, "xorl %3, %0", rot) \
	CASE(and_##tag, "andl %3, %0", rot) \
	CASE(addb_##tag, "addb %b3, %b0", rot) \
	CASE(subw_##tag, "subw %w3, %w0", rot) \
	CASE(adc_##tag, "stc\n\tadcl %3, %0", rot) \
	CASE(sbb_##tag, "stc\n\tsbbl %3, %0", rot) \
	CASE(inc_##tag, "incl %0", rot) \
	CASE(dec_##tag, "decl %0", rot) \
	CASE(neg_##tag, "negl %0", rot) \
	CASE_KEEP(shl_##tag, "shll $3, %0", rot, FLAGS & ~0x10u) \
	CASE_KEEP(sar_##tag, "sarl $5, %0", rot, FLAGS & ~0x10u) \
	CASE(test_##tag, "testl %3, %0", rot) \
	CASE(popf_##tag, "andl $0x8d5, %0\n\tpushl %0\n\tpopf", rot) \
	CASE(jump_##tag, "addl %3, %0\n\tjmp 1f\n1:", rot) \
	CASE(twice_##tag, "addl %3, %0\n\t" rot, "rorl $7, %1") \
	CASE(rcl_##tag, "xorl %3, %0\n\trcll $1, %0", rot)

#define ROTATES(X) \
	X("rorl $1, %1", ror1) X("rorl $2, %1", ror2) X("rorl $13, %1", ror13) X("rorl $31, %1", ror31) \
	X("roll $1, %1", rol1) X("roll $5, %1", rol5) X("roll $31, %1", rol31) \
	X("rorw $1, %w1", rorw1) X("rorw $9, %w1", rorw9) X("rolw $15, %w1", rolw15) \
	X("rorb $1, %b1", rorb1) X("rorb $3, %b1", rorb3) X("rolb $1, %b1", rolb1) X("rolb $7, %b1", rolb7) \
	X("rorl $32, %1", ror32) X("rolb $8, %b1", rolb8)

ROTATES(PRIORS)

/* C alone, through SETC, ADC and JC (the translator takes C by itself there), and the others through SETcc. */
#define SETCC(name, rot) \
	static void name(uint32_t a, uint32_t b, uint32_t v) \
	{ \
		uint32_t x = a, y = v, carry = 0; \
		uint8_t c, o, z, s, p, j; \
		__asm__ volatile("addl %9, %0\n\t" rot "\n\tsetc %2\n\tseto %3\n\tsetz %4\n\tsets %5\n\tsetp %6\n\t" \
				 "movb $0, %8\n\tjnc 1f\n\tmovb $1, %8\n1:\tadcl $0, %7" \
				 : "+r"(x), "+q"(y), "=m"(c), "=m"(o), "=m"(z), "=m"(s), "=m"(p), "+r"(carry), "=m"(j) \
				 : "r"(b) : "cc"); \
		printf("%s %08x %08x %08x -> %08x c%d o%d z%d s%d p%d adc%u jc%d\n", #name, a, b, v, y, c, o, z, s, p, \
		       carry, j); \
	}
SETCC(setcc_ror7, "rorl $7, %1")
SETCC(setcc_rol1, "roll $1, %1")
SETCC(setcc_rorb1, "rorb $1, %b1")

/* The rotate of a memory operand, and a page fault (a page never touched before) between it and PUSHF. */
static void fault(uint32_t a, uint32_t b, uint32_t v)
{
	uint32_t x = a, flags, *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint32_t cell = v;

	__asm__ volatile("subl %3, %0\n\trorl $9, %1\n\tmovl %0, (%4)\n\tpushf\n\tpopl %2"
			 : "+r"(x), "+m"(cell), "=r"(flags) : "r"(b), "r"(page) : "cc", "memory");
	printf("fault %08x %08x %08x -> %08x %08x %03x\n", a, b, v, cell, page[0], flags & FLAGS);
	munmap(page, 4096);
}

int main(void)
{
	static const uint32_t fixed[] = {0, 1, 0x7fffffff, 0x80000000, 0xffffffff, 0x80, 0x8000, 0x55aa55aa};

	for (int i = 0; i < 40; i++) {
		uint32_t a = i < 8 ? fixed[i] : next(), b = i < 8 ? fixed[(i * 3) % 8] : next();
		uint32_t v = i < 8 ? fixed[(i * 5 + 1) % 8] : next();
#define CALL(name) name(a, b, v);
#define CALLS(rot, tag) \
	CALL(add_##tag) CALL(sub_##tag) CALL(cmp_##tag) CALL(xor_##tag) CALL(and_##tag) CALL(addb_##tag) \
	CALL(subw_##tag) CALL(adc_##tag) CALL(sbb_##tag) CALL(inc_##tag) CALL(dec_##tag) CALL(neg_##tag) \
	CALL(shl_##tag) CALL(sar_##tag) CALL(test_##tag) CALL(popf_##tag) CALL(jump_##tag) CALL(twice_##tag) \
	CALL(rcl_##tag)
		ROTATES(CALLS)
		setcc_ror7(a, b, v);
		setcc_rol1(a, b, v);
		setcc_rorb1(a, b, v);
		fault(a, b, v);
	}
	return 0;
}
