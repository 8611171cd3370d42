/* homellm CPU kernels: matmul on raw GGUF blocks, causal attention, and (network.h) the whole
 * LLaMA network over a batch of rows of several sequences.
 *
 * Block layouts (GGUF spec, ggml docs/gguf.md; the gguf package's quants.py):
 *   Q4_0: 18 bytes / 32 weights: f16 d, 16 bytes qs; w[j] = (qs[j] & 15) - 8, w[j+16] = (qs[j] >> 4) - 8, times d
 *   Q4_1: 20 bytes / 32 weights: f16 d, f16 m, 16 bytes qs; w = d * nibble + m (same nibble order)
 *   Q8_0: 34 bytes / 32 weights: f16 d, 32 int8 qs; w = d * q
 *   Q5_0: 22 bytes / 32: f16 d, u32 qh, 16 bytes qs; w[j] = d ((qs nibble as Q4) | (bit j of qh) << 4) - 16 d
 *   Q5_1: 24 bytes / 32: f16 d, f16 m, u32 qh, 16 bytes qs; w = d u5 + m
 *   Q4_K: 144 bytes / 256 (ggml-common.h block_q4_K): f16 d, f16 dmin, 12 bytes of 6-bit (sc, mn) for
 *         8 sub-blocks of 32, 128 bytes qs (64 values per 32 bytes: low nibbles sub-block 2i, high 2i+1);
 *         w = d sc_j u4 - dmin mn_j
 *   Q5_K: 176 bytes / 256: as Q4_K with 32 bytes qh after the scales (bit j of qh[l]: 5th bit of
 *         sub-block j's value l); w = d sc_j u5 - dmin mn_j
 *   Q6_K: 210 bytes / 256: 128 bytes ql, 64 bytes qh, 16 int8 scales (sub-blocks of 16), f16 d;
 *         w = d sc_i (u6 - 32)
 * These five ("ext" types) go through one generic form per 32-block b: 32 integer weights v (unsigned,
 * or for Q6_K signed), a float scale per 16 values (s0, s1) and a min m:
 *   w . a = sum_b da_b (s0_b sum_{j<16} v qa + s1_b sum_{j>=16} v qa) + m_b s_b
 * The integer sums land in int32 lanes of 4 values each, so the two scales are two lane groups.
 * Activations are quantized per row in blocks of 32 to int8 (d = amax / 127, q = round-half-even(x / d))
 * and kept as q (int8), d and s = d * sum(q); d is stored 8 times per block ("expanded", one value
 * per int32 lane of a 256-bit dot product, so it is a plain load), s once per block (the Q4 min
 * terms sum_b m_b s_b are a short float dot product after the integer loop).
 * Optionally ("hi") a second int8 level holds the rounded residual (see quantize_row): two dot
 * products per block, ~256x less activation rounding error; the decode step uses it by default.
 *   Q8_0 . a = sum_b dw_b da_b sum_j qw qa
 *   Q4_x . a = sum_b dw_b da_b sum_j nib qa  +  m_b s_b      (Q4_0: m_b = -8 dw_b)
 * Paths chosen at run time (hl_best_path; HOMELLM_KERNEL_PATH forces one): on x86-64 AVX512-VNNI
 * (two blocks per 512-bit dpbusd), AVX2 (maddubs) and AVX2 with 256-bit VNNI (AVX-VNNI, Alder
 * Lake and later); on ARM64 NEON with the dot-product instructions (sdot), and with i8mm; and the
 * portable scalar code everywhere. Built without -march, each vector function carries its own
 * target attribute; no x86 header or intrinsic is compiled on ARM, nor the reverse.
 * Every quantized type is repacked for the vector paths (hl_repack): G weight rows side by side,
 * 16 for AVX512 (a 512-bit register of 16 int32 lanes), 8 for AVX2 and NEON (kernels_avx2.h,
 * kernels_neon.h): Q4_x as nibbles, Q5_0 as nibbles and 5th bits, Q8_0 as bytes (+ 128 on
 * AVX512), Q5_1 and the K-quants as unsigned integers with f32 scales. Each output is one lane's sequence of
 * float operations, the same on every path: the packed products of AVX512, AVX2 and NEON are
 * the same bits. hl_matmul_packed_multi runs several such weights on one quantized activation
 * (q/k/v; gate/up with the gated product in its epilogue).
 * Threads: every parallel loop is a job of thread_pool.h (pthreads; no OpenMP), a whole batch of
 * rows through the network one job (network.h); each item of a loop is computed whole by one
 * thread, so results are the same on any number of threads.
 */
#define _GNU_SOURCE  /* sched_getaffinity, CPU_COUNT (thread_pool.h) */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "thread_pool.h"
#if defined(__x86_64__)
#define HL_X86 1
#include <immintrin.h>
#elif defined(__aarch64__)
#define HL_ARM 1
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#elif defined(__APPLE__)
#include <sys/sysctl.h>
#endif
#endif

enum { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
       T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };
/* kernel paths (engine/kernels/__init__.py PATHS): x86-64 AVX2, AVX512, AVX2 + AVX-VNNI; ARM64
 * NEON + dotprod, and + i8mm */
enum { P_SCALAR = 0, P_AVX2 = 1, P_AVX512 = 2, P_AVXVNNI = 3, P_NEON = 4, P_I8MM = 5, P_COUNT = 6 };

#define INLINE static inline __attribute__((always_inline))
#if HL_X86
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define T256 __attribute__((target("avx2,fma,f16c")))
#endif

/* ---- features ---------------------------------------------------------------------------- */

/* bits: 1 avx2, 2 fma, 4 f16c, 8 avx512f, 16 avx512bw, 32 avx512vl, 64 avx512vnni, 256 avx512dq,
 * 512 avxvnni; 1024 asimddp (dotprod), 2048 i8mm */
int hl_cpu_features(void) {
    static int cached = -1;  /* (threads that race here store the same value) */
    if (cached >= 0) return cached;
    int f = 0;
#if HL_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) f |= 1;
    if (__builtin_cpu_supports("fma")) f |= 2;
    if (__builtin_cpu_supports("avx512f")) f |= 8;
    if (__builtin_cpu_supports("avx512bw")) f |= 16;
    if (__builtin_cpu_supports("avx512vl")) f |= 32;
    if (__builtin_cpu_supports("avx512vnni")) f |= 64;
    if (__builtin_cpu_supports("avx512dq")) f |= 256;
    /* F16C has no __builtin_cpu_supports name in gcc 12: CPUID.1:ECX bit 29; AVX-VNNI neither:
     * CPUID.(7, 1):EAX bit 4 (its VEX registers are AVX2's, whose OS support avx2 implies) */
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    if (c & (1u << 29)) f |= 4;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0), "c"(0));
    if (a >= 7) {
        __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(1));
        if ((a & (1u << 4)) && (f & 1)) f |= 512;
    }
#elif HL_ARM && defined(__linux__)
    const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    if (hw & (1ul << 20)) f |= 1024;  /* HWCAP_ASIMDDP */
    if (hw2 & (1ul << 13)) f |= 2048; /* HWCAP2_I8MM */
#elif HL_ARM && defined(__APPLE__)
    int v = 0; size_t n = sizeof v;
    if (sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &n, NULL, 0) == 0 && v) f |= 1024;
    v = 0; n = sizeof v;
    if (sysctlbyname("hw.optional.arm.FEAT_I8MM", &v, &n, NULL, 0) == 0 && v) f |= 2048;
#endif
    cached = f;
    return f;
}

/* whether this CPU runs path p ($HOMELLM_KERNEL_PATH may force any such one) */
int hl_path_ok(int p) {
    const int f = hl_cpu_features(), avx2 = 1 | 2 | 4, avx512 = avx2 | 8 | 16 | 32 | 64 | 256;
    switch (p) {
    case P_SCALAR: return 1;
    case P_AVX2: return (f & avx2) == avx2;
    case P_AVX512: return (f & avx512) == avx512;
    /* AVX-VNNI's VEX vpdpbusd, or (a CPU with AVX512-VNNI) the same 256-bit kernels in EVEX form */
    case P_AVXVNNI: return (f & avx2) == avx2 && ((f & 512) || (f & (32 | 64)) == (32 | 64));
    case P_NEON: return (f & 1024) != 0;
    case P_I8MM: return (f & (1024 | 2048)) == (1024 | 2048);
    default: return 0;
    }
}

int hl_best_path(void) {
    static const int order[] = {P_AVX512, P_AVXVNNI, P_AVX2, P_I8MM, P_NEON};
    const int f = hl_cpu_features();
    for (int i = 0; i < 5; i++) {
        if (order[i] == P_AVXVNNI && !(f & 512)) continue;  /* (the EVEX form only when forced) */
        if (hl_path_ok(order[i])) return order[i];
    }
    return P_SCALAR;
}

static int path_ok(int p) { return hl_path_ok(p); }
static int is_avx2(int p) { return p == P_AVX2 || p == P_AVXVNNI; }   /* the 256-bit x86 kernels */
static int is_neon(int p) { return p == P_NEON || p == P_I8MM; }

/* weight rows side by side in a packed matrix for path p's kernels (0: the path has none) */
int hl_pack_rows(int p) { return p == P_AVX512 ? 16 : is_avx2(p) || is_neon(p) ? 8 : 0; }

/* ---- scalar helpers ---------------------------------------------------------------------- */

static float h2f(const uint8_t *p) {  /* IEEE half -> float, portable */
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 0x3ff, u;
    if (e == 0) {
        if (m == 0) u = s;
        else { float f = (float)m * (1.0f / 16777216.0f); memcpy(&u, &f, 4); u |= s; }
    } else if (e == 31) u = s | 0x7f800000 | (m << 13);
    else u = s | ((e + 112) << 23) | (m << 13);
    float f; memcpy(&f, &u, 4); return f;
}

static uint16_t f2h(float f) {  /* float -> IEEE half, round to nearest even, portable */
    uint32_t u; memcpy(&u, &f, 4);
    const uint32_t s = (u >> 16) & 0x8000, e = (u >> 23) & 255;
    uint32_t m = u & 0x7fffff;
    if (e == 255) return (uint16_t)(s | 0x7c00 | (m ? 0x200 : 0));  /* inf, nan */
    const int ee = (int)e - 112;                                     /* the half's biased exponent */
    if (ee >= 31) return (uint16_t)(s | 0x7c00);                    /* too big: inf */
    if (ee <= 0) {                                                   /* a half subnormal, or zero */
        if (ee < -10) return (uint16_t)s;
        m |= 0x800000;
        const int shift = 14 - ee;
        uint32_t hm = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (hm & 1))) hm++;
        return (uint16_t)(s | hm);
    }
    uint32_t h = s | ((uint32_t)ee << 10) | (m >> 13);
    const uint32_t rem = m & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;  /* a carry into the exponent is right */
    return (uint16_t)h;
}

/* n floats <-> halves (the f16 KV cache); F16C / NEON's fcvtn where the path has it (round to
 * nearest even, as f2h) */
#if HL_X86
T256 static void f32_to_f16_f16c(const float *x, uint16_t *y, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = f2h(x[i]);
}
#elif HL_ARM
static void f32_to_f16_neon(const float *x, uint16_t *y, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1_u16(y + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
    for (; i < n; i++) y[i] = f2h(x[i]);
}
#endif
static void to_f16(int path, const float *x, uint16_t *y, int n) {
#if HL_X86
    if (path != P_SCALAR) { f32_to_f16_f16c(x, y, n); return; }
#elif HL_ARM
    if (path != P_SCALAR) { f32_to_f16_neon(x, y, n); return; }
#endif
    (void)path;
    for (int i = 0; i < n; i++) y[i] = f2h(x[i]);
}

static int type_block_bytes(int t) {
    switch (t) { case T_Q4_0: return 18; case T_Q4_1: return 20; case T_Q8_0: return 34;
                 case T_Q5_0: return 22; case T_Q5_1: return 24;
                 case T_Q4_K: return 144; case T_Q5_K: return 176; case T_Q6_K: return 210;
                 case T_F32: return 4; case T_F16: return 2; default: return 0; }
}
static int is_kquant(int t) { return t == T_Q4_K || t == T_Q5_K || t == T_Q6_K; }
static int is_ext(int t) { return t == T_Q5_0 || t == T_Q5_1 || is_kquant(t); }
static int is_quant(int t) { return t == T_Q4_0 || t == T_Q4_1 || t == T_Q8_0 || is_ext(t); }
static int type_qk(int t) { return is_kquant(t) ? 256 : is_quant(t) ? 32 : 1; }  /* values per block */

/* ---- the ext types (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), one 32-block b of a row at a time ------- */

/* IEEE half -> float without branches, for finite halves (the scales of blocks): the 15 bits
 * below the sign moved into a float's exponent/mantissa (exponent 127 too small by 112), then
 * times 2^112; subnormal halves land on float subnormals and come out exact as well */
static inline float h2f_finite(const uint8_t *p) {
    uint32_t h = (uint32_t)(p[0] | (p[1] << 8)), u = (h & 0x7fff) << 13;
    float f; memcpy(&f, &u, 4);
    f *= 5.192296858534828e+33f;  /* 2^112 */
    memcpy(&u, &f, 4); u |= (h & 0x8000) << 16;
    memcpy(&f, &u, 4); return f;
}

/* 6-bit scale and min of sub-block j from the 12 scale bytes (ggml get_scale_min_k4) */
static void kscale(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) { *sc = s[j] & 63; *mn = s[j + 4] & 63; }
    else { *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4); *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4); }
}

/* a K-quant super-block's scales: sc[16] per 16 values (d sc_j twice for Q4_K/Q5_K), mn[8] per 32 */
INLINE void ksuper(int t, const uint8_t *p, float *sc, float *mn) {
    if (t == T_Q6_K) {
        float d = h2f_finite(p + 208);
        for (int i = 0; i < 16; i++) sc[i] = d * (float)(int8_t)p[192 + i];
        for (int j = 0; j < 8; j++) mn[j] = 0.f;
        return;
    }
    float d = h2f_finite(p), dmin = h2f_finite(p + 2);
    for (int j = 0; j < 8; j++) {
        int s, m; kscale(p + 4, j, &s, &m);
        sc[2 * j] = sc[2 * j + 1] = d * (float)s; mn[j] = -(dmin * (float)m);
    }
}

/* block b's scales s0 (values 0..15), s1 (16..31) and min m; sc/mn: the K-quant super-block cache,
 * refreshed when b starts a super-block (callers walk b upwards from 0) */
INLINE void ext_scales(int t, const uint8_t *w, int b, float *sc, float *mn, float *s0, float *s1, float *m) {
    if (is_kquant(t)) {
        int j = b & 7;
        if (j == 0) ksuper(t, w + (size_t)(b >> 3) * type_block_bytes(t), sc, mn);
        *s0 = sc[2 * j]; *s1 = sc[2 * j + 1]; *m = mn[j];
        return;
    }
    const uint8_t *p = w + (size_t)b * (t == T_Q5_1 ? 24 : 22);
    float d = h2f_finite(p);
    *s0 = *s1 = d; *m = t == T_Q5_1 ? h2f_finite(p + 2) : -16.f * d;
}

