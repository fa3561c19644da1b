// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * basics - everyday libm results as raw bits, including the cases stock Unicorn's x87 gets wrong
 * (log(0) must be -inf, pow of a negative number to a fractional power NaN).
 * Build: gcc -m32 -static -O0 -o basics basics.c -lm
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static void show(const char *name, double x)
{
	uint64_t bits;

	memcpy(&bits, &x, sizeof(bits));
	printf("%s %016llx\n", name, (unsigned long long)bits);
}

int main(void)
{
	volatile double zero = 0.0, minus_eight = -8.0, frac = 0.37, one = 1.0, two = 2.0, big = 1e300;

	show("log(0)", log(zero));
	show("pow(-8,0.37)", pow(minus_eight, frac));
	show("log(2)", log(two));
	show("exp(1)", exp(one));
	show("sin(1)", sin(one));
	show("atan2(1,2)", atan2(one, two));
	show("sqrt(2)", sqrt(two));
	show("pow(2,0.37)", pow(two, frac));
	show("exp(big)", exp(big));
	show("log10(big)", log10(big));
	return 0;
}
