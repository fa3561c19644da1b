/* glibc's libm on i386 (built on the x87 instructions) over a table of arguments: one line per call with
 * the raw bits of the arguments and the result and the exception flags raised.  Run natively and in the
 * guest; the two outputs must be equal byte for byte.  Build: gcc -m32 -static -O0 libm.c -o libm -lm */
#include <fenv.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static uint64_t lcg_state;

static uint64_t next64(void)
{
    lcg_state = lcg_state * 6364136223846793005ULL + 1442695040888963407ULL;
    uint64_t hi = lcg_state >> 32;
    lcg_state = lcg_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (hi << 32) | (lcg_state >> 32);
}

static uint64_t bits(double x)
{
    uint64_t b;
    memcpy(&b, &x, sizeof b);
    return b;
}

/* A random double of magnitude 2^[lo, hi], negative if neg is set and the coin says so. */
static double rnd(int lo, int hi, int neg)
{
    double m = 1.0 + (double)(next64() >> 11) / 9007199254740992.0;
    int e = lo + (int)(next64() % (uint64_t)(hi - lo + 1));
    double x = ldexp(m, e);
    return (neg && (next64() & 1)) ? -x : x;
}

static const double specials[] = {
    0.0, -0.0, 1.0, -1.0, 2.0, 0.5, -0.5, 3.0, -8.0, 10.0, 1e-310, -1e-310, 1e300, -1e300,
    0.37, -0.37, 1.0000000000000002, 0.9999999999999999, 3.141592653589793, 1.5707963267948966, 709.78,
    -745.2, 1e22, 1e-8, -1e-8, INFINITY, -INFINITY, NAN,
};
#define NSPECIAL (sizeof specials / sizeof specials[0])

typedef double (*f1)(double);
typedef double (*f2)(double, double);
typedef long double (*l1)(long double);
typedef long double (*l2)(long double, long double);

struct fn {
    const char *name;
    f1 one;
    f2 two;
    int lo, hi, neg;  /* random argument range */
};

static const struct fn fns[] = {
    {"log", log, 0, -1000, 1000, 0},
    {"log2", log2, 0, -1000, 1000, 0},
    {"log10", log10, 0, -1000, 1000, 0},
    {"log1p", log1p, 0, -60, 10, 1},
    {"exp", exp, 0, -20, 9, 1},
    {"exp2", exp2, 0, -20, 9, 1},
    {"expm1", expm1, 0, -60, 6, 1},
    {"sin", sin, 0, -30, 70, 1},
    {"cos", cos, 0, -30, 70, 1},
    {"tan", tan, 0, -30, 70, 1},
    {"atan", atan, 0, -60, 60, 1},
    {"asin", asin, 0, -30, -1, 1},
    {"acos", acos, 0, -30, -1, 1},
    {"sinh", sinh, 0, -30, 9, 1},
    {"tanh", tanh, 0, -30, 5, 1},
    {"atan2", 0, atan2, -100, 100, 1},
    {"pow", 0, pow, -10, 10, 1},
    {"fmod", 0, fmod, -60, 100, 1},
    {"remainder", 0, remainder, -60, 100, 1},
};

/* The long double functions: glibc computes them with the x87 instructions at full precision, so they show
 * the instructions' own last bits. */
struct lfn {
    const char *name;
    l1 one;
    l2 two;
    int lo, hi, neg;
};

static const struct lfn lfns[] = {
    {"logl", logl, 0, -1000, 1000, 0},
    {"log2l", log2l, 0, -1000, 1000, 0},
    {"log1pl", log1pl, 0, -60, 10, 1},
    {"expl", expl, 0, -20, 9, 1},
    {"exp2l", exp2l, 0, -20, 9, 1},
    {"expm1l", expm1l, 0, -60, 6, 1},
    {"sinl", sinl, 0, -30, 60, 1},
    {"cosl", cosl, 0, -30, 60, 1},
    {"tanl", tanl, 0, -30, 60, 1},
    {"atanl", atanl, 0, -60, 60, 1},
    {"atan2l", 0, atan2l, -100, 100, 1},
    {"powl", 0, powl, -10, 10, 1},
};

#define RANDOM_CASES 200

static void show_long(const struct lfn *f, long double x, long double y)
{
    unsigned char r[10], a[10], b[10];
    feclearexcept(FE_ALL_EXCEPT);
    long double v = f->one ? f->one(x) : f->two(x, y);
    int flags = fetestexcept(FE_ALL_EXCEPT);
    memcpy(r, &v, 10);
    memcpy(a, &x, 10);
    memcpy(b, &y, 10);
    printf("%s %02x%02x:", f->name, a[9], a[8]);
    for (int i = 7; i >= 0; i--)
        printf("%02x", a[i]);
    if (!f->one) {
        printf(" %02x%02x:", b[9], b[8]);
        for (int i = 7; i >= 0; i--)
            printf("%02x", b[i]);
    }
    printf(" flags=%02x %02x%02x:", flags, r[9], r[8]);
    for (int i = 7; i >= 0; i--)
        printf("%02x", r[i]);
    printf("\n");
}

static void show(const struct fn *f, double x, double y)
{
    feclearexcept(FE_ALL_EXCEPT);
    double r = f->one ? f->one(x) : f->two(x, y);
    int flags = fetestexcept(FE_ALL_EXCEPT);
    printf("%s %016llx", f->name, (unsigned long long)bits(x));
    if (!f->one)
        printf(" %016llx", (unsigned long long)bits(y));
    printf(" = %016llx flags=%02x\n", (unsigned long long)bits(r), flags);
}

int main(void)
{
    for (size_t k = 0; k < sizeof fns / sizeof fns[0]; k++) {
        const struct fn *f = &fns[k];
        lcg_state = 0x9e3779b97f4a7c15ULL + k;
        for (size_t i = 0; i < NSPECIAL; i++) {
            if (f->one) {
                show(f, specials[i], 0);
                continue;
            }
            for (size_t j = 0; j < NSPECIAL; j++)
                show(f, specials[i], specials[j]);
        }
        for (int i = 0; i < RANDOM_CASES; i++) {
            double x = rnd(f->lo, f->hi, f->neg);
            double y = f->one ? 0 : (f->two == pow ? rnd(-4, 6, 1) : rnd(f->lo, f->hi, f->neg));
            show(f, x, y);
        }
    }
    for (size_t k = 0; k < sizeof lfns / sizeof lfns[0]; k++) {
        const struct lfn *f = &lfns[k];
        lcg_state = 0x2545f4914f6cdd1dULL + k;
        for (size_t i = 0; i < NSPECIAL; i++) {
            if (f->one) {
                show_long(f, specials[i], 0);
                continue;
            }
            for (size_t j = 0; j < NSPECIAL; j++)
                show_long(f, specials[i], specials[j]);
        }
        for (int i = 0; i < RANDOM_CASES; i++) {
            /* a double's worth of random bits, then 11 more: arguments that use the extended precision */
            long double low = (long double)(next64() >> 53) * 0x1p-64L;
            long double x = (long double)rnd(f->lo, f->hi, f->neg) * (1.0L + low);
            long double y = f->one ? 0 : (f->two == powl ? rnd(-4, 6, 1) : rnd(f->lo, f->hi, f->neg));
            show_long(f, x, y);
        }
    }
    return 0;
}