/* block b's 32 integer weights: unsigned 0..31 (Q5_x, Q4_K, Q5_K) or signed -32..31 (Q6_K) */
static void ext_vals(int t, const uint8_t *w, int b, int8_t *v) {
    if (!is_kquant(t)) {
        const uint8_t *p = w + (size_t)b * type_block_bytes(t), *qh = p + (t == T_Q5_1 ? 4 : 2), *qs = qh + 4;
        uint32_t h = (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
        for (int j = 0; j < 16; j++) {
            v[j] = (int8_t)((qs[j] & 15) | ((h >> j) & 1) << 4);
            v[j + 16] = (int8_t)((qs[j] >> 4) | ((h >> (j + 16)) & 1) << 4);
        }
        return;
    }
    const int j = b & 7;
    const uint8_t *p = w + (size_t)(b >> 3) * type_block_bytes(t);
    if (t == T_Q6_K) {  /* 128-value halves hf: ql 64 bytes, qh 32 bytes; k-th 32 of the half */
        const int k = j & 3, hf = j >> 2;
        const uint8_t *ql = p + 64 * hf + 32 * (k & 1), *qh = p + 128 + 32 * hf;
        for (int l = 0; l < 32; l++)
            v[l] = (int8_t)((((ql[l] >> (4 * (k >> 1))) & 15) | ((qh[l] >> (2 * k)) & 3) << 4) - 32);
        return;
    }
    const uint8_t *qs = p + (t == T_Q5_K ? 48 : 16) + 32 * (j >> 1);
    for (int l = 0; l < 32; l++)
        v[l] = (int8_t)(((qs[l] >> (4 * (j & 1))) & 15) | (t == T_Q5_K ? ((p[16 + l] >> j) & 1) << 4 : 0));
}

/* dequantize one row of K values */
static void dequant_row(int t, const uint8_t *w, int K, float *out) {
    if (t == T_F32) { memcpy(out, w, (size_t)K * 4); return; }
    if (t == T_F16) { for (int i = 0; i < K; i++) out[i] = h2f(w + 2 * i); return; }
    if (is_ext(t)) {
        float sc[16], mn[8], s0, s1, m;
        int8_t v[32];
        for (int b = 0; b < K / 32; b++) {
            ext_scales(t, w, b, sc, mn, &s0, &s1, &m);
            ext_vals(t, w, b, v);
            for (int j = 0; j < 32; j++) out[b * 32 + j] = (j < 16 ? s0 : s1) * (float)v[j] + m;
        }
        return;
    }
    int bs = type_block_bytes(t);
    for (int b = 0; b < K / 32; b++) {
        const uint8_t *p = w + (size_t)b * bs;
        float d = h2f(p);
        float *o = out + b * 32;
        if (t == T_Q8_0) { for (int j = 0; j < 32; j++) o[j] = d * (float)(int8_t)p[2 + j]; continue; }
        const uint8_t *qs = p + (t == T_Q4_1 ? 4 : 2);
        if (t == T_Q4_1) {
            float m = h2f(p + 2);
            for (int j = 0; j < 16; j++) { o[j] = d * (float)(qs[j] & 15) + m; o[j + 16] = d * (float)(qs[j] >> 4) + m; }
        } else {
            for (int j = 0; j < 16; j++) { o[j] = d * (float)((qs[j] & 15) - 8); o[j + 16] = d * (float)((qs[j] >> 4) - 8); }
        }
    }
}

/* ---- activation quantization --------------------------------------------------------------- */

#define TILE 8  /* activation rows per tile of the packed prefill kernels (see packed_body) */

typedef struct { int8_t *q; float *d; float *s; int K; } act_t;  /* d, s: K/4 floats per row */

/* sx of a row: [0, nb) the blocks' sums s_b = d sum(q), then [nb, 3 nb) the halves' times -32
 * (values 0..15 and 16..31 of block b at nb + 2b and nb + 2b + 1: the offset terms of packed Q6_K,
 * w = s_h (u - 32), its kernels' -32 s_h sum(q) made here, exactly, once a row), then
 * [3 nb, 4 nb) int32 sum(q), 256 sum(q) + sum(q2) with two levels (times their offsets, what
 * packed Q4_0 and Q8_0 take off their integer dots); the row has K/4 floats of room */
#define ACT_SUMS 4  /* sx values per block */
/* (ss: floats from one sum j to the next; 1 in a row, TILE in a tile) */
static inline void act_sums(float *sx, size_t ss, int nb, int b, float d, const int *hs, const int *hs2, int two) {
    const int sum = hs[0] + hs[1], sum2 = hs2[0] + hs2[1], isum = two ? 256 * sum + sum2 : sum;
    sx[b * ss] = two ? d * ((float)sum + (float)sum2 * (1.0f / 256.0f)) : d * (float)sum;
    for (int h = 0; h < 2; h++)
        sx[(nb + 2 * b + h) * ss] = -32.0f * (two ? d * ((float)hs[h] + (float)hs2[h] * (1.0f / 256.0f)) : d * (float)hs[h]);
    ((int32_t *)sx)[(3 * nb + b) * ss] = isum;
}

/* q2 != NULL: "two-level" int8, x ~ d (q + q2 / 256) with q2 the rounded residual: ~256x more
 * precise than one level, and dx then holds d / 256 (the integer dot is 256 (w.q) + (w.q2)).
 * One row, anywhere: block b's q at q + b qs (and q2 + b qs), its scale at dx + b ds (8 copies
 * where d8: the raw kernels read 8 lanes), its sums j at sx + j ss (act_sums). The vector
 * versions (quantize_512, kernels_avx2.h, kernels_neon.h) compute these same bits. */
static void quantize_any(const float *x, int K, int8_t *q, size_t qs, int8_t *q2, float *dx, size_t ds, int d8,
                         float *sx, size_t ss) {
    for (int b = 0; b < K / 32; b++) {
        const float *xb = x + b * 32;
        int8_t *qb = q + b * qs, *qb2 = q2 ? q2 + b * qs : NULL;
        float amax = 0.f;
        for (int j = 0; j < 32; j++) { float a = fabsf(xb[j]); amax = a > amax ? a : amax; }
        float d = amax / 127.0f, id = d != 0.f ? 1.0f / d : 0.f;
        int hs[2] = {0, 0}, hs2[2] = {0, 0};
        for (int j = 0; j < 32; j++) { int v = (int)nearbyintf(xb[j] * id); qb[j] = (int8_t)v; hs[j >> 4] += v; }
        if (q2) {
            for (int j = 0; j < 32; j++) {  /* (d q rounded before the subtraction: never an FMA) */
                float r = (xb[j] - d * (float)qb[j]) * id * 256.0f;
                int v = (int)nearbyintf(r);
                v = v > 127 ? 127 : v < -127 ? -127 : v;
                qb2[j] = (int8_t)v; hs2[j >> 4] += v;
            }
        }
        float dd = q2 ? d * (1.0f / 256.0f) : d;
        for (int j = 0; j < (d8 ? 8 : 1); j++) dx[b * ds + j] = dd;
        act_sums(sx, ss, K / 32, b, d, hs, hs2, q2 != NULL);
    }
}

#if HL_X86
#define RNE (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)  /* an explicit rounding: never fused into an FMA */

/* out[0..3] = the sums of a, b, c, d's 16 lanes: one transpose-and-add (three steps) */
T512 INLINE void sum4_epi32(__m512i a, __m512i b, __m512i c, __m512i d, int *out) {
    const __m512i ab = _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x44), _mm512_shuffle_i32x4(a, b, 0xEE));
    const __m512i cd = _mm512_add_epi32(_mm512_shuffle_i32x4(c, d, 0x44), _mm512_shuffle_i32x4(c, d, 0xEE));
    __m512i x = _mm512_add_epi32(_mm512_shuffle_i32x4(ab, cd, 0x88), _mm512_shuffle_i32x4(ab, cd, 0xDD));
    x = _mm512_add_epi32(x, _mm512_shuffle_epi32(x, (_MM_PERM_ENUM)0x4E));
    x = _mm512_add_epi32(x, _mm512_shuffle_epi32(x, (_MM_PERM_ENUM)0xB1));
    int v[16];
    _mm512_storeu_si512((void *)v, x);  /* 128-bit lane i: the sum of the i-th vector */
    out[0] = v[0]; out[1] = v[4]; out[2] = v[8]; out[3] = v[12];
}

/* lane i = the largest of v[i]'s 16 lanes (a transpose-and-max in three steps, then the lanes
 * put back in order) */
T512 INLINE __m512 hmax16(const __m512 *v) {
    __m512 a[8], b[4];
    for (int k = 0; k < 8; k++)  /* 128-bit chunks: v[2k]'s (0|2, 1|3), v[2k+1]'s */
        a[k] = _mm512_max_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
    for (int k = 0; k < 4; k++)  /* chunk c: v[4k + c]'s 4 partial maxima */
        b[k] = _mm512_max_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xDD));
    const __m512 e0 = _mm512_max_ps(_mm512_unpacklo_ps(b[0], b[1]), _mm512_unpackhi_ps(b[0], b[1]));
    const __m512 e1 = _mm512_max_ps(_mm512_unpacklo_ps(b[2], b[3]), _mm512_unpackhi_ps(b[2], b[3]));
    const __m512 r = _mm512_max_ps(_mm512_shuffle_ps(e0, e1, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(e0, e1, _MM_SHUFFLE(3, 2, 3, 2)));
    /* lane 4c + k holds v[4k + c]'s maximum */
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}

/* One row, anywhere: block b's q at q + b qs (and q2 + b qs), its scale at dx + b ds (8 copies
 * where d8: the raw kernels read 8 lanes), its sums j at sx + j ss (act_sums). Each block's
 * scale d = amax / 127 and 1 / d come 16 blocks at a time (the divisions and the maxima
 * vectorized: IEEE results, the same as one at a time). */
T512 INLINE void quantize_512(const float *x, int K, int8_t *q, size_t qs, int8_t *q2, float *dx,
                              size_t ds, int d8, float *sx, size_t ss) {
    const __m512 s256 = _mm512_set1_ps(256.0f);
    const __m512i lim = _mm512_set1_epi32(127), nlim = _mm512_set1_epi32(-127);
    const int nb = K / 32;
    float dv[16], iv[16];
    for (int b = 0; b < nb; b++) {
        const float *xb = x + b * 32;
        __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
        if (b % 16 == 0) {  /* the scales of blocks b .. b+15 (a tail: one at a time) */
            const int n = nb - b < 16 ? nb - b : 16;
            if (n == 16) {
                __m512 m[16];
                for (int i = 0; i < 16; i++)
                    m[i] = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(xb + 32 * i)),
                                         _mm512_abs_ps(_mm512_loadu_ps(xb + 32 * i + 16)));
                const __m512 d = _mm512_div_ps(hmax16(m), _mm512_set1_ps(127.0f));
                const __mmask16 nz = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_NEQ_OQ);
                _mm512_storeu_ps(dv, d);
                _mm512_storeu_ps(iv, _mm512_maskz_div_ps(nz, _mm512_set1_ps(1.0f), d));
            } else {
                for (int i = 0; i < n; i++) {
                    const float *xi = xb + 32 * i;
                    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(xi)),
                                                                    _mm512_abs_ps(_mm512_loadu_ps(xi + 16))));
                    dv[i] = amax / 127.0f; iv[i] = dv[i] != 0.f ? 1.0f / dv[i] : 0.f;
                }
            }
        }
        const float d = dv[b % 16], id = iv[b % 16];
        __m512 vd = _mm512_set1_ps(d), vid = _mm512_set1_ps(id);
        __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, vid)), i1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, vid));
        _mm_storeu_si128((__m128i *)(q + b * qs), _mm512_cvtepi32_epi8(i0));
        _mm_storeu_si128((__m128i *)(q + b * qs + 16), _mm512_cvtepi32_epi8(i1));
        __m512i j0 = _mm512_setzero_si512(), j1 = _mm512_setzero_si512();
        if (q2) {
            __m512 r0 = _mm512_sub_ps(x0, _mm512_mul_round_ps(vd, _mm512_cvtepi32_ps(i0), RNE));
            __m512 r1 = _mm512_sub_ps(x1, _mm512_mul_round_ps(vd, _mm512_cvtepi32_ps(i1), RNE));
            j0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(r0, vid), s256));
            j1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(r1, vid), s256));
            j0 = _mm512_max_epi32(_mm512_min_epi32(j0, lim), nlim);
            j1 = _mm512_max_epi32(_mm512_min_epi32(j1, lim), nlim);
            _mm_storeu_si128((__m128i *)(q2 + b * qs), _mm512_cvtepi32_epi8(j0));
            _mm_storeu_si128((__m128i *)(q2 + b * qs + 16), _mm512_cvtepi32_epi8(j1));
        }
        int sums[4];  /* the halves' sums of q, then of q2 */
        sum4_epi32(i0, i1, j0, j1, sums);
        float dd = q2 ? d * (1.0f / 256.0f) : d;
        if (d8) _mm256_storeu_ps(dx + b * ds, _mm256_set1_ps(dd));
        else dx[b * ds] = dd;
        act_sums(sx, ss, nb, b, d, sums, sums + 2, q2 != NULL);
    }
}

/* the same quantization as quantize_any, 32 values (two registers) a step: bit for bit
 * (same operations in the same order, d q rounded before the subtraction as in C; cvtps rounds
 * half to even like nearbyintf; the integer sums in any order) */
T512 static void quantize_strided_512(const float *x, int K, int8_t *q, size_t qs, int8_t *q2, float *dx,
                                      size_t ds, int d8, float *sx, size_t ss) {
    quantize_512(x, K, q, qs, q2, dx, ds, d8, sx, ss);
}
#endif
/* the other paths' (kernels_avx2.h, kernels_neon.h) */
#if HL_X86
T256 static void quantize_strided_256(const float *x, int K, int8_t *q, size_t qs, int8_t *q2, float *dx,
                                      size_t ds, int d8, float *sx, size_t ss);
T256 static void quantize_a16_256(const float *x, int K, int16_t *a, size_t as, float *dx, size_t ds, float *sx,
                                  size_t ss);
#elif HL_ARM
static void quantize_strided_neon(const float *x, int K, int8_t *q, size_t qs, int8_t *q2, float *dx, size_t ds,
                                  int d8, float *sx, size_t ss);
#endif

typedef void (*quant_fn)(const float *x, int K, int8_t *q, size_t qs, int8_t *q2, float *dx, size_t ds, int d8,
                         float *sx, size_t ss);

/* the narrowest vectors a model of this process was set to use (hl_model_set_threads; 0 scalar,
 * 1 256-bit or NEON, 2 AVX512): a path forced below the CPU's best (to measure or test it)
 * quantizes its activations with that width too */
static int quant_width = 2;
static int path_width(int p) { return p == P_SCALAR ? 0 : p == P_AVX512 ? 2 : 1; }

/* the quantizer of the best path this CPU has, no wider than a forced path's (every one gives
 * the same bits) */
static quant_fn quantizer(void) {
    const int best = hl_best_path(), w = LOAD(&quant_width, RLX);
    const int p = path_width(best) <= w ? best : w == 0 ? P_SCALAR : is_neon(best) ? best : P_AVX2;
#if HL_X86
    return p == P_AVX512 ? quantize_strided_512 : p != P_SCALAR ? quantize_strided_256 : quantize_any;
#elif HL_ARM
    return p != P_SCALAR ? quantize_strided_neon : quantize_any;
#else
    (void)p;
    return quantize_any;
#endif
}

static void quantize_row(const float *x, int K, int8_t *q, float *dx, float *sx, int8_t *q2) {
    quantizer()(x, K, q, 32, q2, dx, 8, 1, sx, 1);
}

/* Tile modes, the layout of a tile's quantized activations (see TILE): TM_ONE one level, TM_TWO
 * two (a block's q of the tile's rows, then their q2), TM_A16 two levels as one int16 a value,
 * a = 256 q + q2 (|a| <= 32639; row r's 32 values of block b at b TILE 32 + r 32 int16, the bytes
 * of TM_TWO): P_AVX2's kernels for more than one row widen the weights to int16 once a block and
 * make the same integer dots w . a = 256 (w . q) + (w . q2) with vpmaddwd alone (kernels_avx2_tile.h).
 * A packed kernel (tile_fn) takes its tile's mode as hi = mode - 1. */
enum { TM_ONE = 1, TM_TWO = 2, TM_A16 = 3 };
static int tile_mode(int path, int hi, int M) { return !hi ? TM_ONE : path == P_AVX2 && M > 1 ? TM_A16 : TM_TWO; }

/* row r of a tile (see TILE) in tile mode L (TM_*) */
static void quantize_tile_row(const float *x, int K, int L, int8_t *qt, float *dxt, float *sxt, int r) {
    if (L == TM_A16) {  /* both levels quantized as for TM_TWO, then joined */
#if HL_X86  /* (TM_A16: P_AVX2's tiles, so this CPU has AVX2) */
        quantize_a16_256(x, K, (int16_t *)qt + r * 32, (size_t)TILE * 32, dxt + r, TILE, sxt + r, TILE);
        return;
#endif
        int8_t q[K], q2[K];
        quantizer()(x, K, q, 32, q2, dxt + r, TILE, 0, sxt + r, TILE);
        int16_t *a = (int16_t *)qt + r * 32;
        for (int b = 0; b < K / 32; b++)
            for (int j = 0; j < 32; j++) a[(size_t)b * TILE * 32 + j] = (int16_t)(q[b * 32 + j] * 256 + q2[b * 32 + j]);
        return;
    }
    quantizer()(x, K, qt + r * 32, (size_t)TILE * 32 * L, L == 2 ? qt + r * 32 + TILE * 32 : NULL, dxt + r, TILE, 0,
                sxt + r, TILE);
}

/* one row as a tile of one (T = 1: its blocks, levels, scales and sums side by side, K L bytes):
 * a decode step's activations, compact where a TILE-wide tile spreads one row over 16x the
 * bytes (the down projection's 48 KB: past L1) */
static void quantize_row1(const float *x, int K, int L, int8_t *q, float *dx, float *sx) {
    quantizer()(x, K, q, (size_t)32 * L, L == 2 ? q + 32 : NULL, dx, 1, 0, sx, 1);
}

/* ---- dot kernels: one weight row against R activation rows -------------------------------- */
/* out[r] = dot(w_row, a_r); a_r at q + r*K, d/s + r*K/4 */

typedef void (*kern_fn)(const uint8_t *w, int type, int K, const int8_t *q, const float *dx,
                        const float *sx, int R, float *out, const int8_t *q2);

/* ---- ext types (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K): the generic form of the header ---------------- */

static void kx_scalar(const uint8_t *w, int t, int K, const int8_t *q, const float *dx,
                      const float *sx, int R, float *out, const int8_t *q2) {
    const int nb = K / 32, K4 = K / 4;
    float acc[R], sc[16], mn[8], s0, s1, m;
    int8_t v[32];
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    for (int b = 0; b < nb; b++) {
        ext_scales(t, w, b, sc, mn, &s0, &s1, &m);
        ext_vals(t, w, b, v);
        for (int r = 0; r < R; r++) {
            const int8_t *a = q + (size_t)r * K + b * 32;
            int i0 = 0, i1 = 0;
            for (int j = 0; j < 16; j++) { i0 += v[j] * a[j]; i1 += v[j + 16] * a[j + 16]; }
            if (q2) {
                const int8_t *a2 = q2 + (size_t)r * K + b * 32;
                int k0 = 0, k1 = 0;
                for (int j = 0; j < 16; j++) { k0 += v[j] * a2[j]; k1 += v[j + 16] * a2[j + 16]; }
                i0 = i0 * 256 + k0; i1 = i1 * 256 + k1;
            }
            acc[r] += dx[(size_t)r * K4 + b * 8] * (s0 * (float)i0 + s1 * (float)i1) + m * sx[(size_t)r * K4 + b];
        }
    }
    for (int r = 0; r < R; r++) out[r] = acc[r];
}

static void kern_scalar(const uint8_t *w, int t, int K, const int8_t *q, const float *dx,
                        const float *sx, int R, float *out, const int8_t *q2) {
    if (is_ext(t)) { kx_scalar(w, t, K, q, dx, sx, R, out, q2); return; }
    int nb = K / 32, bs = type_block_bytes(t);
    for (int r = 0; r < R; r++) {
        const int8_t *a = q + (size_t)r * K, *a2 = q2 ? q2 + (size_t)r * K : NULL;
        const float *ad = dx + (size_t)r * K / 4, *as = sx + (size_t)r * K / 4;
        float acc = 0.f;
        for (int b = 0; b < nb; b++) {
            const uint8_t *p = w + (size_t)b * bs;
            const int8_t *ab = a + b * 32, *ab2 = a2 ? a2 + b * 32 : NULL;
            float d = h2f(p);
            int isum = 0, isum2 = 0;
            if (t == T_Q8_0) {
                for (int j = 0; j < 32; j++) isum += (int8_t)p[2 + j] * ab[j];
                if (ab2) { for (int j = 0; j < 32; j++) isum2 += (int8_t)p[2 + j] * ab2[j]; isum = isum * 256 + isum2; }
                acc += d * ad[b * 8] * (float)isum;
            } else {
                const uint8_t *qs = p + (t == T_Q4_1 ? 4 : 2);
                for (int j = 0; j < 16; j++) isum += (qs[j] & 15) * ab[j] + (qs[j] >> 4) * ab[j + 16];
                if (ab2) {
                    for (int j = 0; j < 16; j++) isum2 += (qs[j] & 15) * ab2[j] + (qs[j] >> 4) * ab2[j + 16];
                    isum = isum * 256 + isum2;
                }
                float m = t == T_Q4_1 ? h2f(p + 2) : -8.f * d;
                acc += d * ad[b * 8] * (float)isum + m * as[b];
            }
        }
        out[r] = acc;
    }
}

#if HL_X86
static void kx_avx2(const uint8_t *w, int t, int K, const int8_t *q, const float *dx,
                    const float *sx, int R, float *out, const int8_t *q2);
static void kx_512(const uint8_t *w, int t, int K, const int8_t *q, const float *dx,
                   const float *sx, int R, float *out, const int8_t *q2);

/* AVX2: one block per 256-bit register */
T256 INLINE float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

