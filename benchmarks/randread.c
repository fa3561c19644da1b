/* SPDX-License-Identifier: GPL-2.0-or-later
 *
 * randread DEVICE COUNT SPAN_MIB SEED: COUNT reads of 4 KiB at random 4 KiB-aligned offsets in the first
 * SPAN_MIB MiB of DEVICE, with O_DIRECT (no page cache: every read reaches the device). Prints "ok COUNT".
 * The host times it between marker lines. Static i386, no C library: it runs in the busybox guest as is.
 */
#define SYS_EXIT 1
#define SYS_WRITE 4
#define SYS_OPEN 5
#define SYS_PREAD64 180
#define O_RDONLY_DIRECT 040000
#define BLOCK 4096

static long syscall5(long n, long a, long b, long c, long d, long e)
{
	long ret;
	__asm__ volatile("int $0x80" : "=a"(ret) : "a"(n), "b"(a), "c"(b), "d"(c), "S"(d), "D"(e) : "memory");
	return ret;
}

static void say(const char *text)
{
	long len = 0;
	while (text[len])
		len++;
	syscall5(SYS_WRITE, 1, (long)text, len, 0, 0);
}

static __attribute__((noreturn)) void leave(const char *text, int status)
{
	say(text);
	for (;;)
		syscall5(SYS_EXIT, status, 0, 0, 0, 0);
}

static unsigned long number(const char *text)
{
	unsigned long value = 0;
	while (*text >= '0' && *text <= '9')
		value = value * 10 + (unsigned long)(*text++ - '0');
	return value;
}

static char buffer[BLOCK] __attribute__((aligned(BLOCK)));

__attribute__((used)) void start_c(long *stack)
{
	char **argv = (char **)(stack + 1);
	char digits[16];
	unsigned long count, blocks, state, i;
	int n = 0;
	long fd;

	if (stack[0] != 5)
		leave("usage: randread DEVICE COUNT SPAN_MIB SEED\n", 2);
	count = number(argv[2]);
	blocks = number(argv[3]) * (1048576 / BLOCK);
	state = number(argv[4]) | 1;
	fd = syscall5(SYS_OPEN, (long)argv[1], O_RDONLY_DIRECT, 0, 0, 0);
	if (fd < 0 || blocks == 0)
		leave("randread: cannot open the device\n", 1);
	for (i = 0; i < count; i++) {
		unsigned long long offset;
		state ^= state << 13;  /* xorshift32 */
		state ^= state >> 17;
		state ^= state << 5;
		offset = (unsigned long long)(state % blocks) * BLOCK;
		if (syscall5(SYS_PREAD64, fd, (long)buffer, BLOCK, (long)(offset & 0xffffffffu),
			     (long)(offset >> 32)) != BLOCK)
			leave("randread: a read failed\n", 1);
	}
	digits[15] = 0;
	n = 15;
	do {
		digits[--n] = (char)('0' + count % 10);
		count /= 10;
	} while (count && n > 0);
	say("ok ");
	say(digits + n);
	leave("\n", 0);
}

__asm__(".globl _start\n_start:\n\txor %ebp, %ebp\n\tmov %esp, %eax\n\tand $-16, %esp\n\tsub $12, %esp\n"
	"\tpush %eax\n\tcall start_c\n\thlt\n");
