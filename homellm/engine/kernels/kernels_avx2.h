/* homellm CPU kernels: the AVX2 path (included once, by ggml_cpu.c, on x86-64).
 *
 * What a CPU with AVX2 but without AVX512 (most laptops: Intel Core before and after AVX512,
 * AMD before Zen 4) computes on: the packed weights of ggml_cpu.c's layout with G = 8 rows a
 * group (one 256-bit register of 8 int32 lanes), the activations in the same tiles as AVX512's,
 * and the same per-lane float operations, so every packed product is AVX512's bit for bit
 * (the integer dots are exact; each output is one lane's sequence of fmas, in block order).
 *
 * Two ways to the integer dots, chosen at run time:
 * - AVX2 (P_AVX2): vpmaddubsw (unsigned weight bytes x signed activation bytes, pairs summed to
 *   int16 with saturation) then vpmaddwd with ones (pairs of int16 to int32). Saturation cannot
 *   happen: |activation| <= 127, so a pair is at most 2 x 15 x 127 = 3810 for nibbles (8 chunks
 *   summed in int16: 30480), 2 x 31 x 127 = 7874 for 5-bit values (4 chunks: 31496), 2 x 63 x 127
 *   = 16002 for Q6_K's u6 (2 chunks: 32004) and, with Q8_0's signs moved onto the activations
 *   (|q| <= 128 unsigned, sign(a, q) signed), 2 x 128 x 127 = 32512 (one chunk) for Q8_0.
 * - AVX-VNNI (P_AVXVNNI, Alder Lake and later): vpdpbusd on 256-bit registers, as AVX512's
 *   kernel does on 512 (Q8_0's bytes + 128 made as they are loaded). On a CPU without AVX-VNNI
 *   but with AVX512-VNNI the same kernel runs in its EVEX form (the tests force it there).
 */

static inline int32_t ld4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

/* ---- activation quantization: quantize_any's bits, 32 values (four registers) a block ------- */

T256 INLINE int hsum_i32_256(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* 32 int32 (four registers, in order) within +-127 -> 32 int8 at dst */
T256 INLINE void store_i8x32(int8_t *dst, const __m256i *v) {
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    /* 4-byte groups: lane 0 holds v0..v3's first four, lane 1 their last four */
    _mm256_storeu_si256((__m256i *)dst, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

/* the bits of quantize_any: d = amax / 127 and 1 / d as IEEE divisions, cvtps rounding half to even
 * as nearbyintf, d q rounded before the subtraction (an empty asm: never fused into an FMA) */
T256 INLINE void quantize_body_256(const float *x, int K, int8_t *q, size_t qs, int8_t *q2, float *dx,
                                   size_t ds, int d8, float *sx, size_t ss, int16_t *a16) {
    const __m256 sign = _mm256_set1_ps(-0.0f), s256 = _mm256_set1_ps(256.0f);
    const __m256i lim = _mm256_set1_epi32(127), nlim = _mm256_set1_epi32(-127);
    const int nb = K / 32;
    for (int b = 0; b < nb; b++) {
        const float *xb = x + b * 32;
        __m256 v[4];
        for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(xb + 8 * i);
        const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                       _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
        const float d = hmax256(m) / 127.0f, id = d != 0.f ? 1.0f / d : 0.f;
        const __m256 vd = _mm256_set1_ps(d), vid = _mm256_set1_ps(id);
        __m256i iq[4], jq[4];
        for (int i = 0; i < 4; i++) iq[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vid));
        if (!a16) store_i8x32(q + b * qs, iq);
        int hs[2] = {hsum_i32_256(_mm256_add_epi32(iq[0], iq[1])), hsum_i32_256(_mm256_add_epi32(iq[2], iq[3]))};
        int hs2[2] = {0, 0};
        if (q2 || a16) {
            for (int i = 0; i < 4; i++) {
                __m256 dq = _mm256_mul_ps(vd, _mm256_cvtepi32_ps(iq[i]));
                __asm__("" : "+x"(dq));
                const __m256 r = _mm256_sub_ps(v[i], dq);
                jq[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(r, vid), s256));
                jq[i] = _mm256_max_epi32(_mm256_min_epi32(jq[i], lim), nlim);
            }
            if (a16)  /* a = 256 q + q2, |a| <= 32639: packs without saturation, its lanes put in order */
                for (int h = 0; h < 2; h++) {
                    const __m256i a0 = _mm256_add_epi32(_mm256_slli_epi32(iq[2 * h], 8), jq[2 * h]);
                    const __m256i a1 = _mm256_add_epi32(_mm256_slli_epi32(iq[2 * h + 1], 8), jq[2 * h + 1]);
                    _mm256_storeu_si256((__m256i *)(a16 + b * qs) + h,
                                        _mm256_permute4x64_epi64(_mm256_packs_epi32(a0, a1), 0xD8));
                }
            else store_i8x32(q2 + b * qs, jq);
            hs2[0] = hsum_i32_256(_mm256_add_epi32(jq[0], jq[1]));
            hs2[1] = hsum_i32_256(_mm256_add_epi32(jq[2], jq[3]));
        }
        const int two = q2 || a16;
        const float dd = two ? d * (1.0f / 256.0f) : d;
        if (d8) _mm256_storeu_ps(dx + b * ds, _mm256_set1_ps(dd));
        else dx[b * ds] = dd;
        act_sums(sx, ss, nb, b, d, hs, hs2, two);
    }
}

T256 static void quantize_strided_256(const float *x, int K, int8_t *q, size_t qs, int8_t *q2, float *dx,
                                      size_t ds, int d8, float *sx, size_t ss) {
    quantize_body_256(x, K, q, qs, q2, dx, ds, d8, sx, ss, NULL);
}

/* both levels as one int16 a = 256 q + q2 (tile mode TM_A16: quantize_tile_row), block b's 32 at
 * a + b as (int16), quantize_strided_256's bits */
T256 static void quantize_a16_256(const float *x, int K, int16_t *a, size_t as, float *dx, size_t ds, float *sx,
                                  size_t ss) {
    quantize_body_256(x, K, NULL, as, NULL, dx, ds, 0, sx, ss, a);
}

/* ---- gated products: exp512's and glu16's bits, 8 lanes at a time --------------------------- */

/* exp512 lane for lane: the same clamp, rounding, polynomial, and scalef's single rounding of
 * p 2^n (n >= -126: 2^n a normal float; n = -127: (p / 2) 2^-126, p / 2 exact); the product kept
 * out of any FMA with what follows (scalef is not a multiplication to fuse) */
T256 INLINE __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-88.0f));
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
    const __m256 low = _mm256_cmp_ps(n, _mm256_set1_ps(-126.5f), _CMP_LT_OQ);
    p = _mm256_blendv_ps(p, _mm256_mul_ps(p, _mm256_set1_ps(0.5f)), low);
    n = _mm256_max_ps(n, _mm256_set1_ps(-126.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    __asm__("" : "+x"(y));
    return y;
}

T256 INLINE __m256 glu8(int act, __m256 gv, __m256 uv) {
    if (act == ACT_SILU) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        return _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), uv);
    }
    const __m256 v2 = _mm256_mul_ps(_mm256_set1_ps(-1.5957691216057308f),
                                    _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(gv, gv), gv), _mm256_set1_ps(0.044715f), gv));
    return _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(v2))), uv);
}