T256 INLINE void kern_avx2_body(const uint8_t *w, int t, int K, const int8_t *q, const float *dx,
                                const float *sx, const int R, float *out, const int8_t *q2, const int hi) {
    int nb = K / 32, bs = type_block_bytes(t), K4 = K / 4;
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    const __m256i lo = _mm256_set1_epi8(15);
    const __m256i ones = _mm256_set1_epi16(1);
    float mrow[nb];
    for (int b = 0; b < nb; b++) {
        const uint8_t *p = w + (size_t)b * bs;
        __m256 dv = _mm256_set1_ps(_cvtsh_ss(*(const uint16_t *)p));
        if (t == T_Q8_0) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(p + 2));
            __m256i aw = _mm256_abs_epi8(wv);
            for (int r = 0; r < R; r++) {
                __m256i a = _mm256_loadu_si256((const __m256i *)(q + (size_t)r * K + b * 32));
                __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(a, wv)), ones);
                if (hi) {
                    __m256i a2 = _mm256_loadu_si256((const __m256i *)(q2 + (size_t)r * K + b * 32));
                    s = _mm256_add_epi32(_mm256_slli_epi32(s, 8),
                                         _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(a2, wv)), ones));
                }
                __m256 sc = _mm256_mul_ps(dv, _mm256_loadu_ps(dx + (size_t)r * K4 + b * 8));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, acc[r]);
            }
        } else {
            const uint8_t *qs = p + (t == T_Q4_1 ? 4 : 2);
            __m128i x = _mm_loadu_si128((const __m128i *)qs);
            __m256i wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(x, 4), x), lo);
            float m = t == T_Q4_1 ? _cvtsh_ss(*(const uint16_t *)(p + 2)) : -8.f * _cvtsh_ss(*(const uint16_t *)p);
            mrow[b] = m;
            for (int r = 0; r < R; r++) {
                __m256i a = _mm256_loadu_si256((const __m256i *)(q + (size_t)r * K + b * 32));
                __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, a), ones);
                if (hi) {
                    __m256i a2 = _mm256_loadu_si256((const __m256i *)(q2 + (size_t)r * K + b * 32));
                    s = _mm256_add_epi32(_mm256_slli_epi32(s, 8), _mm256_madd_epi16(_mm256_maddubs_epi16(wv, a2), ones));
                }
                __m256 sc = _mm256_mul_ps(dv, _mm256_loadu_ps(dx + (size_t)r * K4 + b * 8));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, acc[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        float o = hsum256(acc[r]);
        if (t != T_Q8_0) { const float *sr = sx + (size_t)r * K4; for (int b = 0; b < nb; b++) o += mrow[b] * sr[b]; }
        out[r] = o;
    }
}

#define DISPATCH_R(body, RR) \
    do { if (q2) body(w, t, K, q, dx, sx, RR, out, q2, 1); else body(w, t, K, q, dx, sx, RR, out, q2, 0); } while (0)

T256 static void kern_avx2(const uint8_t *w, int t, int K, const int8_t *q, const float *dx,
                           const float *sx, int R, float *out, const int8_t *q2) {
    if (is_ext(t)) { kx_avx2(w, t, K, q, dx, sx, R, out, q2); return; }
    while (R > 0) {
        int K4 = K / 4;
        if (R >= 4) DISPATCH_R(kern_avx2_body, 4);
        else if (R == 1) DISPATCH_R(kern_avx2_body, 1);
        else if (R == 2) DISPATCH_R(kern_avx2_body, 2);
        else DISPATCH_R(kern_avx2_body, 3);
        int n = R >= 4 ? 4 : R;
        R -= n; out += n; q += (size_t)n * K; dx += (size_t)n * K4; sx += (size_t)n * K4;
        if (q2) q2 += (size_t)n * K;
    }
}

/* AVX512-VNNI: two blocks per 512-bit register, a 256-bit step for an odd last block */
T512 INLINE void kern_512_body(const uint8_t *w, int t, int K, const int8_t *q, const float *dx,
                               const float *sx, const int R, float *out, const int8_t *q2, const int hi) {
    int nb = K / 32, bs = type_block_bytes(t), K4 = K / 4;
    __m512 acc[8];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const __m512i lo = _mm512_set1_epi8(15);
    const __m512i zero = _mm512_setzero_si512();
    const __m512i perm = _mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0);  /* [q0, q0, q1, q1] */
    const __m512i shifts = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);  /* low, high nibbles */
    const int off = t == T_Q4_1 ? 4 : 2;
    float mrow[nb + 16];
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *p0 = w + (size_t)b * bs, *p1 = p0 + bs;
        float d0 = _cvtsh_ss(*(const uint16_t *)p0), d1 = _cvtsh_ss(*(const uint16_t *)p1);
        __m512 dv = _mm512_insertf32x8(_mm512_set1_ps(d0), _mm256_set1_ps(d1), 1);
        if (t == T_Q8_0) {
            __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p0 + 2))),
                                            _mm256_loadu_si256((const __m256i *)(p1 + 2)), 1);
            __m512i aw = _mm512_abs_epi8(wv);
            __mmask64 neg = _mm512_movepi8_mask(wv);
            for (int r = 0; r < R; r++) {
                __m512i a = _mm512_loadu_si512((const void *)(q + (size_t)r * K + b * 32));
                a = _mm512_mask_sub_epi8(a, neg, zero, a);
                __m512i s = _mm512_dpbusd_epi32(zero, aw, a);
                if (hi) {
                    __m512i a2 = _mm512_loadu_si512((const void *)(q2 + (size_t)r * K + b * 32));
                    a2 = _mm512_mask_sub_epi8(a2, neg, zero, a2);
                    s = _mm512_dpbusd_epi32(_mm512_slli_epi32(s, 8), aw, a2);
                }
                __m512 sc = _mm512_mul_ps(dv, _mm512_loadu_ps(dx + (size_t)r * K4 + b * 8));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[r]);
            }
        } else {
            __m128i x0 = _mm_loadu_si128((const __m128i *)(p0 + off)), x1 = _mm_loadu_si128((const __m128i *)(p1 + off));
            __m512i x = _mm512_permutexvar_epi64(perm, _mm512_castsi256_si512(_mm256_set_m128i(x1, x0)));
            __m512i wv = _mm512_and_si512(_mm512_srlv_epi64(x, shifts), lo);
            float m0, m1;
            if (t == T_Q4_1) { m0 = _cvtsh_ss(*(const uint16_t *)(p0 + 2)); m1 = _cvtsh_ss(*(const uint16_t *)(p1 + 2)); }
            else { m0 = -8.f * d0; m1 = -8.f * d1; }
            mrow[b] = m0; mrow[b + 1] = m1;
            for (int r = 0; r < R; r++) {
                __m512i a = _mm512_loadu_si512((const void *)(q + (size_t)r * K + b * 32));
                __m512i s = _mm512_dpbusd_epi32(zero, wv, a);
                if (hi) s = _mm512_dpbusd_epi32(_mm512_slli_epi32(s, 8), wv,
                                                _mm512_loadu_si512((const void *)(q2 + (size_t)r * K + b * 32)));
                __m512 sc = _mm512_mul_ps(dv, _mm512_loadu_ps(dx + (size_t)r * K4 + b * 8));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[r]);
            }
        }
    }
    if (b < nb) {  /* odd last block: 256-bit VNNI */
        const uint8_t *p = w + (size_t)b * bs;
        float d = _cvtsh_ss(*(const uint16_t *)p);
        __m256 dv = _mm256_set1_ps(d);
        for (int r = 0; r < R; r++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(q + (size_t)r * K + b * 32));
            __m256 sc = _mm256_mul_ps(dv, _mm256_loadu_ps(dx + (size_t)r * K4 + b * 8));
            __m256 part;
            if (t == T_Q8_0) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(p + 2));
                __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(wv), _mm256_sign_epi8(a, wv));
                if (hi) {
                    __m256i a2 = _mm256_loadu_si256((const __m256i *)(q2 + (size_t)r * K + b * 32));
                    s = _mm256_dpbusd_epi32(_mm256_slli_epi32(s, 8), _mm256_abs_epi8(wv), _mm256_sign_epi8(a2, wv));
                }
                part = _mm256_mul_ps(_mm256_cvtepi32_ps(s), sc);
            } else {
                __m128i x = _mm_loadu_si128((const __m128i *)(p + off));
                __m256i wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(x, 4), x), _mm256_set1_epi8(15));
                __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, a);
                if (hi) s = _mm256_dpbusd_epi32(_mm256_slli_epi32(s, 8), wv,
                                                _mm256_loadu_si256((const __m256i *)(q2 + (size_t)r * K + b * 32)));
                mrow[b] = t == T_Q4_1 ? _cvtsh_ss(*(const uint16_t *)(p + 2)) : -8.f * d;
                part = _mm256_mul_ps(_mm256_cvtepi32_ps(s), sc);
            }
            acc[r] = _mm512_add_ps(acc[r], _mm512_insertf32x8(_mm512_setzero_ps(), part, 0));
        }
    }
    if (t != T_Q8_0) {  /* min terms: acc_r += sum_b m_b s_rb */
        for (int b0 = 0; b0 < nb; b0 += 16) {
            __mmask16 k = nb - b0 >= 16 ? 0xffff : (__mmask16)((1u << (nb - b0)) - 1);
            __m512 mv = _mm512_maskz_loadu_ps(k, mrow + b0);
            for (int r = 0; r < R; r++)
                acc[r] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k, sx + (size_t)r * K4 + b0), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

T512 static void kern_512(const uint8_t *w, int t, int K, const int8_t *q, const float *dx,
                          const float *sx, int R, float *out, const int8_t *q2) {
    if (is_ext(t)) { kx_512(w, t, K, q, dx, sx, R, out, q2); return; }
    int K4 = K / 4;
    while (R > 0) {
        int n;
        switch (R) {
            case 1: DISPATCH_R(kern_512_body, 1); n = 1; break;
            case 2: DISPATCH_R(kern_512_body, 2); n = 2; break;
            case 3: DISPATCH_R(kern_512_body, 3); n = 3; break;
            case 4: DISPATCH_R(kern_512_body, 4); n = 4; break;
            default:
                if (R >= 8) { DISPATCH_R(kern_512_body, 8); n = 8; }
                else { DISPATCH_R(kern_512_body, 4); n = 4; }
        }
        R -= n; out += n; q += (size_t)n * K; dx += (size_t)n * K4; sx += (size_t)n * K4;
        if (q2) q2 += (size_t)n * K;
    }
}

/* byte j of the result: 0xFF where bit j of h is set (j = 0..31) */
T256 INLINE __m256i bits_to_bytes(uint32_t h) {
    const __m256i idx = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)h), idx);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

/* ext_vals in one register: block b's 32 integer weights, in order */
T256 INLINE __m256i vals256(int t, const uint8_t *w, int b) {
    const __m256i m4 = _mm256_set1_epi8(15);
    if (t == T_Q5_0 || t == T_Q5_1) {
        const uint8_t *p = w + (size_t)b * (t == T_Q5_1 ? 24 : 22), *qh = p + (t == T_Q5_1 ? 4 : 2);
        uint32_t h; memcpy(&h, qh, 4);
        __m128i x = _mm_loadu_si128((const __m128i *)(qh + 4));
        __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(x, 4), x), m4);
        return _mm256_or_si256(v, _mm256_and_si256(bits_to_bytes(h), _mm256_set1_epi8(16)));
    }
    const int j = b & 7;
    const uint8_t *p = w + (size_t)(b >> 3) * type_block_bytes(t);
    if (t == T_Q6_K) {
        const int k = j & 3, hf = j >> 2;
        __m256i ql = _mm256_loadu_si256((const __m256i *)(p + 64 * hf + 32 * (k & 1)));
        __m256i qh = _mm256_loadu_si256((const __m256i *)(p + 128 + 32 * hf));
        ql = _mm256_and_si256(_mm256_srl_epi16(ql, _mm_cvtsi32_si128(4 * (k >> 1))), m4);
        qh = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k)), _mm256_set1_epi8(3));
        return _mm256_sub_epi8(_mm256_or_si256(ql, _mm256_slli_epi16(qh, 4)), _mm256_set1_epi8(32));
    }
    __m256i qs = _mm256_loadu_si256((const __m256i *)(p + (t == T_Q5_K ? 48 : 16) + 32 * (j >> 1)));
    __m256i v = _mm256_and_si256(_mm256_srl_epi16(qs, _mm_cvtsi32_si128(4 * (j & 1))), m4);
    if (t == T_Q5_K) {
        const __m256i bit = _mm256_set1_epi8((char)(1 << j));
        __m256i qh = _mm256_loadu_si256((const __m256i *)(p + 16));
        v = _mm256_or_si256(v, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit),
                                                _mm256_set1_epi8(16)));
    }
    return v;
}

/* AVX2: one block per register; Q6_K's signed weights by the abs/sign trick of Q8_0 */
T256 INLINE void kx_avx2_body(const uint8_t *w, int t, int K, const int8_t *q, const float *dx,
                              const float *sx, const int R, float *out, const int8_t *q2, const int hi) {
    const int nb = K / 32, K4 = K / 4, sgn = t == T_Q6_K;
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    float mrow[nb], sc[16], mn[8], s0, s1, m;
    for (int b = 0; b < nb; b++) {
        ext_scales(t, w, b, sc, mn, &s0, &s1, &m);
        mrow[b] = m;
        const __m256 dv = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0));
        const __m256i wv = vals256(t, w, b), aw = sgn ? _mm256_abs_epi8(wv) : wv;
        for (int r = 0; r < R; r++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(q + (size_t)r * K + b * 32));
            if (sgn) a = _mm256_sign_epi8(a, wv);
            __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, a), ones);
            if (hi) {
                __m256i a2 = _mm256_loadu_si256((const __m256i *)(q2 + (size_t)r * K + b * 32));
                if (sgn) a2 = _mm256_sign_epi8(a2, wv);
                s = _mm256_add_epi32(_mm256_slli_epi32(s, 8), _mm256_madd_epi16(_mm256_maddubs_epi16(aw, a2), ones));
            }
            __m256 scl = _mm256_mul_ps(dv, _mm256_loadu_ps(dx + (size_t)r * K4 + b * 8));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scl, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        float o = hsum256(acc[r]);
        if (!sgn) { const float *sr = sx + (size_t)r * K4; for (int b = 0; b < nb; b++) o += mrow[b] * sr[b]; }
        out[r] = o;
    }
}

T256 static void kx_avx2(const uint8_t *w, int t, int K, const int8_t *q, const float *dx,
                         const float *sx, int R, float *out, const int8_t *q2) {
    const int K4 = K / 4;
    while (R > 0) {
        if (R >= 4) DISPATCH_R(kx_avx2_body, 4);
        else if (R == 1) DISPATCH_R(kx_avx2_body, 1);
        else if (R == 2) DISPATCH_R(kx_avx2_body, 2);
        else DISPATCH_R(kx_avx2_body, 3);
        int n = R >= 4 ? 4 : R;
        R -= n; out += n; q += (size_t)n * K; dx += (size_t)n * K4; sx += (size_t)n * K4;
        if (q2) q2 += (size_t)n * K;
    }
}

