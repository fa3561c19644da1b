/* x87 instructions on a table of 80-bit operands: one line per case with the operands, the control word,
 * the status word after the instruction and the raw bit patterns left on the stack (and in memory).  Run
 * natively and in the guest; the two outputs must be equal byte for byte.
 * Build: gcc -m32 -static -O0 x87ops.c -o x87ops */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef struct { uint64_t m; uint16_t se; } __attribute__((packed)) x80;
typedef struct { x80 v; uint8_t pad[6]; } __attribute__((packed)) slot;

static uint64_t lcg_state = 0x853c49e6748fea9bULL;

static uint64_t next64(void)
{
    lcg_state = lcg_state * 6364136223846793005ULL + 1442695040888963407ULL;
    uint64_t hi = lcg_state >> 32;
    lcg_state = lcg_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (hi << 32) | (lcg_state >> 32);
}

static x80 mk(uint16_t se, uint64_t m)
{
    x80 v = {m, se};
    return v;
}

/* A random normal number with an exponent in [lo, hi] (unbiased) and a random sign if signed_ is set. */
static x80 rnd(int lo, int hi, int signed_)
{
    uint64_t r = next64();
    int e = lo + (int)(next64() % (uint64_t)(hi - lo + 1));
    uint16_t s = (signed_ && (r & 1)) ? 0x8000 : 0;
    return mk(s | (uint16_t)(e + 16383), next64() | 0x8000000000000000ULL);
}

static const x80 specials[] = {
    {0, 0}, {0, 0x8000},                                                 /* zeros */
    {1, 0}, {0x4000000000000000ULL, 0x8000}, {0x7fffffffffffffffULL, 0}, /* denormals */
    {0x8000000000000000ULL, 0}, {0x8000000000000001ULL, 0x8000},         /* pseudo-denormals */
    {0x8000000000000000ULL, 1}, {0x8000000000000000ULL, 0x8001},         /* smallest normals */
    {0x8000000000000000ULL, 0x3fff}, {0x8000000000000000ULL, 0xbfff},    /* +-1 */
    {0x8000000000000000ULL, 0x4000}, {0x8000000000000000ULL, 0x3ffe},    /* 2, 0.5 */
    {0xc000000000000000ULL, 0xbffe}, {0xc000000000000000ULL, 0x4000},    /* -0.75, 3 */
    {0xffffffffffffffffULL, 0x3ffe}, {0x8000000000000001ULL, 0x3fff},    /* 1-ulp, 1+ulp */
    {0xc90fdaa22168c235ULL, 0x4000}, {0xc90fdaa22168c234ULL, 0x3fff},    /* pi, pi/2 */
    {0xb504f333f9de6484ULL, 0x3ffe}, {0xb504f333f9de6484ULL, 0xbffd},    /* 1/sqrt2, -(1-1/sqrt2)ish */
    {0x8000000000000000ULL, 0x3fbf}, {0x8000000000000000ULL, 0xbfc0},    /* 2^-64, -2^-63 */
    {0x8000000000000000ULL, 0x403e}, {0x8000000000000000ULL, 0xc03d},    /* 2^63, -2^62 */
    {0xabcdef0123456789ULL, 0x4010}, {0x9999999999999999ULL, 0xbff0},
    {0xffffffffffffffffULL, 0x7ffe}, {0xffffffffffffffffULL, 0xfffe},    /* largest */
    {0x8000000000000000ULL, 0x7fff}, {0x8000000000000000ULL, 0xffff},    /* infinities */
    {0xc000000000000000ULL, 0x7fff}, {0xc000000000000001ULL, 0xffff},    /* quiet NaNs */
    {0xa000000000000000ULL, 0x7fff}, {0x8000000000000001ULL, 0xffff},    /* signalling NaNs */
    {0xc000000000000000ULL, 0xffff},                                     /* the indefinite */
    {0x4000000000000000ULL, 0x3fff}, {0x0000000000000001ULL, 0x4005},    /* unnormals */
    {0x4000000000000000ULL, 0x7fff},                                     /* pseudo-NaN */
    {0, 0x7fff},                                                         /* pseudo-infinity */
};
#define NSPECIAL (sizeof specials / sizeof specials[0])

enum { UNARY, BINARY };

