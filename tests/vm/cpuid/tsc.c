/* The TSC against the guest's clock: TSC ticks per nanosecond of CLOCK_MONOTONIC across a 300 ms sleep. */
#include <stdio.h>
#include <time.h>
#include <x86intrin.h>

int main(void)
{
	struct timespec before, after, nap = {0, 300000000};
	unsigned long long t0, t1;
	double ns;

	/* The TSC's interval encloses the clock's: a host that preempts the guest between the two reads can
	 * only make the TSC's count larger, never smaller. */
	t0 = __rdtsc();
	clock_gettime(CLOCK_MONOTONIC, &before);
	nanosleep(&nap, NULL);
	clock_gettime(CLOCK_MONOTONIC, &after);
	t1 = __rdtsc();
	ns = (after.tv_sec - before.tv_sec) * 1e9 + (after.tv_nsec - before.tv_nsec);
	printf("%.4f\n", (double)(t1 - t0) / ns);
	return 0;
}