/* AVX512-VNNI: two blocks per register (lane scales s0 s0 s0 s0 s1 s1 s1 s1 per block) */
T512 INLINE void kx_512_body(const uint8_t *w, int t, int K, const int8_t *q, const float *dx,
                             const float *sx, const int R, float *out, const int8_t *q2, const int hi) {
    const int nb = K / 32, K4 = K / 4, sgn = t == T_Q6_K;
    __m512 acc[8];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    const __m512i lane4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    float mrow[nb + 16], sc[16], mn[8], s[4], m0, m1;
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        ext_scales(t, w, b, sc, mn, &s[0], &s[1], &m0);
        ext_scales(t, w, b + 1, sc, mn, &s[2], &s[3], &m1);
        mrow[b] = m0; mrow[b + 1] = m1;
        /* (a vector load of the 4 just-stored floats would stall on store forwarding) */
        const __m512 dv = _mm512_permutexvar_ps(lane4, _mm512_castps128_ps512(_mm_setr_ps(s[0], s[1], s[2], s[3])));
        const __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(vals256(t, w, b)), vals256(t, w, b + 1), 1);
        const __m512i aw = sgn ? _mm512_abs_epi8(wv) : wv;
        const __mmask64 neg = sgn ? _mm512_movepi8_mask(wv) : 0;
        for (int r = 0; r < R; r++) {
            __m512i a = _mm512_loadu_si512((const void *)(q + (size_t)r * K + b * 32));
            if (sgn) a = _mm512_mask_sub_epi8(a, neg, zero, a);
            __m512i i = _mm512_dpbusd_epi32(zero, aw, a);
            if (hi) {
                __m512i a2 = _mm512_loadu_si512((const void *)(q2 + (size_t)r * K + b * 32));
                if (sgn) a2 = _mm512_mask_sub_epi8(a2, neg, zero, a2);
                i = _mm512_dpbusd_epi32(_mm512_slli_epi32(i, 8), aw, a2);
            }
            __m512 scl = _mm512_mul_ps(dv, _mm512_loadu_ps(dx + (size_t)r * K4 + b * 8));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), scl, acc[r]);
        }
    }
    if (b < nb) {  /* odd last block (Q5_x only: K-quant rows hold 8 blocks per super-block) */
        ext_scales(t, w, b, sc, mn, &s[0], &s[1], &m0);
        mrow[b] = m0;
        const __m256 dv = _mm256_set_m128(_mm_set1_ps(s[1]), _mm_set1_ps(s[0]));
        const __m256i wv = vals256(t, w, b);
        for (int r = 0; r < R; r++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(q + (size_t)r * K + b * 32));
            __m256i i = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, a);
            if (hi) i = _mm256_dpbusd_epi32(_mm256_slli_epi32(i, 8), wv,
                                            _mm256_loadu_si256((const __m256i *)(q2 + (size_t)r * K + b * 32)));
            __m256 part = _mm256_mul_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(dv, _mm256_loadu_ps(dx + (size_t)r * K4 + b * 8)));
            acc[r] = _mm512_add_ps(acc[r], _mm512_insertf32x8(_mm512_setzero_ps(), part, 0));
        }
    }
    if (!sgn) {  /* min terms: acc_r += sum_b m_b s_rb */
        for (int b0 = 0; b0 < nb; b0 += 16) {
            __mmask16 k = nb - b0 >= 16 ? 0xffff : (__mmask16)((1u << (nb - b0)) - 1);
            __m512 mv = _mm512_maskz_loadu_ps(k, mrow + b0);
            for (int r = 0; r < R; r++)
                acc[r] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k, sx + (size_t)r * K4 + b0), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

T512 static void kx_512(const uint8_t *w, int t, int K, const int8_t *q, const float *dx,
                        const float *sx, int R, float *out, const int8_t *q2) {
    const int K4 = K / 4;
    while (R > 0) {
        int n;
        switch (R) {
            case 1: DISPATCH_R(kx_512_body, 1); n = 1; break;
            case 2: DISPATCH_R(kx_512_body, 2); n = 2; break;
            case 3: DISPATCH_R(kx_512_body, 3); n = 3; break;
            case 4: DISPATCH_R(kx_512_body, 4); n = 4; break;
            default:
                if (R >= 8) { DISPATCH_R(kx_512_body, 8); n = 8; }
                else { DISPATCH_R(kx_512_body, 4); n = 4; }
        }
        R -= n; out += n; q += (size_t)n * K; dx += (size_t)n * K4; sx += (size_t)n * K4;
        if (q2) q2 += (size_t)n * K;
    }
}

#endif  /* HL_X86 */

/* the raw-block kernels of a path (NEON: the scalar ones; its packed kernels take every type) */
static kern_fn kernel_for(int path) {
#if HL_X86
    if (path == P_AVX512) return kern_512;
    if (is_avx2(path)) return kern_avx2;
#endif
    (void)path;
    return kern_scalar;
}
static int tile_rows(int path) { return path == P_AVX512 ? 8 : 4; }

/* float weights (F32/F16): dot of a dequantized row with a float activation */
static float fdot(const float *a, const float *b, int K) {
    float s = 0.f;
    for (int i = 0; i < K; i++) s += a[i] * b[i];
    return s;
}

/* ---- matmul: y (M, N) = x (M, K) @ W^T ------------------------------------------------------ */

typedef struct {
    const float *x; int M, K; const uint8_t *w; int64_t rb; int type, N; float *y;
    int8_t *q, *q2; float *dx, *sx; kern_fn kern; int R, NB, nblk, fail;
} matmul_t;

static int matmul_items(void *a, int p) {
    const matmul_t *t = a;
    return !is_quant(t->type) ? t->N : p == 0 ? t->M : t->nblk;
}

/* phase 0: float weights: rows i0..i1 of W against every x row; quantized: x rows i0..i1 to
 * int8; phase 1: groups of NB weight rows against tiles of R activation rows */
static void matmul_run(void *a, int p, int i0, int i1, int tid) {
    (void)tid;
    matmul_t *t = a;
    const int M = t->M, K = t->K, N = t->N;
    if (!is_quant(t->type)) {
        float *row = malloc((size_t)K * 4);
        if (!row) { STORE(&t->fail, 1, RLX); return; }
        for (int n = i0; n < i1; n++) {
            dequant_row(t->type, t->w + (size_t)n * t->rb, K, row);
            for (int m = 0; m < M; m++) t->y[(size_t)m * N + n] = fdot(t->x + (size_t)m * K, row, K);
        }
        free(row);
        return;
    }
    if (p == 0) {
        for (int m = i0; m < i1; m++)
            quantize_row(t->x + (size_t)m * K, K, t->q + (size_t)m * K, t->dx + (size_t)m * K / 4,
                         t->sx + (size_t)m * K / 4, t->q2 ? t->q2 + (size_t)m * K : NULL);
        return;
    }
    float out[8];
    for (int ib = i0; ib < i1; ib++) {
        int n1 = (ib + 1) * t->NB < N ? (ib + 1) * t->NB : N;
        for (int m0 = 0; m0 < M; m0 += t->R) {
            int r = M - m0 < t->R ? M - m0 : t->R;
            for (int n = ib * t->NB; n < n1; n++) {
                t->kern(t->w + (size_t)n * t->rb, t->type, K, t->q + (size_t)m0 * K, t->dx + (size_t)m0 * K / 4,
                        t->sx + (size_t)m0 * K / 4, r, out, t->q2 ? t->q2 + (size_t)m0 * K : NULL);
                for (int i = 0; i < r; i++) t->y[(size_t)(m0 + i) * N + n] = out[i];
            }
        }
    }
}

int hl_matmul(const float *x, int M, int K, const uint8_t *w, int64_t row_bytes, int type, int N,
              float *y, int nthreads, int path, int hi) {
    if (path < 0) path = hl_best_path();
    if (!path_ok(path)) return -2;
    if (!type_block_bytes(type) || K % type_qk(type)) return -1;
    matmul_t t = {x, M, K, w, row_bytes, type, N, y, NULL, NULL, NULL, NULL, kernel_for(path), tile_rows(path), 16,
                  (N + 15) / 16, 0};
    if (is_quant(type)) {
        t.q = malloc((size_t)M * K * (hi ? 2 : 1)); t.q2 = hi && t.q ? t.q + (size_t)M * K : NULL;
        t.dx = malloc((size_t)M * K); t.sx = malloc((size_t)M * K);  /* K/4 floats per row each */
        if (!t.q || !t.dx || !t.sx) { free(t.q); free(t.dx); free(t.sx); return -3; }
    }
    const job_t job = {is_quant(type) ? 2 : 1, matmul_items, matmul_run, NULL, &t};
    pool_run(&job, nthreads);
    free(t.q); free(t.dx); free(t.sx);
    return t.fail ? -3 : 0;
}

/* ---- packed weights: G rows side by side (16: AVX512, 8: AVX2 and NEON) ------------------- */
/* Per group of G weight rows (N padded with zero rows) and 32-block b, pk_size(kind, G) bytes at
 * (g nb + b) times that; a chunk c is 4G bytes: row n's bytes 4n..4n+3 hold its values 4c..4c+3
 * (nibble kinds: low nibbles values 4c..4c+3, high nibbles values 16+4c..16+4c+3), so one dot
 * product instruction against 4 broadcast activation bytes advances G rows at once, and the
 * float scaling runs once per (block, G rows) instead of once per (block, row).
 * PK_Q4 (Q4_1): [0, 2G) d f16 xG rows, [2G, 4G) m f16 xG, 4 chunks of the raw qs (a byte
 *   reorder: exact);
 * PK_Q4S (Q4_0): [0, 2G) d f16 xG, 4 chunks of the raw qs: no min, the offset 8 comes off the
 *   integer dot (w = d (u - 8)); the file's 18 bytes a row and block;
 * PK_Q8 (Q8_0): [0, 2G) d f16 xG, then 8 chunks of bytes: G = 16 (dpbusd's unsigned operand)
 *   u = q + 128 (the offset 128 comes off the integer dot: w = d (u - 128)); G = 8, q itself; the
 *   file's 34 bytes a row and block (a decode step streams the bytes the file holds);
 * PK_Q4K (Q4_K), PK_Q5K (Q5_K, Q5_1), PK_Q6K (Q6_K): [0, 4G) A f32 xG, [4G, 8G) B f32 xG, then the
 *   32 unsigned integer weights of each row: Q4_K 4 chunks of nibbles (w = A u4 + B: A = d sc_j,
 *   B = -dmin mn_j), Q5_K and Q5_1 8 chunks of bytes (w = A u5 + B), Q6_K 8 chunks of bytes
 *   u6 = q6 + 32, A and B the scales of values 0..15 and 16..31 (w = s_h (u6 - 32); the -32 s_h
 *   terms take the activation's half sums). The scales are float32 products of the file's f16 d
 *   and its 6- or 8-bit sub-block scales: exact (what ggml's dequantization computes). 1.33x
 *   (Q4_K), 1.82x (Q5_K), 1.67x (Q5_1), 1.52x (Q6_K) the bytes.
 * PK_Q5 (Q5_0): d halves and the low nibbles as PK_Q4S, then the 5th bits (4G bytes), which the
 *   kernels set into the nibbles' bytes as 16; the offset 16 comes off the integer dot as Q4_0's
 *   8 does (the dot is then Q8_0's of the same weights, u5 - 16: the bits of the Q8_0 copy it
 *   replaces; the file's 22 bytes). G = 16: 8 chunks of G / 2 bytes, bit 4n + i of chunk c for
 *   value 4c + i of row n (AVX512: a chunk's 64 bits are a byte mask); G = 8: byte 4n + i, bit c
 *   (a 16-bit shift by 4 - c and an and with 16 make chunk c's bytes: AVX2, NEON).
 * Only PK_Q4 and the f32 kinds keep a second scale (PK_HAS_M); the integers of a block start at
 * pk_wo(kind, G) bytes. */
enum { PK_Q4 = 0, PK_Q8 = 1, PK_Q4K = 2, PK_Q5K = 3, PK_Q6K = 4, PK_Q4S = 5, PK_Q5 = 6, PK_KINDS = 7 };
static const int PK_SIZE[PK_KINDS] = {320, 544, 384, 640, 640, 288, 352};  /* bytes a block, G = 16 */
#define PK_F32(kind) ((kind) == PK_Q4K || (kind) == PK_Q5K || (kind) == PK_Q6K)  /* f32 scales */
#define PK_NIB(kind) ((kind) == PK_Q4 || (kind) == PK_Q4S || (kind) == PK_Q4K || (kind) == PK_Q5)  /* nibbles */
#define PK_HAS_M(kind) ((kind) == PK_Q4 || PK_F32(kind))  /* a second scale (m, B, or Q6_K's s1) */

static inline size_t pk_size(int kind, int G) { return (size_t)PK_SIZE[kind] / 16 * G; }
/* where a block's integers start: after its scales (G rows of d, and m or B where it has one) */
static inline size_t pk_wo(int kind, int G) { return (size_t)(PK_F32(kind) ? 4 : 2) * G * (PK_HAS_M(kind) ? 2 : 1); }

/* the packed kind of a ggml type, -1 where it has none */
int hl_pack_kind(int type) {
    switch (type) {
    case T_Q4_0: return PK_Q4S;
    case T_Q5_0: return PK_Q5;
    case T_Q4_1: return PK_Q4;
    case T_Q8_0: return PK_Q8;
    case T_Q4_K: return PK_Q4K;
    case T_Q5_K: case T_Q5_1: return PK_Q5K;
    case T_Q6_K: return PK_Q6K;
    default: return -1;
    }
}

static int good_g(int G) { return G == 16 || G == 8; }

/* bytes of N rows of K values of `type` packed G rows a group (-1: no such pack) */
int64_t hl_packed_bytes(int type, int N, int K, int G) {
    const int kind = hl_pack_kind(type);
    return kind < 0 || !good_g(G) ? -1 : (int64_t)((N + G - 1) / G) * (K / 32) * (int64_t)pk_size(kind, G);
}

/* Q4_0 / Q4_1 (PK_Q4S, PK_Q4), Q8_0 (PK_Q8) and Q5_0 (PK_Q5): d halves (and Q4_1's m), the raw
 * values reordered */
static int repack_q(int type, const uint8_t *w, int64_t row_bytes, int N, int K, uint8_t *out, int G) {
    const int nb = K / 32, bs = type_block_bytes(type), kind = hl_pack_kind(type), ng = (N + G - 1) / G;
    const size_t bb = pk_size(kind, G), wo = pk_wo(kind, G);
    memset(out, 0, (size_t)hl_packed_bytes(type, N, K, G));
    for (int g = 0; g < ng; g++)
        for (int b = 0; b < nb; b++) {
            uint8_t *o = out + ((size_t)g * nb + b) * bb;
            for (int j = 0; j < G && g * G + j < N; j++) {
                const uint8_t *p = w + (size_t)(g * G + j) * row_bytes + (size_t)b * bs;
                memcpy(o + 2 * j, p, 2);
                if (type == T_Q8_0) {  /* G = 16: u = q + 128 */
                    for (int c = 0; c < 8; c++)
                        for (int i = 0; i < 4; i++)
                            o[wo + c * 4 * G + j * 4 + i] = G == 16 ? p[2 + 4 * c + i] ^ 0x80 : p[2 + 4 * c + i];
                    continue;
                }
                if (type == T_Q5_0) {  /* the nibbles, the 5th bits */
                    uint32_t h; memcpy(&h, p + 2, 4);
                    for (int c = 0; c < 4; c++) memcpy(o + wo + c * 4 * G + j * 4, p + 6 + 4 * c, 4);
                    for (int v = 0; v < 32; v++)
                        if (h >> v & 1) {
                            if (G == 16) o[wo + 16 * G + (v / 4) * (G / 2) + (4 * j + v % 4) / 8] |= (uint8_t)(1u << ((4 * j + v % 4) % 8));
                            else o[wo + 16 * G + 4 * j + v % 4] |= (uint8_t)(1u << (v / 4));
                        }
                    continue;
                }
                if (type == T_Q4_1) memcpy(o + 2 * G + 2 * j, p + 2, 2);  /* m */
                const uint8_t *qs = p + (type == T_Q4_1 ? 4 : 2);
                for (int c = 0; c < 4; c++) memcpy(o + wo + c * 4 * G + j * 4, qs + 4 * c, 4);
            }
        }
    return 0;
}

/* the K-quants and Q5_1 (PK_Q4K, PK_Q5K, PK_Q6K): f32 scales, unsigned integer weights */
static int repack_ext(int type, const uint8_t *w, int64_t row_bytes, int N, int K, uint8_t *out, int G) {
    const int kind = hl_pack_kind(type), nb = K / 32;
    const size_t bb = pk_size(kind, G);
    memset(out, 0, (size_t)hl_packed_bytes(type, N, K, G));
    float sc[16], mn[8], s0, s1, m;
    int8_t v[32];
    for (int n = 0; n < N; n++) {
        const uint8_t *row = w + (size_t)n * row_bytes;
        const int g = n / G, j = n % G;
        for (int b = 0; b < nb; b++) {
            uint8_t *o = out + ((size_t)g * nb + b) * bb;
            ext_scales(type, row, b, sc, mn, &s0, &s1, &m);
            ext_vals(type, row, b, v);
            float A = s0, B = kind == PK_Q6K ? s1 : m;
            if (kind != PK_Q6K && s0 != s1) return -1;
            memcpy(o + 4 * j, &A, 4);
            memcpy(o + 4 * G + 4 * j, &B, 4);
            for (int c = 0; c < 8; c++)
                for (int i = 0; i < 4; i++) {
                    const int val = v[4 * c + i] + (kind == PK_Q6K ? 32 : 0);  /* 0..63 */
                    if (kind == PK_Q4K) {  /* chunk c & 3, low nibble for values 0..15, high for 16..31 */
                        o[8 * G + (c & 3) * 4 * G + j * 4 + i] |= (uint8_t)(c < 4 ? val : val << 4);
                    } else {
                        o[8 * G + c * 4 * G + j * 4 + i] = (uint8_t)val;
                    }
                }
        }
    }
    return 0;
}

/* any packable type (hl_pack_kind), G rows a group (hl_pack_rows of the path that computes on it):
 * out holds hl_packed_bytes(type, N, K, G) bytes. 0, or -1 (a type, K or G it does not take) */
int hl_repack(int type, const uint8_t *w, int64_t row_bytes, int N, int K, uint8_t *out, int G) {
    const int kind = hl_pack_kind(type);
    if (kind < 0 || K % type_qk(type) || !good_g(G)) return -1;
    if (kind == PK_Q4 || kind == PK_Q4S || kind == PK_Q8 || kind == PK_Q5) return repack_q(type, w, row_bytes, N, K, out, G);
    return repack_ext(type, w, row_bytes, N, K, out, G);
}

#ifndef PF_DIST
#define PF_DIST 4096  /* bytes ahead (1B Q4_0 decode, 2 cores: 58.5 -> 64-67 tok/s; 2K: 61, 8K: 63) */
#endif

/* Activations in tiles (T = TILE): the quantized rows of TILE consecutive rows side by side,
 * block by block: block b of row r at q + b * TILE * 32 * levels + r * 32, its second level
 * TILE * 32 bytes further, its scale at dx[b * TILE + r] and its sums at sx[j * TILE + r]
 * (j < ACT_SUMS nb, as act_sums). Every address of a block's rows is then one register plus a
 * constant (and the broadcasts fold into the dpbusd: dpbusd_b): with one pointer per row (T = 0,
 * row-major) the rows' addresses spill (62% -> 74-80% of the dpbusd peak, one core, cache-resident). */

/* a packed kernel: rows 0..R-1 (R <= TILE) of one activation tile against G packed weight rows
 * into out (R, G); hi: two levels; kind: PK_* */
typedef void (*tile_fn)(const uint8_t *pk, int K, const int8_t *q, const float *dx, const float *sx, int R,
                        float *out, int hi, int kind);

#if HL_X86
T512 INLINE __m512i bcast4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm512_set1_epi32(v); }

/* acc + w . the 4 bytes at p broadcast (vpdpbusd with an embedded broadcast: one load-op, where
 * gcc otherwise loads the broadcast into a register of its own first) */
T512 INLINE __m512i dpbusd_b(__m512i acc, __m512i w, const int8_t *p) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const int32_t *)p));
    return acc;
}

/* one level of a row's block (32 bytes at a) against its 16 weight rows (w: values 4c..4c+3),
 * each half apart: i0 values 0..15, i1 16..31 (two chains of four) */
T512 INLINE void halves_dots(const __m512i *w, const int8_t *a, __m512i *i0, __m512i *i1) {
    __m512i s0 = dpbusd_b(_mm512_setzero_si512(), w[0], a), s1 = dpbusd_b(_mm512_setzero_si512(), w[4], a + 16);
    for (int c = 1; c < 4; c++) {
        s0 = dpbusd_b(s0, w[c], a + 4 * c);
        s1 = dpbusd_b(s1, w[c + 4], a + 16 + 4 * c);
    }
    *i0 = s0; *i1 = s1;
}

/* out (R, 16) = 16 packed weight rows against R activation rows; `kind` a constant (PK_*);
 * T: 0 row-major (q, q2 rows of K bytes, dx/sx rows of K/4 floats; decode), or TILE (tiled,
 * q2 unused, R <= TILE) */