/* h = act(g) u, n values (h may be g), SiLU or tanh GELU: glu_row_512's bits */
T256 static void glu_row_256(int act, const float *g, const float *u, float *h, int n) {
    int j = 0;
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(h + j, glu8(act, _mm256_loadu_ps(g + j), _mm256_loadu_ps(u + j)));
    if (j < n) {
        const __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - j), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        _mm256_maskstore_ps(h + j, k, glu8(act, _mm256_maskload_ps(g + j, k), _mm256_maskload_ps(u + j, k)));
    }
}

/* ---- packed weights, 8 rows a group: the three kernels of kernels_avx2_tile.h --------------- */

#define AVX2_T T256
#define AVX2_VNNI 0
#define AVX2_SFX(name) name##_256
#include "kernels_avx2_tile.h"
#undef AVX2_T
#undef AVX2_VNNI
#undef AVX2_SFX

#define AVX2_T __attribute__((target("avx2,fma,f16c,avxvnni")))
#define AVX2_VNNI 1
#define AVX2_DP(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#define AVX2_SFX(name) name##_vex
#include "kernels_avx2_tile.h"
#undef AVX2_T
#undef AVX2_DP
#undef AVX2_SFX

#define AVX2_T __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))
#define AVX2_DP(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#define AVX2_SFX(name) name##_evex
#include "kernels_avx2_tile.h"
#undef AVX2_T
#undef AVX2_VNNI
#undef AVX2_DP
#undef AVX2_SFX

/* P_AVXVNNI: AVX-VNNI's VEX vpdpbusd where the CPU has it, else AVX512-VNNI's EVEX one */
static void packed_tile_vnni256(const uint8_t *pk, int K, const int8_t *q, const float *dx, const float *sx, int R,
                                float *out, int hi, int kind) {
    if (hl_cpu_features() & 512) packed_tile_vex(pk, K, q, dx, sx, R, out, hi, kind);
    else packed_tile_evex(pk, K, q, dx, sx, R, out, hi, kind);
}