struct op {
    const char *name;
    int kind;
    void (*run)(const x80 *st0, const x80 *st1, uint16_t cw, uint16_t *sw, uint8_t *mem);
    int lo, hi;         /* exponent range of the random ST0 operands */
    int lo1, hi1;       /* ... and of ST1 (binary) */
    int mem;            /* bytes of memory the instruction writes (printed), or -4/-8: it loads that many */
};

/* fninit; fldcw; load ST1 then ST0; clear the flags; the instruction; the status word.  The registers left
 * on the stack are stored by store_stack (their number is in the status word's TOP).  Instructions that use
 * memory use mem: it holds ST0's significand before, and is printed after. */
#define OP(name, insn)                                                                                    \
    static void run_##name(const x80 *a, const x80 *b, uint16_t cw, uint16_t *sw, uint8_t *mem)          \
    {                                                                                                     \
        __asm__ volatile("fninit\n\tfldcw %[cw]\n\tfldt %[b]\n\tfldt %[a]\n\tfnclex\n\t" insn "\n\t"     \
                         "fnstsw %[sw]"                                                                   \
                         : [sw] "=m"(*sw), [m] "+m"(*(uint8_t(*)[16])mem)                                 \
                         : [a] "m"(*a), [b] "m"(*b), [cw] "m"(cw)                                         \
                         : "memory");                                                                     \
    }

static int store_stack(uint16_t sw, slot *out)
{
    int depth = (8 - ((sw >> 11) & 7)) & 7;
    for (int i = 0; i < depth && i < 3; i++)
        __asm__ volatile("fstpt %0" : "=m"(out[i].v) : : "memory");
    __asm__ volatile("fninit");
    return depth;
}

OP(f2xm1, "f2xm1")
OP(fyl2x, "fyl2x")
OP(fyl2xp1, "fyl2xp1")
OP(fpatan, "fpatan")
OP(fprem, "fprem")
OP(fprem1, "fprem1")
OP(fscale, "fscale")
OP(fxtract, "fxtract")
OP(fsin, "fsin")
OP(fcos, "fcos")
OP(fptan, "fptan")
OP(fsincos, "fsincos")
OP(frndint, "frndint")
OP(fsqrt, "fsqrt")
OP(fadd, "faddp")
OP(fmul, "fmulp")
OP(fdiv, "fdivp")
OP(fxam, "fxam")
OP(fsub, "fsubp")
OP(fsubr, "fsubrp")
OP(fdivr, "fdivrp")
OP(fcom, "fcom %%st(1)")
OP(fucom, "fucom %%st(1)")
OP(fst32, "fsts %[m]")
OP(fst64, "fstl %[m]")
OP(fist16, "fists %[m]")
OP(fist32, "fistl %[m]")
OP(fistp64, "fistpll %[m]")
OP(fbstp, "fbstp %[m]")
OP(fld32, "flds %[m]")
OP(fld64, "fldl %[m]")
OP(fldpi, "fldpi")
OP(fldl2e, "fldl2e")
OP(fldl2t, "fldl2t")
OP(fldlg2, "fldlg2")
OP(fldln2, "fldln2")