T512 INLINE void packed_body(const uint8_t *pk, int K, const int8_t *q, const float *dx, const float *sx,
                             const int R, float *out, const int8_t *q2, const int hi, const int kind,
                             const int T, const __m512i *wb) {
    const int nb = K / 32, K4 = K / 4, nib = PK_NIB(kind), f32 = PK_F32(kind);
    const size_t bb = PK_SIZE[kind], wo = pk_wo(kind, 16), qb = (size_t)T * 32 * (hi ? 2 : 1);
    __m512 acc[8];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const __m512i lo = _mm512_set1_epi8(15);
    for (int b = 0; b < nb; b++) {
        const uint8_t *p = pk + (size_t)b * bb;
        /* one row (decode): the weights stream once, ahead of the hardware prefetcher's reach */
        if (R == 1) for (int o = 0; o < (int)bb; o += 64) _mm_prefetch((const char *)p + PF_DIST + o, _MM_HINT_T0);
        /* d and m (Q4_x, Q8_0, Q5_0: f16; K-quants: f32), or for Q6_K the halves' scales s0, s1;
         * no m where the kind has none (PK_HAS_M) */
        __m512 dw, mw;
        __m512i w[8];
        if (wb) {  /* the group unpacked once for the call's tiles (u512_group) */
            const __m512i *u = wb + (size_t)10 * b;
            for (int c = 0; c < 8; c++) w[c] = _mm512_load_si512((const void *)(u + c));
            dw = _mm512_castsi512_ps(_mm512_load_si512((const void *)(u + 8)));
            mw = _mm512_castsi512_ps(_mm512_load_si512((const void *)(u + 9)));
        } else {
            dw = f32 ? _mm512_loadu_ps((const float *)p) : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
            mw = f32 ? _mm512_loadu_ps((const float *)(p + 64))
               : PK_HAS_M(kind) ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32))) : _mm512_setzero_ps();
            if (!nib) {
                for (int c = 0; c < 8; c++) w[c] = _mm512_loadu_si512((const void *)(p + wo + 64 * c));
            } else {
                for (int c = 0; c < 4; c++) {
                    __m512i x = _mm512_loadu_si512((const void *)(p + wo + 64 * c));
                    w[c] = _mm512_and_si512(x, lo);
                    w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(x, 4), lo);
                }
                if (kind == PK_Q5)  /* the 5th bits: + 16 where set */
                    for (int c = 0; c < 8; c++) {
                        uint64_t h; memcpy(&h, p + wo + 256 + 8 * c, 8);
                        w[c] = _mm512_mask_add_epi8(w[c], _cvtu64_mask64(h), w[c], _mm512_set1_epi8(16));
                    }
            }
        }
#define ROWA(r) (T ? q + b * qb + (r) * 32 : q + (size_t)(r) * K + b * 32)
#define ROWA2(r) (T ? q + b * qb + (r) * 32 + T * 32 : q2 + (size_t)(r) * K + b * 32)
        /* the row's scale and its sums j (block b: j = b; its halves: j = nb + 2 b + h) */
#define SX(r, j) (T ? sx[(size_t)(j) * T + (r)] : sx[(size_t)(r) * K4 + (j)])
#define ISX(r, j) (T ? ((const int32_t *)sx)[(size_t)(j) * T + (r)] : ((const int32_t *)sx)[(size_t)(r) * K4 + (j)])
#define DA(r) _mm512_set1_ps(T ? dx[(size_t)b * T + (r)] : dx[(size_t)(r) * K4 + b * 8])
        if (kind == PK_Q6K || R < 4) {  /* a row at a time, 4 chains of dot products a row (2 levels; Q6_K:
                                         * the halves' scales need I0 and I1 apart) */
            _Pragma("GCC unroll 8")
            for (int r = 0; r < R; r++) {
                const int8_t *a = ROWA(r);
                /* i0: values 0..15 of the block, i1: values 16..31 */
                __m512i i0, i1;
                halves_dots(w, a, &i0, &i1);
                if (hi) {
                    __m512i j0, j1;
                    halves_dots(w, ROWA2(r), &j0, &j1);
                    i0 = _mm512_add_epi32(_mm512_slli_epi32(i0, 8), j0);
                    i1 = _mm512_add_epi32(_mm512_slli_epi32(i1, 8), j1);
                }
                const __m512 da = DA(r);
                if (kind == PK_Q6K) {  /* s0 (I0 da - 32 hs0) + s1 (I1 da - 32 hs1) (-32 hs: the sums) */
                    __m512 t0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), da, _mm512_set1_ps(SX(r, nb + 2 * b)));
                    __m512 t1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), da, _mm512_set1_ps(SX(r, nb + 2 * b + 1)));
                    acc[r] = _mm512_fmadd_ps(t0, dw, acc[r]);
                    acc[r] = _mm512_fmadd_ps(t1, mw, acc[r]);
                } else if (kind == PK_Q4S || kind == PK_Q8 || kind == PK_Q5) {  /* d da ((u . q) - off sum(q)) */
                    const __m512i os = _mm512_set1_epi32(ISX(r, 3 * nb + b) << (kind == PK_Q8 ? 7 : kind == PK_Q5 ? 4 : 3));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(i0, i1), os)),
                                             _mm512_mul_ps(dw, da), acc[r]);
                } else {
                    __m512 sc = _mm512_mul_ps(dw, da);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1)), sc, acc[r]);
                    acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(SX(r, b)), acc[r]);
                }
            }
            continue;
        }
        /* the other kinds: each row's integer dot I over the block's 32 values (w[c]: values
         * 4c .. 4c+3), one chain a row with the rows side by side (the chains' latencies
         * overlap without a long window); two levels: 256 I1 + I2, the second level's products
         * added onto the first's shifted; the offset kinds then subtract off sum(q): the same
         * integers as the sums of the halves' dot products */
        __m512i iv[8];
        _Pragma("GCC unroll 8")
        for (int c = 0; c < 8; c++) {
            _Pragma("GCC unroll 8")
            for (int r = 0; r < R; r++)
                iv[r] = dpbusd_b(c ? iv[r] : _mm512_setzero_si512(), w[c], ROWA(r) + 4 * c);
        }
        if (hi) {
            _Pragma("GCC unroll 8")
            for (int r = 0; r < R; r++) iv[r] = _mm512_slli_epi32(iv[r], 8);
            _Pragma("GCC unroll 8")
            for (int c = 0; c < 8; c++) {
                _Pragma("GCC unroll 8")
                for (int r = 0; r < R; r++) iv[r] = dpbusd_b(iv[r], w[c], ROWA2(r) + 4 * c);
            }
        }
        _Pragma("GCC unroll 8")
        for (int r = 0; r < R; r++) {
            const __m512 da = DA(r);
            if (kind == PK_Q4S || kind == PK_Q8 || kind == PK_Q5) {  /* d da ((u . q) - off sum(q)) */
                const __m512i os = _mm512_set1_epi32(ISX(r, 3 * nb + b) << (kind == PK_Q8 ? 7 : kind == PK_Q5 ? 4 : 3));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(iv[r], os)), _mm512_mul_ps(dw, da), acc[r]);
            } else {
                __m512 sc = _mm512_mul_ps(dw, da);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iv[r]), sc, acc[r]);
                acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(SX(r, b)), acc[r]);
            }
        }
#undef ROWA
#undef ROWA2
#undef SX
#undef ISX
#undef DA
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out + 16 * r, acc[r]);
}

#define PBK(RR, HI, TT) do { switch (kind) { \
        case PK_Q4: packed_body(pk, K, q, dx, sx, RR, out, q2, HI, PK_Q4, TT, wb); break; \
        case PK_Q4S: packed_body(pk, K, q, dx, sx, RR, out, q2, HI, PK_Q4S, TT, wb); break; \
        case PK_Q8: packed_body(pk, K, q, dx, sx, RR, out, q2, HI, PK_Q8, TT, NULL); break; \
        case PK_Q4K: packed_body(pk, K, q, dx, sx, RR, out, q2, HI, PK_Q4K, TT, wb); break; \
        case PK_Q5K: packed_body(pk, K, q, dx, sx, RR, out, q2, HI, PK_Q5K, TT, NULL); break; \
        case PK_Q5: packed_body(pk, K, q, dx, sx, RR, out, q2, HI, PK_Q5, TT, wb); break; \
        default: packed_body(pk, K, q, dx, sx, RR, out, q2, HI, PK_Q6K, TT, NULL); } } while (0)

/* A thread's unpacked groups of nibble kinds (PK_NIB): per 32-block 8 vectors of weight bytes
 * (Q5_0's fifth bits added) then d and m as floats, what packed_body makes of a block, made once
 * for a group's tiles instead of once a tile (Q5_0 gate/up, one core: ~6% of the kernel). The
 * last two groups met (a gated MLP's gate and up take turns), each valid within one call
 * (u512_epoch: bumped by every call, tiles_new_call, so a group never outlives its weights);
 * freed with the thread; NULL where memory runs out (then unpacked block by block). */
typedef struct { const uint8_t *pk; int K, kind; unsigned epoch; size_t cap; __m512i *wb; } u512_slot_t;
static unsigned u512_epoch;
static __thread u512_slot_t u512_slots[2];
static __thread int u512_turn;
static pthread_key_t u512_key;
static pthread_once_t u512_once = PTHREAD_ONCE_INIT;
static void u512_free(void *s) { u512_slot_t *sl = s; free(sl[0].wb); free(sl[1].wb); }
static void u512_key_make(void) { (void)pthread_key_create(&u512_key, u512_free); }
static void u512_new_call(void) { __atomic_add_fetch(&u512_epoch, 1, __ATOMIC_RELAXED); }

T512 static const __m512i *u512_group(const uint8_t *pk, int K, int kind) {
    const unsigned ep = LOAD(&u512_epoch, RLX);
    for (int i = 0; i < 2; i++) {
        const u512_slot_t *sl = &u512_slots[i];
        if (sl->wb && sl->pk == pk && sl->K == K && sl->kind == kind && sl->epoch == ep) return sl->wb;
    }
    u512_slot_t *sl = &u512_slots[u512_turn];
    u512_turn ^= 1;
    const size_t need = (size_t)(K / 32) * 10 * sizeof(__m512i);
    if (sl->cap < need) {
        if (!sl->wb) { (void)pthread_once(&u512_once, u512_key_make); (void)pthread_setspecific(u512_key, u512_slots); }
        free(sl->wb);
        sl->wb = aligned_alloc(64, need);
        sl->cap = sl->wb ? need : 0;
        if (!sl->wb) return NULL;
    }
    const size_t bb = PK_SIZE[kind], wo = pk_wo(kind, 16);
    const __m512i lo = _mm512_set1_epi8(15);
    for (int b = 0; b < K / 32; b++) {
        const uint8_t *p = pk + (size_t)b * bb;
        __m512i *u = sl->wb + (size_t)10 * b;
        for (int c = 0; c < 4; c++) {
            __m512i x = _mm512_loadu_si512((const void *)(p + wo + 64 * c));
            u[c] = _mm512_and_si512(x, lo);
            u[c + 4] = _mm512_and_si512(_mm512_srli_epi16(x, 4), lo);
        }
        if (kind == PK_Q5)
            for (int c = 0; c < 8; c++) {
                uint64_t h; memcpy(&h, p + wo + 256 + 8 * c, 8);
                u[c] = _mm512_mask_add_epi8(u[c], _cvtu64_mask64(h), u[c], _mm512_set1_epi8(16));
            }
        const int f32 = PK_F32(kind);
        u[8] = _mm512_castps_si512(f32 ? _mm512_loadu_ps((const float *)p) : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)));
        u[9] = _mm512_castps_si512(f32 ? _mm512_loadu_ps((const float *)(p + 64))
                                   : PK_HAS_M(kind) ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32))) : _mm512_setzero_ps());
    }
    sl->pk = pk; sl->K = K; sl->kind = kind; sl->epoch = ep;
    return sl->wb;
}

/* rows 0..R-1 (R <= TILE) of one activation tile (see TILE), hi: two levels */
T512 static void packed_tile_512(const uint8_t *pk, int K, const int8_t *q, const float *dx, const float *sx,
                             int R, float *out, int hi, int kind) {
    const int8_t *q2 = NULL;
    const __m512i *wb = R > 1 && PK_NIB(kind) ? u512_group(pk, K, kind) : NULL;
    while (R > 0) {
        const int n = R >= 8 ? 8 : R >= 4 ? 4 : R >= 2 ? 2 : 1;
        if (hi) { if (n == 8) PBK(8, 1, TILE); else if (n == 4) PBK(4, 1, TILE); else if (n == 2) PBK(2, 1, TILE); else PBK(1, 1, TILE); }
        else { if (n == 8) PBK(8, 0, TILE); else if (n == 4) PBK(4, 0, TILE); else if (n == 2) PBK(2, 0, TILE); else PBK(1, 0, TILE); }
        R -= n; out += 16 * n; q += 32 * n; dx += n; sx += n;
    }
}
/* one activation row quantized by quantize_row1 (T = 1): the same operations as its row in a
 * tile, so the same bits */
T512 static void packed_row1_512(const uint8_t *pk, int K, const int8_t *q, const float *dx, const float *sx,
                                 float *out, int hi, int kind) {
    const int8_t *q2 = NULL;
    const __m512i *wb = NULL;
    if (hi) PBK(1, 1, 1); else PBK(1, 0, 1);
}
#undef PBK
#endif  /* HL_X86 */

/* row n of a packed matrix (G rows a group), dequantized: the floats dequant_row gives for the raw
 * blocks (the packed scales, mins and integers rebuild each weight exactly; the embedding of a
 * packed table) */
static void pk_dequant_row(int kind, const uint8_t *pk, int K, int n, int G, float *out) {
    const int nb = K / 32, g = n / G, j = n % G, f32 = PK_F32(kind), nib = PK_NIB(kind), cs = 4 * G;
    const int s8 = kind == PK_Q8 && G != 16;  /* Q8_0's own signed bytes */
    /* the integer offset of the kinds without a min: w = d (u - off), exact in float */
    const int off = kind == PK_Q8 ? (s8 ? 0 : 128) : kind == PK_Q4S ? 8 : kind == PK_Q5 ? 16 : 0;
    const size_t wo = pk_wo(kind, G);
    for (int b = 0; b < nb; b++) {
        const uint8_t *o = pk + ((size_t)g * nb + b) * pk_size(kind, G), *w = o + wo;
        float A, B = 0.f;
        if (f32) { memcpy(&A, o + 4 * j, 4); memcpy(&B, o + 4 * G + 4 * j, 4); }
        else { A = h2f(o + 2 * j); if (PK_HAS_M(kind)) B = h2f(o + 2 * G + 2 * j); }
        for (int v = 0; v < 32; v++) {
            const int c = v / 4, i = v % 4;
            int u = nib ? (c < 4 ? w[c * cs + j * 4 + i] & 15 : w[(c - 4) * cs + j * 4 + i] >> 4)
                  : s8 ? (int8_t)w[c * cs + j * 4 + i] : w[c * cs + j * 4 + i];
            if (kind == PK_Q5)
                u |= (G == 16 ? w[16 * G + c * (G / 2) + (4 * j + i) / 8] >> ((4 * j + i) % 8) & 1
                              : w[16 * G + 4 * j + i] >> c & 1) << 4;
            out[b * 32 + v] = kind == PK_Q6K ? (v < 16 ? A : B) * (float)(u - 32)
                            : PK_HAS_M(kind) ? A * (float)u + B : A * (float)(u - off);
        }
    }
}

/* the packed rows of group g (G rows) of a matrix of `kind` */
static inline const uint8_t *pk_group(const uint8_t *pk, int kind, int g, int K, int G) {
    return pk + (size_t)g * (K / 32) * pk_size(kind, G);
}

/* ---- activation functions -------------------------------------------------------------------- */

enum { ACT_SILU, ACT_GELU_TANH, ACT_GELU };

/* GELU, tanh approximation (HF gelu_pytorch_tanh: Gemma) or erf (HF gelu: GPT-NeoX) */
static float gelu_tanh(float x) { return x / (1.f + expf(-1.5957691216057308f * (x + 0.044715f * x * x * x))); }
static float gelu_erf(float x) { return 0.5f * x * (1.f + erff(x * 0.7071067811865476f)); }

#if HL_X86
/* exp(x) for 16 floats (Cephes expf: range reduction by ln 2, degree-5 polynomial; ~1 ulp) */
T512 INLINE __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* SiLU-gated product of 16 lanes, g / (1 + e^-g) u: the packed gate/up epilogue and the row step
 * alike (one function: the same bits either way) */
T512 INLINE __m512 silu16(__m512 gv, __m512 uv) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    return _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), uv);
}

/* GeGLU of 16 lanes (Gemma): GELU's tanh form 0.5 g (1 + tanh(v)), v = sqrt(2/pi) (g + 0.044715 g^3),
 * written as g / (1 + e^-2v), times u; as silu16, one function for the epilogue and the row step */
T512 INLINE __m512 geglu16(__m512 gv, __m512 uv) {
    const __m512 v2 = _mm512_mul_ps(_mm512_set1_ps(-1.5957691216057308f),
                                    _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(gv, gv), gv), _mm512_set1_ps(0.044715f), gv));
    return _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(v2))), uv);
}

T512 INLINE __m512 glu16(int act, __m512 gv, __m512 uv) { return act == ACT_SILU ? silu16(gv, uv) : geglu16(gv, uv); }

T512 static void glu_row_512(int act, const float *g, const float *u, float *h, int n) {
    for (int j = 0; j < n; j += 16) {
        const __mmask16 k = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        _mm512_mask_storeu_ps(h + j, k, glu16(act, _mm512_maskz_loadu_ps(k, g + j), _mm512_maskz_loadu_ps(k, u + j)));
    }
}
#endif  /* HL_X86 */

/* the same activation quantization, exposed for the tests' reference */
void hl_quantize_rows(const float *x, int M, int K, int8_t *q, float *d, float *s, int8_t *q2) {
    for (int m = 0; m < M; m++) {
        float dx[K / 4 + 8], sx[K / 4 + 8];
        quantize_row(x + (size_t)m * K, K, q + (size_t)m * K, dx, sx, q2 ? q2 + (size_t)m * K : NULL);
        for (int b = 0; b < K / 32; b++) { d[m * (K / 32) + b] = dx[b * 8]; s[m * (K / 32) + b] = sx[b]; }
    }
}

/* one row quantized by `path`'s quantizer (P_SCALAR: quantize_any), all it writes: q (and q2)
 * K bytes, dx K/32 scales, sx K/32 * ACT_SUMS sums (act_sums' layout, ss = 1); -2: a path this
 * CPU does not run. The tests hold every path's bits to quantize_any's. */
int hl_quantize_row_path(const float *x, int K, int path, int8_t *q, int8_t *q2, float *dx, float *sx) {
    if (K % 32 || !path_ok(path)) return K % 32 ? -1 : -2;
    quant_fn f = quantize_any;
#if HL_X86
    if (path == P_AVX512) f = quantize_strided_512;
    else if (path != P_SCALAR) f = quantize_strided_256;
#elif HL_ARM
    if (path != P_SCALAR) f = quantize_strided_neon;
#endif
    f(x, K, q, 32, q2, dx, 1, 0, sx, 1);
    return 0;
}

void hl_dequant_rows(int type, const uint8_t *w, int64_t row_bytes, int N, int K, float *out) {
    for (int n = 0; n < N; n++) dequant_row(type, w + (size_t)n * row_bytes, K, out + (size_t)n * K);
}

/* element i of a cache row, f32 or f16 */
INLINE float kv_at(const void *row, int f16, size_t i) {
    return f16 ? h2f((const uint8_t *)((const uint16_t *)row + i)) : ((const float *)row)[i];
}

#if HL_X86
T512 INLINE __m512 kv_ld16(const void *row, int f16, size_t i) {
    return f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i)))
               : _mm512_loadu_ps((const float *)row + i);
}

T256 INLINE __m256 kv_ld8(const void *row, int f16, size_t i) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)))
               : _mm256_loadu_ps((const float *)row + i);
}
#endif

/* ==== causal attention for prefill (flash-style) ===========================================
 * y[t, h*hd + d] = sum_j softmax_j(scale q[t,h] . k[j,g]) v[j,g,d], keys j <= start_pos + t,
 * g = h / (nh / nkv) (GQA: each kv head's K/V tile serves its nh/nkv query heads).
 * Tiles of AQ queries x all their group's heads against AK keys, with the online softmax of
 * FlashAttention (Dao et al. 2022, alg. 1): running max m, sum l, output rescaled by exp(m_old - m).
 * Only key tiles at or below the diagonal are visited. q, k, v are read through strides (values):
 * q[t, h] at q + t*qst + h*qsh; k[j, g] at k + j*kst + g*ksh (v alike), float32 or, with f16,
 * IEEE halves (a KV cache as it is stored: each value converted exactly as it is loaded);
 * out is (T, nh*hd).
 * Each (query, head) row's result depends only on its query, its keys and values 0..its position
 * and the key tiles' bounds (multiples of AK from 0): never on the other rows of its tile (rows
 * past their diagonal add exact zeros), so a query gives the same bits whichever chunk of its
 * sequence it comes in, alone or with others. */

#define AQ 16  /* queries per tile */
#define AK 64  /* keys per tile */

typedef struct {
    const float *q; const void *k, *v; int64_t qst, qsh, kst, ksh, vst, vsh;
    int T, nh, nkv, hd, sp, f16; float scale; float *out;
    int win;  /* sliding window: query position p sees keys p - win + 1 .. p only (0: all to p) */
} attn_t;

/* the first key a query at position p sees, and the first key tile (a multiple of AK, so that
 * a row meets the same tiles alone or in any chunk) that the queries from position p0 see */
INLINE int attn_lo(const attn_t *a, int p) { return a->win > 0 && p - a->win + 1 > 0 ? p - a->win + 1 : 0; }
INLINE int attn_k0(const attn_t *a, int p0) { return attn_lo(a, p0) / AK * AK; }

/* exp(x) for float32, Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-5 polynomial (~1 ulp) */
INLINE float exp_poly(float x) {
    x = x < -87.3f ? -87.3f : x > 88.3f ? 88.3f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f; p = p * r + 8.3334519073E-3f; p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f; p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.f;
    union { int32_t i; float f; } u = { .i = ((int32_t)n + 127) << 23 };
    return p * u.f;
}

/* the portable tile: one row (query, head) at a time, the key tile's scores in a buffer */
INLINE void attn_item_generic(const attn_t *a, int g, int qt, float *ws) {
    const int r = a->nh / a->nkv, hd = a->hd, q0 = qt * AQ, bq = a->T - q0 < AQ ? a->T - q0 : AQ;
    float *o = ws, *s = ws + hd;
    for (int hh = 0; hh < r; hh++) {
        const int h = g * r + hh;
        for (int t = 0; t < bq; t++) {
            const float *qv = a->q + (size_t)(q0 + t) * a->qst + (size_t)h * a->qsh;
            const int kend = a->sp + q0 + t + 1, lo = attn_lo(a, kend - 1);
            float m = -INFINITY, l = 0.f;
            for (int d = 0; d < hd; d++) o[d] = 0.f;
            for (int k0 = lo / AK * AK; k0 < kend; k0 += AK) {
                const int nk = kend - k0 < AK ? kend - k0 : AK, j0 = lo > k0 ? lo - k0 : 0;
                float mx = -INFINITY;
                for (int j = j0; j < nk; j++) {
                    const size_t kj = (size_t)(k0 + j) * a->kst + (size_t)g * a->ksh;
                    float acc = 0.f;
                    for (int d = 0; d < hd; d++) acc += qv[d] * kv_at(a->k, a->f16, kj + d);
                    s[j] = acc * a->scale;
                    mx = s[j] > mx ? s[j] : mx;
                }
                const float mn = m > mx ? m : mx, c = expf(m - mn);
                float sum = 0.f;
                for (int j = j0; j < nk; j++) { s[j] = exp_poly(s[j] - mn); sum += s[j]; }
                l = l * c + sum; m = mn;
                for (int d = 0; d < hd; d++) o[d] *= c;
                for (int j = j0; j < nk; j++) {
                    const size_t vj = (size_t)(k0 + j) * a->vst + (size_t)g * a->vsh;
                    const float p = s[j];
                    for (int d = 0; d < hd; d++) o[d] += p * kv_at(a->v, a->f16, vj + d);
                }
            }
            float *y = a->out + (size_t)(q0 + t) * a->nh * hd + (size_t)h * hd;
            for (int d = 0; d < hd; d++) y[d] = o[d] / l;
        }
    }
}

static void attn_item_scalar(const attn_t *a, int g, int qt, float *ws) { attn_item_generic(a, g, qt, ws); }

#if HL_X86
/* exp(x) for 8 floats: exp512's Cephes polynomial; 2^n built in the exponent bits */
T256 INLINE __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

T256 INLINE float hmax256(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    x = _mm_max_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

/* the 8 x 8 transpose of 8 rows at element `at` + j ss of src (f32, or halves with f16; rows
 * j >= n: zeros): r[d] holds dimension d of the 8 rows */
T256 INLINE void transpose8_r(const void *src, int f16, size_t at, int64_t ss, int n, __m256 *r) {
    __m256 t[8], u[8];
    if (n >= 8) {  /* (a whole block: no test a row) */
        if (f16) for (int i = 0; i < 8; i++) r[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + at + (size_t)i * ss)));
        else for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps((const float *)src + at + (size_t)i * ss);
    } else {
        for (int i = 0; i < 8; i++) r[i] = i < n ? kv_ld8(src, f16, at + (size_t)i * ss) : _mm256_setzero_ps();
    }
    for (int i = 0; i < 8; i += 2) { t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]); t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]); }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44); u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44); u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* one row's key tile: scores pr[0 .. jp) -> the online softmax's P (keys lo <= j <= lim of nk),
 * and its m, l, c updated; no key in the tile: P = 0, c = 1 (exactly nothing) */
T256 INLINE void attn_softmax_256(float *pr, int jp, int lim, int lo, int nk, float *m, float *l, float *c) {
    if (lim < 0 || lo > lim || lo >= nk) {
        *c = 1.f;
        for (int j = 0; j < jp; j += 8) _mm256_storeu_ps(pr + j, _mm256_setzero_ps());
        return;
    }
    const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 limv = _mm256_set1_ps((float)lim), lov = _mm256_set1_ps((float)lo), ninf = _mm256_set1_ps(-INFINITY);
    __m256 mx = ninf;
    for (int j = 0; j < jp; j += 8) {
        __m256 at = _mm256_add_ps(lane, _mm256_set1_ps((float)j));
        __m256 ok = _mm256_and_ps(_mm256_cmp_ps(at, limv, _CMP_LE_OQ), _mm256_cmp_ps(at, lov, _CMP_GE_OQ));
        mx = _mm256_max_ps(mx, _mm256_blendv_ps(ninf, _mm256_loadu_ps(pr + j), ok));
    }
    const float tmax = hmax256(mx), mn = *m > tmax ? *m : tmax;
    *c = expf(*m - mn);
    __m256 sum = _mm256_setzero_ps(), mv = _mm256_set1_ps(mn);
    for (int j = 0; j < jp; j += 8) {
        __m256 at = _mm256_add_ps(lane, _mm256_set1_ps((float)j));
        __m256 ok = _mm256_and_ps(_mm256_cmp_ps(at, limv, _CMP_LE_OQ), _mm256_cmp_ps(at, lov, _CMP_GE_OQ));
        __m256 p = _mm256_and_ps(ok, exp256(_mm256_sub_ps(_mm256_loadu_ps(pr + j), mv)));
        sum = _mm256_add_ps(sum, p);
        _mm256_storeu_ps(pr + j, p);
    }
    *l = *l * *c + hsum256(sum);
    *m = mn;
}

/* rows 0..3 of O (rows of hd) = c O + P[:, :jn] @ V[k0 .., kv head g] (P rows of AK) */
T256 INLINE void attn_pv4_256(const attn_t *a, int g, int k0, int jn, const float *P, const float *c, float *O) {
    const int hd = a->hd;
    const size_t vb = (size_t)k0 * a->vst + (size_t)g * a->vsh;
    for (int d0 = 0; d0 < hd; d0 += 16) {
        const int two = d0 + 16 <= hd;
        __m256 o[4][2];
        for (int rr = 0; rr < 4; rr++) {
            __m256 cr = _mm256_set1_ps(c[rr]);
            float *orow = O + (size_t)rr * hd + d0;
            o[rr][0] = _mm256_mul_ps(cr, _mm256_loadu_ps(orow));
            o[rr][1] = two ? _mm256_mul_ps(cr, _mm256_loadu_ps(orow + 8)) : _mm256_setzero_ps();
        }
        for (int j = 0; j < jn; j++) {
            const size_t vr = vb + (size_t)j * a->vst + d0;
            __m256 v0 = kv_ld8(a->v, a->f16, vr), v1 = two ? kv_ld8(a->v, a->f16, vr + 8) : _mm256_setzero_ps();
            for (int rr = 0; rr < 4; rr++) {
                __m256 p = _mm256_broadcast_ss(P + rr * AK + j);
                o[rr][0] = _mm256_fmadd_ps(p, v0, o[rr][0]);
                o[rr][1] = _mm256_fmadd_ps(p, v1, o[rr][1]);
            }
        }
        for (int rr = 0; rr < 4; rr++) {
            float *orow = O + (size_t)rr * hd + d0;
            _mm256_storeu_ps(orow, o[rr][0]);
            if (two) _mm256_storeu_ps(orow + 8, o[rr][1]);
        }
    }
}

/* attn_item_512's tiles with 8-wide vectors (hd % 8 == 0): scores of 4 rows x 16 keys at a time
 * into P, the softmax on P's rows, then P @ V 4 rows x 16 dims at a time (16 ymm registers) */
T256 static void attn_item_avx2(const attn_t *a, int g, int qt, float *ws) {
    const int r = a->nh / a->nkv, hd = a->hd, q0 = qt * AQ, bq = a->T - q0 < AQ ? a->T - q0 : AQ;
    if (hd % 8) { attn_item_generic(a, g, qt, ws); return; }
    const int R = r * bq, Rp = (R + 3) & ~3;
    float *Qb = ws, *O = Qb + (size_t)Rp * hd, *Kt = O + (size_t)Rp * hd, *P = Kt + (size_t)hd * AK;
    float *m = P + (size_t)Rp * AK, *l = m + Rp, *c = l + Rp;
    int *pos = (int *)(c + Rp);
    for (int i = 0; i < Rp; i++) {
        const int hh = i / bq, t = i % bq;
        pos[i] = i < R ? a->sp + q0 + t : 1 << 30;
        m[i] = -INFINITY; l[i] = 0.f; c[i] = 1.f;
        const float *src = a->q + (size_t)(q0 + t) * a->qst + (size_t)(g * r + hh) * a->qsh;
        for (int d = 0; d < hd; d++) { Qb[(size_t)i * hd + d] = i < R ? src[d] * a->scale : 0.f; O[(size_t)i * hd + d] = 0.f; }
    }
    const int kend = a->sp + q0 + bq;
    for (int k0 = attn_k0(a, a->sp + q0); k0 < kend; k0 += AK) {
        const int nk = kend - k0 < AK ? kend - k0 : AK;
        const size_t kb = (size_t)k0 * a->kst + (size_t)g * a->ksh;
        for (int j0 = 0; j0 < AK; j0 += 8)  /* Kt (hd, AK): the tile's keys as columns */
            for (int d0 = 0; d0 < hd; d0 += 8) {
                __m256 kt[8];
                transpose8_r(a->k, a->f16, kb + (size_t)j0 * a->kst + d0, a->kst, nk - j0, kt);
                for (int dd = 0; dd < 8; dd++) _mm256_storeu_ps(Kt + (d0 + dd) * AK + j0, kt[dd]);
            }
        for (int i0 = 0; i0 < Rp; i0 += 4) {
            int pmax = -1;
            for (int rr = 0; rr < 4; rr++) {
                int p = pos[i0 + rr] < kend - 1 ? pos[i0 + rr] : kend - 1;
                pmax = p > pmax ? p : pmax;
            }
            if (pmax < k0) continue;
            const int jn = pmax - k0 + 1 < nk ? pmax - k0 + 1 : nk;
            for (int j0 = 0; j0 < jn; j0 += 16) {
                __m256 s[4][2];
                for (int rr = 0; rr < 4; rr++) s[rr][0] = s[rr][1] = _mm256_setzero_ps();
                for (int d = 0; d < hd; d++) {
                    __m256 k0v = _mm256_loadu_ps(Kt + d * AK + j0), k1v = _mm256_loadu_ps(Kt + d * AK + j0 + 8);
                    for (int rr = 0; rr < 4; rr++) {
                        __m256 qb = _mm256_broadcast_ss(Qb + (size_t)(i0 + rr) * hd + d);
                        s[rr][0] = _mm256_fmadd_ps(qb, k0v, s[rr][0]);
                        s[rr][1] = _mm256_fmadd_ps(qb, k1v, s[rr][1]);
                    }
                }
                for (int rr = 0; rr < 4; rr++) {
                    _mm256_storeu_ps(P + (i0 + rr) * AK + j0, s[rr][0]);
                    _mm256_storeu_ps(P + (i0 + rr) * AK + j0 + 8, s[rr][1]);
                }
            }
            const int jp = (jn + 7) & ~7;  /* P's columns in use, whole vectors */
            for (int rr = 0; rr < 4; rr++) {
                const int i = i0 + rr, lim = (pos[i] < kend - 1 ? pos[i] : kend - 1) - k0;
                const int lo = (i < R ? attn_lo(a, pos[i]) : 0) - k0;  /* keys k0 + j, lo <= j <= lim */
                attn_softmax_256(P + i * AK, jp, lim, lo, nk, m + i, l + i, c + i);
            }
            attn_pv4_256(a, g, k0, jn, P + i0 * AK, c + i0, O + (size_t)i0 * hd);
        }
    }
    for (int i = 0; i < R; i++) {
        const int hh = i / bq, t = i % bq;
        float *y = a->out + (size_t)(q0 + t) * a->nh * hd + (size_t)(g * r + hh) * hd;
        const float inv = 1.f / l[i];
        for (int d = 0; d < hd; d++) y[d] = O[(size_t)i * hd + d] * inv;
    }
}


/* the scores of a decode row's R <= 8 rows (Qb: scaled queries) against keys j0 .. j0 + 15 of the
 * key tile at kb (nk keys) into out (row i at i ldo, columns j0 ..; keys past nk: zeros): each a
 * chain of fused multiply-adds over d ascending (the prompt tile's order), the two halves'
 * chains in turn, the 8 x 8 key blocks transposed in registers */
T256 INLINE void attn_block_scores_256(const attn_t *a, size_t kb, int j0, int nk, const float *Qb, int R,
                                       float *out, size_t ldo) {
    const int hd = a->hd, nh = j0 + 8 < nk ? 2 : 1;  /* halves with keys */
    __m256 s[8][2];
    for (int i = 0; i < R; i++) s[i][0] = s[i][1] = _mm256_setzero_ps();
    for (int d0 = 0; d0 < hd; d0 += 8)
        for (int h = 0; h < nh; h++) {
            __m256 kt[8];
            transpose8_r(a->k, a->f16, kb + (size_t)(j0 + 8 * h) * a->kst + d0, a->kst, nk - j0 - 8 * h, kt);
            for (int i = 0; i < R; i++)
                for (int dd = 0; dd < 8; dd++)
                    s[i][h] = _mm256_fmadd_ps(_mm256_broadcast_ss(Qb + (size_t)i * hd + d0 + dd), kt[dd], s[i][h]);
        }
    for (int i = 0; i < R; i++) {
        _mm256_storeu_ps(out + (size_t)i * ldo + j0, s[i][0]);
        if (j0 + 8 < AK) _mm256_storeu_ps(out + (size_t)i * ldo + j0 + 8, s[i][1]);
    }
}

/* attn_item_avx2 for a single query (a decode step) and its group's rows R <= 8: its operations
 * on every row in its order (the same bits), with the key blocks transposed in registers rather
 * than through the tile in memory */
T256 static void attn_query_avx2(const attn_t *a, int g, float *ws) {
    const int r = a->nh / a->nkv, hd = a->hd, R = r, Rp = (R + 3) & ~3, p = a->sp;
    float *Qb = ws, *O = Qb + (size_t)Rp * hd, *P = O + (size_t)Rp * hd, m[8], l[8], c[8];
    for (int i = 0; i < Rp; i++) {
        const float *src = a->q + (size_t)(g * r + (i < R ? i : 0)) * a->qsh;
        m[i] = -INFINITY; l[i] = 0.f; c[i] = 1.f;
        for (int d = 0; d < hd; d++) { Qb[(size_t)i * hd + d] = i < R ? src[d] * a->scale : 0.f; O[(size_t)i * hd + d] = 0.f; }
        for (int j = 0; j < AK; j++) P[(size_t)i * AK + j] = 0.f;  /* padding rows: nothing */
    }
    const int kend = p + 1, lo0 = attn_lo(a, p);
    for (int k0 = attn_k0(a, p); k0 < kend; k0 += AK) {
        const int nk = kend - k0 < AK ? kend - k0 : AK;
        const size_t kb = (size_t)k0 * a->kst + (size_t)g * a->ksh;
        for (int j0 = 0; j0 < nk; j0 += 16) {  /* scores of 16 keys: d ascending, as the tile's */
            attn_block_scores_256(a, kb, j0, nk, Qb, R, P, AK);
        }
        const int jp = (nk + 7) & ~7;
        for (int i = 0; i < R; i++) attn_softmax_256(P + i * AK, jp, p - k0, lo0 - k0, nk, m + i, l + i, c + i);
        for (int i0 = 0; i0 < Rp; i0 += 4) attn_pv4_256(a, g, k0, nk, P + i0 * AK, c + i0, O + (size_t)i0 * hd);
    }
    for (int i = 0; i < R; i++) {
        float *y = a->out + (size_t)(g * r + i) * hd;
        const float inv = 1.f / l[i];
        for (int d = 0; d < hd; d++) y[d] = O[(size_t)i * hd + d] * inv;
    }
}

/* a two-phase decode step's score item (attn_query_scores_*): group g's scaled queries into Qb
 * (r rows of hd, as the one-phase kernels scale them) and key tile kt's first key and count */