static const struct op ops[] = {
    {"f2xm1", UNARY, run_f2xm1, -70, 0, 0, 0},
    {"fyl2x", BINARY, run_fyl2x, -16000, 16000, -80, 80},
    {"fyl2xp1", BINARY, run_fyl2xp1, -70, -2, -20, 20},
    {"fpatan", BINARY, run_fpatan, -200, 200, -200, 200},
    {"fprem", BINARY, run_fprem, -100, 200, -100, 100},
    {"fprem1", BINARY, run_fprem1, -100, 200, -100, 100},
    {"fscale", BINARY, run_fscale, -16000, 16000, -5, 14},
    {"fxtract", UNARY, run_fxtract, -16382, 16383, 0, 0},
    {"fsin", UNARY, run_fsin, -70, 70, 0, 0},
    {"fcos", UNARY, run_fcos, -70, 70, 0, 0},
    {"fptan", UNARY, run_fptan, -70, 70, 0, 0},
    {"fsincos", UNARY, run_fsincos, -70, 70, 0, 0},
    {"frndint", UNARY, run_frndint, -3, 70, 0, 0},
    {"fsqrt", UNARY, run_fsqrt, -16382, 16383, 0, 0},
    {"fadd", BINARY, run_fadd, -100, 100, -100, 100},
    {"fmul", BINARY, run_fmul, -8000, 8000, -8000, 8000},
    {"fdiv", BINARY, run_fdiv, -8000, 8000, -8000, 8000},
    {"fxam", UNARY, run_fxam, -16382, 16383, 0, 0},
    {"fsub", BINARY, run_fsub, -100, 100, -100, 100},
    {"fsubr", BINARY, run_fsubr, -100, 100, -100, 100},
    {"fdivr", BINARY, run_fdivr, -8000, 8000, -8000, 8000},
    {"fcom", BINARY, run_fcom, -3, 3, -3, 3},
    {"fucom", BINARY, run_fucom, -3, 3, -3, 3},
    {"fst32", UNARY, run_fst32, -160, 160, 0, 0, 4},
    {"fst64", UNARY, run_fst64, -1100, 1100, 0, 0, 8},
    {"fist16", UNARY, run_fist16, -3, 17, 0, 0, 2},
    {"fist32", UNARY, run_fist32, -3, 33, 0, 0, 4},
    {"fistp64", UNARY, run_fistp64, -3, 65, 0, 0, 8},
    {"fbstp", UNARY, run_fbstp, -3, 62, 0, 0, 10},
    {"fld32", UNARY, run_fld32, 0, 0, 0, 0, -4},
    {"fld64", UNARY, run_fld64, 0, 0, 0, 0, -8},
    {"fldpi", UNARY, run_fldpi, 0, 0, 0, 0},
    {"fldl2e", UNARY, run_fldl2e, 0, 0, 0, 0},
    {"fldl2t", UNARY, run_fldl2t, 0, 0, 0, 0},
    {"fldlg2", UNARY, run_fldlg2, 0, 0, 0, 0},
    {"fldln2", UNARY, run_fldln2, 0, 0, 0, 0},
};

static const uint16_t modes[] = {0x037f, 0x0f7f, 0x077f, 0x0b7f, 0x027f, 0x007f};
#define NMODES (sizeof modes / sizeof modes[0])
#define RANDOM_CASES 300

static void show(const struct op *op, const x80 *a, const x80 *b, uint16_t cw)
{
    slot out[3];
    uint16_t sw = 0;
    uint8_t mem[16];
    uint32_t high = (uint32_t)(a->m >> 32);
    memset(out, 0, sizeof out);
    memset(mem, 0, sizeof mem);
    if (op->mem == -4)
        memcpy(mem, &high, 4);
    else
        memcpy(mem, &a->m, 8);
    op->run(a, b, cw, &sw, mem);
    int depth = store_stack(sw, out);
    printf("%s %04x:%016llx", op->name, a->se, (unsigned long long)a->m);
    if (op->kind == BINARY)
        printf(" %04x:%016llx", b->se, (unsigned long long)b->m);
    printf(" cw=%04x sw=%04x", cw, sw);
    for (int i = 0; i < depth; i++)
        printf(" %04x:%016llx", out[i].v.se, (unsigned long long)out[i].v.m);
    if (op->mem > 0) {
        printf(" mem=");
        for (int i = op->mem - 1; i >= 0; i--)
            printf("%02x", mem[i]);
    }
    printf("\n");
}

int main(int argc, char **argv)
{
    const char *only = argc > 1 ? argv[1] : NULL;
    const x80 one = {0x8000000000000000ULL, 0x3fff};
    for (size_t k = 0; k < sizeof ops / sizeof ops[0]; k++) {
        const struct op *op = &ops[k];
        if (only && strcmp(only, op->name) != 0)
            continue;
        lcg_state = 0x853c49e6748fea9bULL + k;
        for (size_t i = 0; i < NSPECIAL; i++) {
            if (op->kind == UNARY) {
                show(op, &specials[i], &one, 0x037f);
                continue;
            }
            for (size_t j = 0; j < NSPECIAL; j++)
                show(op, &specials[i], &specials[j], 0x037f);
        }
        for (int i = 0; i < RANDOM_CASES; i++) {
            x80 a = rnd(op->lo, op->hi, 1);
            x80 b = op->kind == BINARY ? rnd(op->lo1, op->hi1, 1) : one;
            if (op->run == run_fyl2x)
                a.se &= 0x7fff;   /* the interesting domain: positive */
            if (op->run == run_f2xm1 && i % 3 == 0)
                a = mk((uint16_t)(0x3ffe | ((next64() & 1) << 15)), next64() | 0x8000000000000000ULL);
            show(op, &a, &b, modes[i % NMODES]);
        }
    }
    return 0;
}