INLINE void attn_split_tile(const attn_t *a, int g, int kt, float *Qb, int *k0, int *nk) {
    const int r = a->nh / a->nkv, hd = a->hd, p = a->sp;
    for (int i = 0; i < r; i++) {
        const float *src = a->q + (size_t)(g * r + i) * a->qsh;
        for (int d = 0; d < hd; d++) Qb[(size_t)i * hd + d] = src[d] * a->scale;
    }
    *k0 = attn_k0(a, p) + kt * AK;
    *nk = p + 1 - *k0 < AK ? p + 1 - *k0 : AK;
}

/* attn_query_avx2 in two steps (as attn_query_scores_512 / attn_query_head_512): the scores of
 * key tile kt of group g for its r heads into sc, then one head's softmax and P V over its tiles;
 * the same operations on every row in the same order: the same bits */
T256 static void attn_query_scores_avx2(const attn_t *a, int g, int kt, float *sc, size_t sc_stride) {
    const int R = a->nh / a->nkv;
    int k0, nk;
    float Qb[8 * 256];
    attn_split_tile(a, g, kt, Qb, &k0, &nk);
    const size_t kb = (size_t)k0 * a->kst + (size_t)g * a->ksh;
    for (int j0 = 0; j0 < nk; j0 += 16) {
        attn_block_scores_256(a, kb, j0, nk, Qb, R, sc + (size_t)g * R * sc_stride + (size_t)kt * AK, sc_stride);
    }
}

T256 static void attn_query_head_avx2(const attn_t *a, int h, const float *sc, size_t sc_stride) {
    const int r = a->nh / a->nkv, hd = a->hd, p = a->sp, g = h / r;
    float O[256], P[AK], m = -INFINITY, l = 0.f, c = 1.f;
    for (int d = 0; d < hd; d++) O[d] = 0.f;
    const int kend = p + 1, lo0 = attn_lo(a, p);
    int kt = 0;
    for (int k0 = attn_k0(a, p); k0 < kend; k0 += AK, kt++) {
        const int nk = kend - k0 < AK ? kend - k0 : AK, jp = (nk + 7) & ~7;
        const float *row = sc + (size_t)h * sc_stride + (size_t)kt * AK;
        for (int j = 0; j < jp; j++) P[j] = row[j];
        attn_softmax_256(P, jp, p - k0, lo0 - k0, nk, &m, &l, &c);
        /* c O + P V, the lanes' operations of attn_pv4_256, 64 values at a time */
        const size_t vb = (size_t)k0 * a->vst + (size_t)g * a->vsh;
        const __m256 cv = _mm256_set1_ps(c);
        for (int d0 = 0; d0 < hd; d0 += 64) {
            const int nv = (hd - d0) / 8 < 8 ? (hd - d0) / 8 : 8;
            __m256 o[8];
            for (int x = 0; x < nv; x++) o[x] = _mm256_mul_ps(cv, _mm256_loadu_ps(O + d0 + 8 * x));
            for (int j = 0; j < nk; j++) {
                const __m256 pj = _mm256_broadcast_ss(P + j);
                const size_t vr = vb + (size_t)j * a->vst + d0;
                for (int x = 0; x < nv; x++) o[x] = _mm256_fmadd_ps(pj, kv_ld8(a->v, a->f16, vr + 8 * x), o[x]);
            }
            for (int x = 0; x < nv; x++) _mm256_storeu_ps(O + d0 + 8 * x, o[x]);
        }
    }
    float *y = a->out + (size_t)h * hd;
    const float inv = 1.f / l;
    for (int d = 0; d < hd; d++) y[d] = O[d] * inv;
}

/* exp512: the one of the packed matmul's SiLU epilogue, above */

/* O[i0..i0+3, d0 .. d0+16 NV) = c_i O + P[i, :jn] @ V[:jn, d0 ..] for one block of 4 rows; V's
 * rows as floats at vf + j vs (the key tile's first row, converted once for the tile's blocks) */
T512 INLINE void attn_pv_512(int hd, const float *vf, size_t vs, int jn, int i0, int d0, int NV,
                             const float *P, const float *c, float *O) {
    __m512 acc[4][4];
    for (int rr = 0; rr < 4; rr++) {
        __m512 cr = _mm512_set1_ps(c[i0 + rr]);
        for (int x = 0; x < NV; x++)
            acc[rr][x] = _mm512_mul_ps(cr, _mm512_loadu_ps(O + (size_t)(i0 + rr) * hd + d0 + 16 * x));
    }
    const float *vb = vf + d0;
    for (int j = 0; j < jn; j++) {
        __m512 vv[4];
        for (int x = 0; x < NV; x++) vv[x] = _mm512_loadu_ps(vb + (size_t)j * vs + 16 * x);
        for (int rr = 0; rr < 4; rr++) {
            __m512 p = _mm512_set1_ps(P[(i0 + rr) * AK + j]);
            for (int x = 0; x < NV; x++) acc[rr][x] = _mm512_fmadd_ps(p, vv[x], acc[rr][x]);
        }
    }
    for (int rr = 0; rr < 4; rr++)
        for (int x = 0; x < NV; x++) _mm512_storeu_ps(O + (size_t)(i0 + rr) * hd + d0 + 16 * x, acc[rr][x]);
}

/* the scores of rows i0..i0+3 (Qb rows of hd, scaled) against the key tile's first 16 NX keys
 * (Kt (hd, AK)): fused multiply-adds over d ascending from zero; keys 16 NX.. : zeros (masked
 * off by the softmax) */
T512 INLINE void attn_scores_512(int hd, const float *Qb, const float *Kt, int NX, __m512 s[4][4]) {
    for (int rr = 0; rr < 4; rr++) for (int x = 0; x < 4; x++) s[rr][x] = _mm512_setzero_ps();
    for (int d = 0; d < hd; d++) {
        __m512 kv[4];
        for (int x = 0; x < NX; x++) kv[x] = _mm512_loadu_ps(Kt + d * AK + 16 * x);
        for (int rr = 0; rr < 4; rr++) {
            __m512 qb = _mm512_set1_ps(Qb[(size_t)rr * hd + d]);
            for (int x = 0; x < NX; x++) s[rr][x] = _mm512_fmadd_ps(qb, kv[x], s[rr][x]);
        }
    }
}

/* r[d] (16 lanes: rows j) = the transpose of 16 rows at element `at` + j ss of src (f32, or halves
 * with f16; rows j >= n: zeros), in registers */
T512 INLINE void transpose16_r(const void *src, int f16, size_t at, int64_t ss, int n, __m512 *r) {
    __m512 t[16];
    if (n >= 16) {  /* (a whole block: no test a row) */
        if (f16) for (int i = 0; i < 16; i++) r[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)src + at + (size_t)i * ss)));
        else for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps((const float *)src + at + (size_t)i * ss);
    } else {
        for (int i = 0; i < 16; i++) r[i] = i < n ? kv_ld16(src, f16, at + (size_t)i * ss) : _mm512_setzero_ps();
    }
    for (int i = 0; i < 16; i += 2) {  /* pairs of rows interleaved */
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  /* 4x4 blocks within each 128-bit lane */
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44); r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44); r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int h = 0; h < 16; h += 8)  /* then the lanes themselves */
        for (int i = 0; i < 4; i++) {
            t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xDD);
        }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
}

/* dst (16, 16) at dst + d ds = transpose16_r's; a scalar copy of the key tiles cost ~15% of the
 * default model's attention */
T512 INLINE void transpose16(const void *src, int f16, size_t at, int64_t ss, int n, float *dst, int ds) {
    __m512 r[16];
    transpose16_r(src, f16, at, ss, n, r);
    for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + (size_t)i * ds, r[i]);
}

/* CALL(d0, NV) over a head's values in chunks of 64 (NV = 4 vectors of 16), then the rest (3, 2 or
 * 1 vectors): the P V step with its vector counts known to the compiler */
#define HD_CHUNKS(hd, CALL) do { \
        int d0_ = 0; \
        for (; d0_ + 64 <= (hd); d0_ += 64) CALL(d0_, 4); \
        switch (((hd) - d0_) / 16) { \
            case 3: CALL(d0_, 3); break; \
            case 2: CALL(d0_, 2); break; \
            case 1: CALL(d0_, 1); break; \
            default: break; \
        } \
    } while (0)

/* one row's key tile: its 64 scores s -> the online softmax's P row pr (keys lo <= j <= lim of nk),
 * and its m, l, c updated; no key in the tile: P = 0, c = 1 (exactly nothing) */
T512 INLINE void attn_softmax_512(const __m512 *s, int lim, int lo, int nk, float *pr, float *m, float *l, float *c) {
    if (lim < 0 || lo > lim || lo >= nk) {
        *c = 1.f;
        for (int x = 0; x < 4; x++) _mm512_storeu_ps(pr + 16 * x, _mm512_setzero_ps());
        return;
    }
    __mmask16 mk[4];
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int x = 0; x < 4; x++) {
        int n = lim - 16 * x + 1, below = lo - 16 * x;
        mk[x] = n >= 16 ? 0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
        if (below > 0) mk[x] &= below >= 16 ? 0 : (__mmask16)(0xFFFFu << below);
        mx = _mm512_mask_max_ps(mx, mk[x], mx, s[x]);
    }
    const float tmax = _mm512_reduce_max_ps(mx), mn = *m > tmax ? *m : tmax;
    *c = expf(*m - mn);
    __m512 sum = _mm512_setzero_ps(), mv = _mm512_set1_ps(mn);
    for (int x = 0; x < 4; x++) {
        __m512 p = _mm512_maskz_mov_ps(mk[x], exp512(_mm512_sub_ps(s[x], mv)));
        sum = _mm512_add_ps(sum, p);
        _mm512_storeu_ps(pr + 16 * x, p);
    }
    *l = *l * *c + _mm512_reduce_add_ps(sum);
    *m = mn;
}

/* rows i = hh*bq + t (head g*r + hh, query q0 + t), padded to a multiple of 4 with zero rows.
 * Each key tile in two passes: every block of 4 rows' scores (against only the key blocks of 16
 * that hold keys of theirs) and softmax, then P V a head's chunk of 64 values at a time for every
 * block, against the tile's values converted once (f16) into the keys' transposed tile's space */
T512 static void attn_item_512(const attn_t *a, int g, int qt, float *ws) {
    const int r = a->nh / a->nkv, hd = a->hd, q0 = qt * AQ, bq = a->T - q0 < AQ ? a->T - q0 : AQ;
    const int R = r * bq, Rp = (R + 3) & ~3;
    float *Qb = ws, *O = Qb + (size_t)Rp * hd, *Kt = O + (size_t)Rp * hd, *P = Kt + (size_t)hd * AK;
    float *m = P + (size_t)Rp * AK, *l = m + Rp, *c = l + Rp;
    int *pos = (int *)(c + Rp), jb[Rp / 4];  /* keys of each block of 4 rows in the tile (0: none) */
    for (int i = 0; i < Rp; i++) {
        const int hh = i / bq, t = i % bq;
        pos[i] = i < R ? a->sp + q0 + t : 1 << 30;  /* padding rows see every key: no NaN */
        m[i] = -INFINITY; l[i] = 0.f; c[i] = 1.f;
        const float *src = a->q + (size_t)(q0 + t) * a->qst + (size_t)(g * r + hh) * a->qsh;
        for (int d = 0; d < hd; d++) { Qb[(size_t)i * hd + d] = i < R ? src[d] * a->scale : 0.f; O[(size_t)i * hd + d] = 0.f; }
    }
    const int kend = a->sp + q0 + bq;  /* keys 0 .. kend-1 (from the window's first tile) */
    for (int k0 = attn_k0(a, a->sp + q0); k0 < kend; k0 += AK) {
        const int nk = kend - k0 < AK ? kend - k0 : AK;
        const size_t kb = (size_t)k0 * a->kst + (size_t)g * a->ksh;
        for (int j0 = 0; j0 < AK; j0 += 16)  /* Kt (hd, AK): the tile's keys as columns */
            for (int d0 = 0; d0 < hd; d0 += 16)
                transpose16(a->k, a->f16, kb + (size_t)j0 * a->kst + d0, a->kst, nk - j0, Kt + d0 * AK + j0, AK);
        int jmax = 0;
        for (int i0 = 0; i0 < Rp; i0 += 4) {
            int pmax = -1;
            for (int rr = 0; rr < 4; rr++) {
                int p = pos[i0 + rr] < kend - 1 ? pos[i0 + rr] : kend - 1;
                pmax = p > pmax ? p : pmax;
            }
            const int jn = pmax < k0 ? 0 : pmax - k0 + 1 < nk ? pmax - k0 + 1 : nk;
            jb[i0 / 4] = jn;
            if (!jn) continue;  /* the whole block is above the diagonal: P = 0, c = 1 */
            jmax = jn > jmax ? jn : jmax;
            __m512 s[4][4];
            switch ((jn + 15) / 16) {
                case 1: attn_scores_512(hd, Qb + (size_t)i0 * hd, Kt, 1, s); break;
                case 2: attn_scores_512(hd, Qb + (size_t)i0 * hd, Kt, 2, s); break;
                case 3: attn_scores_512(hd, Qb + (size_t)i0 * hd, Kt, 3, s); break;
                default: attn_scores_512(hd, Qb + (size_t)i0 * hd, Kt, 4, s); break;
            }
            for (int rr = 0; rr < 4; rr++) {
                const int i = i0 + rr;
                int lim = (pos[i] < kend - 1 ? pos[i] : kend - 1) - k0;  /* keys k0 + j, lo <= j <= lim */
                const int lo = (i < R ? attn_lo(a, pos[i]) : 0) - k0;
                attn_softmax_512(s[rr], lim, lo, nk, P + i * AK, m + i, l + i, c + i);
            }
        }
        /* the tile's values as floats: f16 converted into Kt's space (rows of hd), f32 in place */
        const float *vf = (const float *)a->v + (size_t)k0 * a->vst + (size_t)g * a->vsh;
        size_t vs = (size_t)a->vst;
        if (a->f16) {
            const uint16_t *vh = (const uint16_t *)a->v + (size_t)k0 * a->vst + (size_t)g * a->vsh;
            for (int j = 0; j < jmax; j++)
                for (int d = 0; d < hd; d += 16)
                    _mm512_storeu_ps(Kt + (size_t)j * hd + d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(vh + (size_t)j * a->vst + d))));
            vf = Kt; vs = (size_t)hd;
        }
#define PV(d0, NV) for (int i0 = 0; i0 < Rp; i0 += 4) if (jb[i0 / 4]) attn_pv_512(hd, vf, vs, jb[i0 / 4], i0, d0, NV, P, c, O)
        HD_CHUNKS(hd, PV);
#undef PV
    }
    for (int i = 0; i < R; i++) {
        const int hh = i / bq, t = i % bq;
        float *y = a->out + (size_t)(q0 + t) * a->nh * hd + (size_t)(g * r + hh) * hd;
        const float inv = 1.f / l[i];
        for (int d = 0; d < hd; d++) y[d] = O[(size_t)i * hd + d] * inv;
    }
}

/* attn_item_512 for a single query (a->T == 1, a decode step) and its group's rows R <= 8: the
 * same operations on every row in the same order, so the same bits (scores as fused
 * multiply-adds over d ascending of the scaled query and the key, the tile's masked max, exp512,
 * sums and l, m, c updates, then c O + P V over the keys in order), without what a tile of 16
 * queries needs and a single one does not: the key tile's copy in memory (the transposed
 * 16 x 16 blocks stay in registers), the padding row and the output's round trips */
T512 INLINE void attn_pv_rows_512(const attn_t *a, int g, int k0, int jn, int R, int d0, int NV,
                                  const float *P, const float *c, float *O) {
    const int hd = a->hd;
    const size_t vb = (size_t)k0 * a->vst + (size_t)g * a->vsh + d0;
    for (int i0 = 0; i0 < R; i0 += 2) {  /* two rows at a time: 8 accumulators */
        const int two = i0 + 1 < R;
        __m512 acc[2][4];
        for (int x = 0; x < NV; x++) {
            acc[0][x] = _mm512_mul_ps(_mm512_set1_ps(c[i0]), _mm512_loadu_ps(O + (size_t)i0 * hd + d0 + 16 * x));
            acc[1][x] = two ? _mm512_mul_ps(_mm512_set1_ps(c[i0 + 1]), _mm512_loadu_ps(O + (size_t)(i0 + 1) * hd + d0 + 16 * x))
                            : _mm512_setzero_ps();
        }
        for (int j = 0; j < jn; j++) {
            const __m512 p0 = _mm512_set1_ps(P[i0 * AK + j]), p1 = _mm512_set1_ps(two ? P[(i0 + 1) * AK + j] : 0.f);
            for (int x = 0; x < NV; x++) {
                const __m512 vv = kv_ld16(a->v, a->f16, vb + (size_t)j * a->vst + 16 * x);
                acc[0][x] = _mm512_fmadd_ps(p0, vv, acc[0][x]);
                acc[1][x] = _mm512_fmadd_ps(p1, vv, acc[1][x]);
            }
        }
        for (int x = 0; x < NV; x++) {
            _mm512_storeu_ps(O + (size_t)i0 * hd + d0 + 16 * x, acc[0][x]);
            if (two) _mm512_storeu_ps(O + (size_t)(i0 + 1) * hd + d0 + 16 * x, acc[1][x]);
        }
    }
}

/* the scores of a decode row's R <= 8 rows (Qb: scaled queries) against the key tile at kb (nk
 * keys): s[i][x] lanes = keys 16 x .., each a chain of fused multiply-adds over d ascending (the
 * prompt tile's order), the 16 x 16 key blocks transposed in registers; keys past nk: zeros */
T512 INLINE void attn_tile_scores_512(const attn_t *a, size_t kb, int nk, const float *Qb, int R, __m512 s[8][4]) {
    const int hd = a->hd, nx = (nk + 15) / 16;  /* key blocks with keys (the rest: zeros, masked off later) */
    for (int x = 0; x < 4; x++) for (int i = 0; i < R; i++) s[i][x] = _mm512_setzero_ps();
    for (int d0 = 0; d0 < hd; d0 += 16)  /* blocks in turn: each chain of fused multiply-adds */
        for (int x = 0; x < nx; x++) {   /* waits on the one before while the next goes on */
            __m512 kt[16];
            transpose16_r(a->k, a->f16, kb + (size_t)(16 * x) * a->kst + d0, a->kst, nk - 16 * x, kt);
            for (int i = 0; i < R; i++) {
                const float *qi = Qb + (size_t)i * hd + d0;
                for (int dd = 0; dd < 16; dd++) s[i][x] = _mm512_fmadd_ps(_mm512_set1_ps(qi[dd]), kt[dd], s[i][x]);
            }
        }
}

T512 static void attn_query_512(const attn_t *a, int g, float *ws) {
    const int r = a->nh / a->nkv, hd = a->hd, R = r, p = a->sp;
    float *Qb = ws, *O = Qb + (size_t)R * hd, *P = O + (size_t)R * hd, m[8], l[8], c[8];
    for (int i = 0; i < R; i++) {
        const float *src = a->q + (size_t)(g * r + i) * a->qsh;
        m[i] = -INFINITY; l[i] = 0.f; c[i] = 1.f;
        for (int d = 0; d < hd; d++) { Qb[(size_t)i * hd + d] = src[d] * a->scale; O[(size_t)i * hd + d] = 0.f; }
    }
    const int kend = p + 1, lo0 = attn_lo(a, p);
    for (int k0 = attn_k0(a, p); k0 < kend; k0 += AK) {
        const int nk = kend - k0 < AK ? kend - k0 : AK, lim = p - k0, lo = lo0 - k0;
        const size_t kb = (size_t)k0 * a->kst + (size_t)g * a->ksh;
        __m512 s[8][4];
        attn_tile_scores_512(a, kb, nk, Qb, R, s);
        for (int i = 0; i < R; i++) attn_softmax_512(s[i], lim, lo, nk, P + i * AK, m + i, l + i, c + i);
#define PV(d0, NV) attn_pv_rows_512(a, g, k0, nk, R, d0, NV, P, c, O)
        HD_CHUNKS(hd, PV);
#undef PV
    }
    for (int i = 0; i < R; i++) {
        float *y = a->out + (size_t)(g * r + i) * hd;
        const float inv = 1.f / l[i];
        for (int d = 0; d < hd; d++) y[d] = O[(size_t)i * hd + d] * inv;
    }
}

/* attn_query_512 in two steps, so that a decode step's attention is shared among threads by
 * more than its nkv groups (3 groups on 2 threads: one thread did two, the other waited): the
 * scores of key tile kt of group g for its r heads (the key transposes, the costliest part,
 * once for the group) into sc (row h of head h, sc_stride floats: tile kt at kt AK), then each
 * head's online softmax and P V over its tiles in order. The same operations in the same order
 * on every row: the same bits as attn_query_512 (and so as the prompt kernel). */
T512 static void attn_query_scores_512(const attn_t *a, int g, int kt, float *sc, size_t sc_stride) {
    const int R = a->nh / a->nkv;
    int k0, nk;
    float Qb[8 * 256];
    attn_split_tile(a, g, kt, Qb, &k0, &nk);
    const size_t kb = (size_t)k0 * a->kst + (size_t)g * a->ksh;
    __m512 s[8][4];
    attn_tile_scores_512(a, kb, nk, Qb, R, s);
    for (int i = 0; i < R; i++)
        for (int x = 0; x < 4; x++) _mm512_storeu_ps(sc + (size_t)(g * R + i) * sc_stride + (size_t)kt * AK + 16 * x, s[i][x]);
}

T512 static void attn_query_head_512(const attn_t *a, int h, const float *sc, size_t sc_stride) {
    const int r = a->nh / a->nkv, hd = a->hd, p = a->sp, g = h / r;
    float O[256], P[AK], m = -INFINITY, l = 0.f, c = 1.f;
    for (int d = 0; d < hd; d++) O[d] = 0.f;
    const int kend = p + 1, lo0 = attn_lo(a, p);
    int kt = 0;
    for (int k0 = attn_k0(a, p); k0 < kend; k0 += AK, kt++) {
        const int nk = kend - k0 < AK ? kend - k0 : AK;
        __m512 s[4];
        for (int x = 0; x < 4; x++) s[x] = _mm512_loadu_ps(sc + (size_t)h * sc_stride + (size_t)kt * AK + 16 * x);
        attn_softmax_512(s, p - k0, lo0 - k0, nk, P, &m, &l, &c);
#define PV(d0, NV) attn_pv_rows_512(a, g, k0, nk, 1, d0, NV, P, &c, O)
        HD_CHUNKS(hd, PV);
#undef PV
    }
    float *y = a->out + (size_t)h * hd;
    const float inv = 1.f / l;
    for (int d = 0; d < hd; d++) y[d] = O[d] * inv;
}

#endif  /* HL_X86 */

/* ---- the other paths' kernels ------------------------------------------------------------- */

#if HL_X86
#include "kernels_avx2.h"
#elif HL_ARM
#include "kernels_neon.h"
#endif

/* ---- dispatch: each path's kernels --------------------------------------------------------- */

/* before a call's tiles of mode tm are made: the kernels' state of earlier calls (P_AVX2's
 * widened TM_A16 groups) is then stale */
static void tiles_new_call(int tm) {
#if HL_X86
    if (tm == TM_A16) a16_new_call();
    u512_new_call();  /* (AVX512's unpacked groups) */
#endif
    (void)tm;
}

/* a packed kernel for one row as a tile of one (quantize_row1), or NULL where the path has none */
typedef void (*row1_fn)(const uint8_t *pk, int K, const int8_t *q, const float *dx, const float *sx, float *out,
                        int hi, int kind);
static row1_fn row1_kernel(int path) {
#if HL_X86
    if (path == P_AVX512) return packed_row1_512;
#endif
    (void)path;
    return NULL;
}

/* the packed kernel of a path with packs (hl_pack_rows > 0) */
static tile_fn tile_kernel(int path) {
#if HL_X86
    if (path == P_AVX512) return packed_tile_512;
    if (path == P_AVXVNNI) return packed_tile_vnni256;
    return packed_tile_256;
#elif HL_ARM
    return path == P_I8MM ? packed_tile_i8mm : packed_tile_neon;
#else
    (void)path;
    return NULL;
#endif
}

/* h = act(g) u for the gated MLPs, n values: SiLU, GELU tanh (the vector lanes of the packed
 * epilogue: the same bits on every vector path), erf (scalar everywhere) */
static void glu_row(int path, int act, const float *g, const float *u, float *h, int n) {
#if HL_X86
    if (act != ACT_GELU && path == P_AVX512) { glu_row_512(act, g, u, h, n); return; }
    if (act != ACT_GELU && is_avx2(path)) { glu_row_256(act, g, u, h, n); return; }
#elif HL_ARM
    if (act != ACT_GELU && is_neon(path)) { glu_row_neon(act, g, u, h, n); return; }
#endif
    for (int j = 0; j < n; j++) h[j] = act == ACT_SILU ? g[j] / (1.0f + expf(-g[j])) * u[j]
                                     : (act == ACT_GELU ? gelu_erf(g[j]) : gelu_tanh(g[j])) * u[j];
}

/* attention tile (query tile qt, kv head g) on a path: AVX512's needs hd % 16 == 0, AVX2's and
 * NEON's hd % 8 == 0 (else the portable one) */
/* a decode step's attention in two phases (attn_query_scores_512, attn_query_head_512) on this
 * path and shape: its key tiles (0: no, one phase of attn_item per kv group) */
static int attn_split_tiles(int path, const attn_t *a) {
#if HL_X86
    const int r = a->nh / a->nkv;
    const int fits = a->T == 1 && a->hd <= 256 && r > 1 && r <= 8;
    if (fits && ((path == P_AVX512 && a->hd % 16 == 0) || (is_avx2(path) && a->hd % 8 == 0)))
        return (a->sp + 1 - attn_k0(a, a->sp) + AK - 1) / AK;
#endif
    (void)path; (void)a;
    return 0;
}

static void attn_split_scores(int path, const attn_t *a, int g, int kt, float *sc, size_t sc_stride) {
#if HL_X86
    if (path == P_AVX512) attn_query_scores_512(a, g, kt, sc, sc_stride);
    else attn_query_scores_avx2(a, g, kt, sc, sc_stride);
#endif
    (void)path; (void)a; (void)g; (void)kt; (void)sc; (void)sc_stride;
}

static void attn_split_head(int path, const attn_t *a, int h, const float *sc, size_t sc_stride) {
#if HL_X86
    if (path == P_AVX512) attn_query_head_512(a, h, sc, sc_stride);
    else attn_query_head_avx2(a, h, sc, sc_stride);
#endif
    (void)path; (void)a; (void)h; (void)sc; (void)sc_stride;
}

static void attn_item(int path, const attn_t *a, int g, int qt, float *ws) {
#if HL_X86
    if (path == P_AVX512 && a->hd % 16 == 0) {
        if (a->T == 1 && a->nh / a->nkv <= 8) attn_query_512(a, g, ws); else attn_item_512(a, g, qt, ws);
        return;
    }
    if (path != P_SCALAR) {
        if (a->T == 1 && a->hd % 8 == 0 && a->nh / a->nkv <= 8) attn_query_avx2(a, g, ws); else attn_item_avx2(a, g, qt, ws);
        return;
    }
#elif HL_ARM
    if (path != P_SCALAR && a->hd % 8 == 0) { attn_item_neon(a, g, qt, ws); return; }
#endif
    (void)path;
    attn_item_scalar(a, g, qt, ws);
}

/* Several packed weights against one activation x (M, K), quantized once: y_i (M, N_i) = x @ W_i^T.
 * glu: nw = 2 (gate, up) of one N; y_0 = silu(x @ W_0^T) * (x @ W_1^T), silu(g) = g / (1 + e^-g)
 * (y_1 unused). Each thread takes groups of G weight rows, over all weights. */
#ifndef MCHUNK
#define MCHUNK 128
#endif

typedef struct {
    const float *x; int M, K, L, R, nfused, hi, glu, path, G, tm; const uint8_t *const *pks; const int *Ns;
    float *const *ys; const int *kinds; int8_t *q; float *dx, *sx; size_t tq, td, ts;
    int first[9];  /* weight i owns global groups first[i] .. first[i+1]-1 */
} packed_mm_t;

static int packed_mm_items(void *a, int p) {
    const packed_mm_t *t = a;
    return p == 0 ? t->M : t->first[t->nfused];
}

/* phase 0: rows i0..i1 of x quantized into their tiles; phase 1 + c: groups i0..i1 (over all
 * weights) against the activations of M chunk c */
static void packed_mm_run(void *a, int p, int i0, int i1, int tid) {
    (void)tid;
    const packed_mm_t *t = a;
    const int K = t->K, M = t->M, nb = K / 32, R = t->R, glu = t->glu, nfused = t->nfused, G = t->G;
    const int *kinds = t->kinds, *first = t->first;
    const size_t tq = t->tq, td = t->td, ts = t->ts;
    if (p == 0) {
        for (int m = i0; m < i1; m++)  /* each row into its place in its tile */
            quantize_tile_row(t->x + (size_t)m * K, K, t->tm, t->q + (m / TILE) * tq, t->dx + (m / TILE) * td,
                              t->sx + (m / TILE) * ts, m % TILE);
        return;
    }
    const tile_fn tile = tile_kernel(t->path);
    const int mc = (p - 1) * MCHUNK;  /* an M chunk's activations stay in L2 */
    const int mend = M - mc < MCHUNK ? M : mc + MCHUNK;
    float out[TILE * 16], out2[TILE * 16];
    for (int gg = i0; gg < i1; gg++) {
        int i = 0;
        while (gg >= first[i + 1]) i++;
        const int g = gg - first[i], N = t->Ns[i];
        const int nn = N - g * G < G ? N - g * G : G;
        float *y = t->ys[i];
        const int k0 = kinds ? kinds[i] : PK_Q4, k1 = glu ? (kinds ? kinds[1] : PK_Q4) : 0;
        /* this thread's next group (gg + 1: a chunk's groups are contiguous), fetched a slice
         * per tile while this one's tiles run: else its first tile waits on memory (1B
         * gate/up, one core: 67% -> 72% of the dpbusd peak) */
        const uint8_t *nx[2] = {NULL, NULL};
        size_t nxb[2] = {0, 0};
        if (gg + 1 < first[nfused]) {
            const int i1n = gg + 1 < first[i + 1] ? i : i + 1, g1 = gg + 1 - first[i1n];
            const int ka = kinds ? kinds[i1n] : PK_Q4;
            nx[0] = pk_group(t->pks[i1n], ka, g1, K, G); nxb[0] = (size_t)nb * pk_size(ka, G);
            if (glu) { nx[1] = pk_group(t->pks[1], k1, g1, K, G); nxb[1] = (size_t)nb * pk_size(k1, G); }
        }
        const int ntile = (mend - mc + R - 1) / R;
        for (int m0 = mc; m0 < mend; m0 += R) {
            const int r = mend - m0 < R ? mend - m0 : R, ti = (m0 - mc) / R;
            for (int w = 0; w < 2; w++)
                if (nx[w])
                    for (size_t o = (nxb[w] * ti / ntile) & ~(size_t)63; o < nxb[w] * (ti + 1) / ntile; o += 64)
                        __builtin_prefetch((const char *)nx[w] + o, 0, 3);
            const int8_t *qa = t->q + (size_t)(m0 / TILE) * tq;  /* (m0: a multiple of TILE) */
            const float *da = t->dx + (size_t)(m0 / TILE) * td, *sa = t->sx + (size_t)(m0 / TILE) * ts;
            tile(pk_group(t->pks[i], k0, g, K, G), K, qa, da, sa, r, out, t->tm - 1, k0);
            if (glu) {
                tile(pk_group(t->pks[1], k1, g, K, G), K, qa, da, sa, r, out2, t->tm - 1, k1);
                for (int j = 0; j < r; j++)
                    glu_row(t->path, ACT_SILU, out + G * j, out2 + G * j, y + (size_t)(m0 + j) * N + g * G, nn);
            } else {
                if (nn == 16)  /* (the copies inlined, not a call each) */
                    for (int j = 0; j < r; j++) memcpy(y + (size_t)(m0 + j) * N + g * G, out + G * j, 64);
                else
                    for (int j = 0; j < r; j++) memcpy(y + (size_t)(m0 + j) * N + g * G, out + G * j, 4 * (size_t)nn);
            }
        }
    }
}

static int matmul_packed_multi(const float *x, int M, int K, int nw, const uint8_t *const *pks,
                               const int *Ns, float *const *ys, int nthreads, int hi, int glu,
                               const int *kinds, int path) {  /* kinds[i]: weight i's PK_* (NULL: all Q4) */
    /* the activations in tiles of TILE rows (see TILE); the last tile's missing rows unused */
    const int nb = K / 32, L = hi ? 2 : 1, nfused = glu ? 1 : nw, G = hl_pack_rows(path);
    const int Mt = (M + TILE - 1) / TILE;
    packed_mm_t t = {x, M, K, L, TILE, nfused, hi, glu, path, G, tile_mode(path, hi, M), pks, Ns, ys, kinds, NULL, NULL, NULL,
                     (size_t)TILE * K * L, (size_t)TILE * nb, (size_t)TILE * ACT_SUMS * nb, {0}};
    t.q = malloc(Mt * t.tq);
    t.dx = malloc(4 * Mt * t.td); t.sx = malloc(4 * Mt * t.ts);
    if (!t.q || !t.dx || !t.sx) { free(t.q); free(t.dx); free(t.sx); return -3; }
    for (int i = 0; i < nfused; i++) t.first[i + 1] = t.first[i] + (Ns[i] + G - 1) / G;
    const job_t job = {1 + (M + MCHUNK - 1) / MCHUNK, packed_mm_items, packed_mm_run, NULL, &t};
    tiles_new_call(t.tm);
    pool_run(&job, nthreads);
    free(t.q); free(t.dx); free(t.sx);
    return 0;
}

/* kinds: each weight's pack kind (hl_pack_kind of its type; NULL: all PK_Q4), packed by hl_repack
 * with G = hl_pack_rows(path) for `path` (-1: the best this CPU has). -2: a path this CPU does not
 * run or one without packed kernels; -1 bad arguments; -3 out of memory. */
int hl_matmul_packed_multi(const float *x, int M, int K, int nw, const uint8_t *const *pks, const int *Ns,
                           float *const *ys, int nthreads, int hi, int glu, const int *kinds, int path) {
    if (path < 0) path = hl_best_path();
    if (!path_ok(path) || !hl_pack_rows(path)) return -2;
    if (K % 32 || nw < 1 || nw > 8 || (glu && (nw != 2 || Ns[0] != Ns[1]))) return -1;
    for (int i = 0; kinds && i < nw; i++) if (kinds[i] < 0 || kinds[i] >= PK_KINDS) return -1;
    return matmul_packed_multi(x, M, K, nw, pks, Ns, ys, nthreads, hi, glu, kinds, path);
}

/* y (M, N) = x (M, K) @ W^T with W packed (kind: hl_pack_kind of its type) for `path` */
int hl_matmul_packed(const float *x, int M, int K, const uint8_t *pk, int N, float *y, int nthreads, int hi,
                     int kind, int path) {
    return hl_matmul_packed_multi(x, M, K, 1, &pk, &N, &y, nthreads, hi, 0, &kind, path);
}

typedef struct { const attn_t *a; int path, n, nkv; size_t ws_floats; int fail; } attn_job_t;

static int attn_items(void *a, int p) { (void)p; return ((const attn_job_t *)a)->n; }

/* items (query tile, kv head), the costliest first (a tile's cost ~ its keys: the last tiles) */
static void attn_run(void *a, int p, int i0, int i1, int tid) {
    (void)p; (void)tid;
    attn_job_t *t = a;
    float *ws = malloc(t->ws_floats * sizeof(float));
    if (!ws) { STORE(&t->fail, 1, RLX); return; }
    for (int i = i0; i < i1; i++) {
        const int it = t->n - 1 - i, qt = it / t->nkv, g = it % t->nkv;
        attn_item(t->path, t->a, g, qt, ws);
    }
    free(ws);
}

int hl_attention_causal(const float *q, int64_t qst, int64_t qsh, const float *k, int64_t kst, int64_t ksh,
                        const float *v, int64_t vst, int64_t vsh, int T, int nh, int nkv, int hd,
                        int start_pos, float scale, float *out, int nthreads, int path) {
    if (path < 0) path = hl_best_path();
    if (!path_ok(path)) return -2;
    if (T <= 0 || nkv <= 0 || nh % nkv || hd <= 0 || start_pos < 0) return -1;
    attn_t a = { q, k, v, qst, qsh, kst, ksh, vst, vsh, T, nh, nkv, hd, start_pos, 0, scale, out };
    const int r = nh / nkv, nqt = (T + AQ - 1) / AQ, Rp = (r * AQ + 3) & ~3;
    const size_t ws_floats = (size_t)2 * Rp * hd + (size_t)hd * AK + (size_t)Rp * AK + 4 * (size_t)Rp;
    attn_job_t t = {&a, path, nqt * nkv, nkv, ws_floats, 0};
    const job_t job = {1, attn_items, attn_run, NULL, &t};
    pool_run(&job, nthreads);
    return t.fail ? -3 : 0;
}


#include "network.h"
