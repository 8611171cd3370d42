/* homellm CPU kernels: the ARM64 paths (included once, by ggml_cpu.c, on aarch64).
 *
 * NEON is in every ARM64 CPU; the integer dots need the dot-product instructions (sdot, ARMv8.2's
 * FEAT_DotProd: P_NEON) and, where the CPU has them, the 8-bit matrix multiplies (smmla,
 * FEAT_I8MM: P_I8MM), both chosen at run time (hl_cpu_features). Those two are written as inline
 * assembly inside functions whose target attribute enables them, so that gcc and clang (Apple's
 * too, whose arm_neon.h may hide the intrinsics behind compile-time feature macros) build one
 * library for every ARM64 CPU, without -march.
 *
 * The packed weights are the AVX2 path's (ggml_cpu.c's layout, G = 8 rows a group: a chunk is
 * 32 bytes, rows 0..3 in one 128-bit register and 4..7 in the next), the activations the same
 * tiles, and each output lane the same float operations in the same order as AVX512's and
 * AVX2's (fused multiply-adds where they fuse, exact integer dots), so the packed products are
 * their bits. The build turns floating-point contraction off on ARM64 (build.py), so that the
 * scalar code rounds each product as on x86-64 (no FMA there without -march) and this file's
 * plain multiplies and adds stay apart.
 */

#if defined(__clang__)
#define T_DOT __attribute__((target("dotprod")))
#define T_MM __attribute__((target("dotprod,i8mm")))
#else
#define T_DOT __attribute__((target("arch=armv8.2-a+dotprod")))
#define T_MM __attribute__((target("arch=armv8.2-a+dotprod+i8mm")))
#endif

/* acc (4 int32) += the dots of w's 4-byte groups with group L of a (sdot, by element) */
#define SDOT_LANE(acc, w, a, L) __asm__("sdot %0.4s, %1.16b, %2.4b[" #L "]" : "+w"(acc) : "w"(w), "w"(a))
/* acc (2 x 2 int32) += a (2 rows of 8 int8) times b (2 rows of 8) transposed (smmla) */
#define SMMLA(acc, a, b) __asm__("smmla %0.4s, %1.16b, %2.16b" : "+w"(acc) : "w"(a), "w"(b))

static inline int32_t ld4n(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

/* ---- activation quantization: quantize_any's bits, 32 values (eight registers) a block ------ */

static void quantize_strided_neon(const float *x, int K, int8_t *q, size_t qs, int8_t *q2, float *dx, size_t ds,
                                  int d8, float *sx, size_t ss) {
    const float32x4_t s256 = vdupq_n_f32(256.0f);
    const int32x4_t lim = vdupq_n_s32(127), nlim = vdupq_n_s32(-127);
    const int nb = K / 32;
    for (int b = 0; b < nb; b++) {
        const float *xb = x + b * 32;
        float32x4_t v[8];
        for (int i = 0; i < 8; i++) v[i] = vld1q_f32(xb + 4 * i);
        float32x4_t m = vabsq_f32(v[0]);
        for (int i = 1; i < 8; i++) m = vmaxq_f32(m, vabsq_f32(v[i]));
        const float d = vmaxvq_f32(m) / 127.0f, id = d != 0.f ? 1.0f / d : 0.f;
        const float32x4_t vd = vdupq_n_f32(d), vid = vdupq_n_f32(id);
        int32x4_t iq[8], jq[8];
        for (int i = 0; i < 8; i++) iq[i] = vcvtnq_s32_f32(vmulq_f32(v[i], vid));  /* half to even */
        int8_t *qb = q + b * qs;
        for (int i = 0; i < 4; i++)
            vst1_s8(qb + 8 * i, vmovn_s16(vcombine_s16(vmovn_s32(iq[2 * i]), vmovn_s32(iq[2 * i + 1]))));
        int hs[2] = {vaddvq_s32(vaddq_s32(vaddq_s32(iq[0], iq[1]), vaddq_s32(iq[2], iq[3]))),
                     vaddvq_s32(vaddq_s32(vaddq_s32(iq[4], iq[5]), vaddq_s32(iq[6], iq[7])))};
        int hs2[2] = {0, 0};
        if (q2) {
            for (int i = 0; i < 8; i++) {
                float32x4_t dq = vmulq_f32(vd, vcvtq_f32_s32(iq[i]));
                __asm__("" : "+w"(dq));  /* d q rounded before the subtraction: never an FMA */
                const float32x4_t r = vsubq_f32(v[i], dq);
                jq[i] = vcvtnq_s32_f32(vmulq_f32(vmulq_f32(r, vid), s256));
                jq[i] = vmaxq_s32(vminq_s32(jq[i], lim), nlim);
            }
            int8_t *qb2 = q2 + b * qs;
            for (int i = 0; i < 4; i++)
                vst1_s8(qb2 + 8 * i, vmovn_s16(vcombine_s16(vmovn_s32(jq[2 * i]), vmovn_s32(jq[2 * i + 1]))));
            hs2[0] = vaddvq_s32(vaddq_s32(vaddq_s32(jq[0], jq[1]), vaddq_s32(jq[2], jq[3])));
            hs2[1] = vaddvq_s32(vaddq_s32(vaddq_s32(jq[4], jq[5]), vaddq_s32(jq[6], jq[7])));
        }
        const float dd = q2 ? d * (1.0f / 256.0f) : d;
        for (int j = 0; j < (d8 ? 8 : 1); j++) dx[b * ds + j] = dd;
        act_sums(sx, ss, nb, b, d, hs, hs2, q2 != NULL);
    }
}

/* ---- gated products: exp512's and glu16's bits, 4 lanes at a time --------------------------- */

/* exp512 lane for lane (as kernels_avx2.h's exp8): the clamp, round to nearest even, the fused
 * reduction and polynomial, and scalef's single rounding of p 2^n */
static inline float32x4_t exp4_neon(float32x4_t x) {
    x = vmaxq_f32(vminq_f32(x, vdupq_n_f32(88.0f)), vdupq_n_f32(-88.0f));
    float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    const uint32x4_t low = vcltq_f32(n, vdupq_n_f32(-126.5f));
    p = vbslq_f32(low, vmulq_f32(p, vdupq_n_f32(0.5f)), p);
    n = vmaxq_f32(n, vdupq_n_f32(-126.0f));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

static inline float32x4_t glu4_neon(int act, float32x4_t gv, float32x4_t uv) {
    const float32x4_t one = vdupq_n_f32(1.0f);
    if (act == ACT_SILU) {
        const float32x4_t e = exp4_neon(vsubq_f32(vdupq_n_f32(0.0f), gv));
        return vmulq_f32(vdivq_f32(gv, vaddq_f32(one, e)), uv);
    }
    const float32x4_t v2 = vmulq_f32(vdupq_n_f32(-1.5957691216057308f),
                                     vfmaq_f32(gv, vmulq_f32(vmulq_f32(gv, gv), gv), vdupq_n_f32(0.044715f)));
    return vmulq_f32(vdivq_f32(gv, vaddq_f32(one, exp4_neon(v2))), uv);
}

/* h = act(g) u, n values (h may be g), SiLU or tanh GELU: glu_row_512's bits */
static void glu_row_neon(int act, const float *g, const float *u, float *h, int n) {
    int j = 0;
    for (; j + 4 <= n; j += 4) vst1q_f32(h + j, glu4_neon(act, vld1q_f32(g + j), vld1q_f32(u + j)));
    if (j < n) {
        float gt[4] = {0}, ut[4] = {0}, ht[4];
        for (int i = 0; i < n - j; i++) { gt[i] = g[j + i]; ut[i] = u[j + i]; }
        vst1q_f32(ht, glu4_neon(act, vld1q_f32(gt), vld1q_f32(ut)));
        for (int i = 0; i < n - j; i++) h[j + i] = ht[i];
    }
}

/* ---- attention: attn_item_avx2's tiles, 4-lane vectors (hd % 8 == 0) ------------------------- */

static inline float32x4_t kv_ld4(const void *row, int f16, size_t i) {
    return f16 ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)row + i))) : vld1q_f32((const float *)row + i);
}

/* scores of 4 rows x 16 keys at a time into P, the online softmax on P's rows (exp4_neon), then
 * P @ V 4 rows x 8 dims at a time; results within the bounds of the x86 tiles (other sum order) */
static void attn_item_neon(const attn_t *a, int g, int qt, float *ws) {
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
    const float32x4_t lane = {0.f, 1.f, 2.f, 3.f}, ninf = vdupq_n_f32(-INFINITY);
    for (int k0 = attn_k0(a, a->sp + q0); k0 < kend; k0 += AK) {
        const int nk = kend - k0 < AK ? kend - k0 : AK;
        const size_t kb = (size_t)k0 * a->kst + (size_t)g * a->ksh;
        /* Kt (hd, AK): the tile's keys as columns, 4 x 4 blocks transposed in registers (keys
         * nk.. zeros; the same values as one at a time: the decode steps' transposes, one a key
         * tile, were scalar) */
        for (int j0 = 0; j0 < AK; j0 += 4)
            for (int d0 = 0; d0 < hd; d0 += 4) {
                float32x4_t r[4];
                for (int i = 0; i < 4; i++)
                    r[i] = j0 + i < nk ? kv_ld4(a->k, a->f16, kb + (size_t)(j0 + i) * a->kst + d0) : vdupq_n_f32(0.f);
                const float64x2_t t0 = vreinterpretq_f64_f32(vtrn1q_f32(r[0], r[1]));
                const float64x2_t t1 = vreinterpretq_f64_f32(vtrn2q_f32(r[0], r[1]));
                const float64x2_t t2 = vreinterpretq_f64_f32(vtrn1q_f32(r[2], r[3]));
                const float64x2_t t3 = vreinterpretq_f64_f32(vtrn2q_f32(r[2], r[3]));
                vst1q_f32(Kt + (size_t)(d0 + 0) * AK + j0, vreinterpretq_f32_f64(vtrn1q_f64(t0, t2)));
                vst1q_f32(Kt + (size_t)(d0 + 1) * AK + j0, vreinterpretq_f32_f64(vtrn1q_f64(t1, t3)));
                vst1q_f32(Kt + (size_t)(d0 + 2) * AK + j0, vreinterpretq_f32_f64(vtrn2q_f64(t0, t2)));
                vst1q_f32(Kt + (size_t)(d0 + 3) * AK + j0, vreinterpretq_f32_f64(vtrn2q_f64(t1, t3)));
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
                float32x4_t s[4][4];
                for (int rr = 0; rr < 4; rr++) for (int x = 0; x < 4; x++) s[rr][x] = vdupq_n_f32(0.f);
                for (int d = 0; d < hd; d++) {
                    float32x4_t kv[4];
                    for (int x = 0; x < 4; x++) kv[x] = vld1q_f32(Kt + d * AK + j0 + 4 * x);
                    for (int rr = 0; rr < 4; rr++) {
                        const float32x4_t qb = vdupq_n_f32(Qb[(size_t)(i0 + rr) * hd + d]);
                        for (int x = 0; x < 4; x++) s[rr][x] = vfmaq_f32(s[rr][x], qb, kv[x]);
                    }
                }
                for (int rr = 0; rr < 4; rr++)
                    for (int x = 0; x < 4; x++) vst1q_f32(P + (i0 + rr) * AK + j0 + 4 * x, s[rr][x]);
            }
            const int jp = (jn + 3) & ~3;  /* P's columns in use, whole vectors */
            for (int rr = 0; rr < 4; rr++) {
                const int i = i0 + rr, lim = (pos[i] < kend - 1 ? pos[i] : kend - 1) - k0;
                const int lo = (i < R ? attn_lo(a, pos[i]) : 0) - k0;  /* keys k0 + j, lo <= j <= lim */
                float *pr = P + i * AK;
                if (lim < 0 || lo > lim || lo >= nk) {  /* no key of this tile: P = 0, c = 1 */
                    c[i] = 1.f;
                    for (int j = 0; j < jp; j += 4) vst1q_f32(pr + j, vdupq_n_f32(0.f));
                    continue;
                }
                const float32x4_t limv = vdupq_n_f32((float)lim), lov = vdupq_n_f32((float)lo);
                float32x4_t mx = ninf;
                for (int j = 0; j < jp; j += 4) {
                    const float32x4_t at = vaddq_f32(lane, vdupq_n_f32((float)j));
                    const uint32x4_t ok = vandq_u32(vcleq_f32(at, limv), vcgeq_f32(at, lov));
                    mx = vmaxq_f32(mx, vbslq_f32(ok, vld1q_f32(pr + j), ninf));
                }
                const float tmax = vmaxvq_f32(mx), mn = m[i] > tmax ? m[i] : tmax;
                c[i] = expf(m[i] - mn);
                float32x4_t sum = vdupq_n_f32(0.f);
                const float32x4_t mv = vdupq_n_f32(mn);
                for (int j = 0; j < jp; j += 4) {
                    const float32x4_t at = vaddq_f32(lane, vdupq_n_f32((float)j));
                    const uint32x4_t ok = vandq_u32(vcleq_f32(at, limv), vcgeq_f32(at, lov));
                    const float32x4_t p = vbslq_f32(ok, exp4_neon(vsubq_f32(vld1q_f32(pr + j), mv)), vdupq_n_f32(0.f));
                    sum = vaddq_f32(sum, p);
                    vst1q_f32(pr + j, p);
                }
                l[i] = l[i] * c[i] + vaddvq_f32(sum);
                m[i] = mn;
            }
            const size_t vb = (size_t)k0 * a->vst + (size_t)g * a->vsh;
            for (int d0 = 0; d0 < hd; d0 += 8) {
                float32x4_t o[4][2];
                for (int rr = 0; rr < 4; rr++) {
                    const float32x4_t cr = vdupq_n_f32(c[i0 + rr]);
                    const float *orow = O + (size_t)(i0 + rr) * hd + d0;
                    o[rr][0] = vmulq_f32(cr, vld1q_f32(orow));
                    o[rr][1] = vmulq_f32(cr, vld1q_f32(orow + 4));
                }
                for (int j = 0; j < jn; j++) {
                    const size_t vr = vb + (size_t)j * a->vst + d0;
                    const float32x4_t v0 = kv_ld4(a->v, a->f16, vr), v1 = kv_ld4(a->v, a->f16, vr + 4);
                    for (int rr = 0; rr < 4; rr++) {
                        const float32x4_t p = vdupq_n_f32(P[(i0 + rr) * AK + j]);
                        o[rr][0] = vfmaq_f32(o[rr][0], p, v0);
                        o[rr][1] = vfmaq_f32(o[rr][1], p, v1);
                    }
                }
                for (int rr = 0; rr < 4; rr++) {
                    float *orow = O + (size_t)(i0 + rr) * hd + d0;
                    vst1q_f32(orow, o[rr][0]);
                    vst1q_f32(orow + 4, o[rr][1]);
                }
            }
        }
    }
    for (int i = 0; i < R; i++) {
        const int hh = i / bq, t = i % bq;
        float *y = a->out + (size_t)(q0 + t) * a->nh * hd + (size_t)(g * r + hh) * hd;
        const float inv = 1.f / l[i];
        for (int d = 0; d < hd; d++) y[d] = O[(size_t)i * hd + d] * inv;
    }
}

/* ---- packed weights, 8 rows a group ------------------------------------------------------- */

/* one block's weights: chunk c (values 4c..4c+3 of the 8 rows) in w[c][0] (rows 0..3) and
 * w[c][1] (rows 4..7), as signed bytes (nibbles, 5- and 6-bit values, Q8_0's own bytes) */
INLINE void neon_weights(const uint8_t *p, int kind, int8x16_t w[8][2]) {
    const int wo = (int)pk_wo(kind, 8);
    if (PK_NIB(kind)) {
        const uint8x16_t lo = vdupq_n_u8(15);
        for (int c = 0; c < 4; c++)
            for (int h = 0; h < 2; h++) {
                const uint8x16_t x = vld1q_u8(p + wo + 32 * c + 16 * h);
                w[c][h] = vreinterpretq_s8_u8(vandq_u8(x, lo));
                w[c + 4][h] = vreinterpretq_s8_u8(vshrq_n_u8(x, 4));
            }
        if (kind == PK_Q5) {  /* the 5th bits: + 16 where set (bit c of byte k: chunk c's byte k) */
            for (int h = 0; h < 2; h++) {
                const uint8x16_t hb = vld1q_u8(p + wo + 128 + 16 * h);
                for (int c = 0; c < 8; c++) {
                    const uint8x16_t m = vandq_u8(vshlq_u8(hb, vdupq_n_s8((int8_t)(4 - c))), vdupq_n_u8(16));
                    w[c][h] = vreinterpretq_s8_u8(vorrq_u8(vreinterpretq_u8_s8(w[c][h]), m));
                }
            }
        }
    } else {
        for (int c = 0; c < 8; c++)
            for (int h = 0; h < 2; h++) w[c][h] = vld1q_s8((const int8_t *)p + wo + 32 * c + 16 * h);
    }
}

/* the block's scales: d (A) and m (B) of the 8 rows, f16 or f32 (see ggml_cpu.c's pack); m = 0
 * where the kind has none (PK_HAS_M) */
INLINE void neon_scales(const uint8_t *p, int kind, float32x4_t dw[2], float32x4_t mw[2]) {
    if (PK_F32(kind)) {
        for (int h = 0; h < 2; h++) { dw[h] = vld1q_f32((const float *)p + 4 * h); mw[h] = vld1q_f32((const float *)(p + 32) + 4 * h); }
    } else {
        const float16x8_t d = vreinterpretq_f16_u16(vld1q_u16((const uint16_t *)p));
        dw[0] = vcvt_f32_f16(vget_low_f16(d)); dw[1] = vcvt_f32_f16(vget_high_f16(d));
        mw[0] = mw[1] = vdupq_n_f32(0.f);
        if (PK_HAS_M(kind)) {
            const float16x8_t m = vreinterpretq_f16_u16(vld1q_u16((const uint16_t *)(p + 16)));
            mw[0] = vcvt_f32_f16(vget_low_f16(m)); mw[1] = vcvt_f32_f16(vget_high_f16(m));
        }
    }
}

/* a row's float epilogue for one block, lane for lane AVX2's (kernels_avx2_tile.h): i0 (and for
 * Q6_K i1: values 16..31) the integer dots of rows 0..3 / 4..7 (h), acc the row's 8 outputs */
INLINE void neon_epilogue(int kind, int nb, int b, int r, const float *dx, const float *sx, int32x4_t i0[2],
                          int32x4_t i1[2], const float32x4_t dw[2], const float32x4_t mw[2], float *acc) {
#define SX(j) sx[(size_t)(j) * TILE + r]
#define ISX(j) ((const int32_t *)sx)[(size_t)(j) * TILE + r]
    const float32x4_t da = vdupq_n_f32(dx[(size_t)b * TILE + r]);
    for (int h = 0; h < 2; h++) {
        float32x4_t a = vld1q_f32(acc + 4 * h);
        if (kind == PK_Q6K) {  /* s0 (I0 da - 32 hs0) + s1 (I1 da - 32 hs1) (-32 hs: the sums) */
            const float32x4_t t0 = vfmaq_f32(vdupq_n_f32(SX(nb + 2 * b)), vcvtq_f32_s32(i0[h]), da);
            const float32x4_t t1 = vfmaq_f32(vdupq_n_f32(SX(nb + 2 * b + 1)), vcvtq_f32_s32(i1[h]), da);
            a = vfmaq_f32(a, t0, dw[h]);
            a = vfmaq_f32(a, t1, mw[h]);
        } else if (kind == PK_Q4S || kind == PK_Q8 || kind == PK_Q5) {  /* d da ((u . q) - off sum(q)); Q8_0: signed */
            int32x4_t i = i0[h];
            if (kind != PK_Q8) i = vsubq_s32(i, vdupq_n_s32(ISX(3 * nb + b) * (kind == PK_Q5 ? 16 : 8)));
            a = vfmaq_f32(a, vcvtq_f32_s32(i), vmulq_f32(dw[h], da));
        } else {
            a = vfmaq_f32(a, vcvtq_f32_s32(i0[h]), vmulq_f32(dw[h], da));
            a = vfmaq_f32(a, mw[h], vdupq_n_f32(SX(b)));
        }
        vst1q_f32(acc + 4 * h, a);
    }
#undef SX
#undef ISX
}

/* one level's dots of a row (32 activation bytes at a) with the block's weights (sdot) */
T_DOT INLINE void neon_dots(int8x16_t w[8][2], const int8_t *a, int kind, int32x4_t i0[2], int32x4_t i1[2]) {
    const int8x16_t lo = vld1q_s8(a), hi = vld1q_s8(a + 16);
    for (int h = 0; h < 2; h++) {
        int32x4_t s0 = vdupq_n_s32(0), s1 = vdupq_n_s32(0);
        SDOT_LANE(s0, w[0][h], lo, 0); SDOT_LANE(s0, w[1][h], lo, 1);
        SDOT_LANE(s0, w[2][h], lo, 2); SDOT_LANE(s0, w[3][h], lo, 3);
        SDOT_LANE(s1, w[4][h], hi, 0); SDOT_LANE(s1, w[5][h], hi, 1);
        SDOT_LANE(s1, w[6][h], hi, 2); SDOT_LANE(s1, w[7][h], hi, 3);
        if (kind == PK_Q6K) { i0[h] = s0; i1[h] = s1; }
        else i0[h] = vaddq_s32(s0, s1);
    }
}

/* out (R, 8) = 8 packed weight rows against rows 0..R-1 (R <= TILE) of an activation tile,
 * `kind` and `hi` constants (see kernels_avx2_tile.h's packed_body: the same steps) */
T_DOT INLINE void neon_packed_body(const uint8_t *pk, int K, const int8_t *q, const float *dx, const float *sx,
                                   const int R, float *out, const int hi, const int kind) {
    const int nb = K / 32;
    const size_t bb = pk_size(kind, 8), qb = (size_t)TILE * 32 * (hi ? 2 : 1);
    memset(out, 0, sizeof(float) * 8 * (size_t)R);
    for (int b = 0; b < nb; b++) {
        const uint8_t *p = pk + (size_t)b * bb;
        if (R == 1) for (int o = 0; o < (int)bb; o += 64) __builtin_prefetch(p + PF_DIST + o, 0, 3);
        float32x4_t dw[2], mw[2];
        int8x16_t w[8][2];
        neon_scales(p, kind, dw, mw);
        neon_weights(p, kind, w);
        for (int r = 0; r < R; r++) {
            const int8_t *a = q + b * qb + r * 32;
            int32x4_t i0[2], i1[2] = {vdupq_n_s32(0), vdupq_n_s32(0)};
            neon_dots(w, a, kind, i0, i1);
            if (hi) {
                int32x4_t j0[2], j1[2] = {vdupq_n_s32(0), vdupq_n_s32(0)};
                neon_dots(w, a + TILE * 32, kind, j0, j1);
                for (int h = 0; h < 2; h++) {
                    i0[h] = vaddq_s32(vshlq_n_s32(i0[h], 8), j0[h]);
                    i1[h] = vaddq_s32(vshlq_n_s32(i1[h], 8), j1[h]);
                }
            }
            neon_epilogue(kind, nb, b, r, dx, sx, i0, i1, dw, mw, out + 8 * r);
        }
    }
}

T_DOT static void packed_tile_neon(const uint8_t *pk, int K, const int8_t *q, const float *dx, const float *sx,
                                   int R, float *out, int hi, int kind) {
#define BODY(KK) do { if (hi) neon_packed_body(pk, K, q, dx, sx, R, out, 1, KK); \
                      else neon_packed_body(pk, K, q, dx, sx, R, out, 0, KK); } while (0)
    switch (kind) {
    case PK_Q4: BODY(PK_Q4); break;
    case PK_Q4S: BODY(PK_Q4S); break;
    case PK_Q8: BODY(PK_Q8); break;
    case PK_Q4K: BODY(PK_Q4K); break;
    case PK_Q5K: BODY(PK_Q5K); break;
    case PK_Q5: BODY(PK_Q5); break;
    default: BODY(PK_Q6K);
    }
#undef BODY
}

/* i8mm: two activation rows at once. For weight rows 2k, 2k+1 and chunks c, c+1 (values
 * 4c..4c+7), zip1/zip2 of the two chunks' registers give [row 2k: 8 values, row 2k+1: 8 values]
 * (bm), the two activation rows' 8 bytes side by side the other operand; smmla's 2 x 2 int32
 * [r.2k, r.2k+1, r'.2k, r'.2k+1] then land in row order with zip1/zip2 of 64-bit halves. */
T_MM INLINE void mm_dots(const int8x16_t bm[4][4], const int8_t *a, int kind, int32x4_t i0[2][2],
                         int32x4_t i1[2][2]) {
    int32x4_t s[2][4];  /* [values 0..15, 16..31][row pair k] */
    for (int half = 0; half < 2; half++)
        for (int k = 0; k < 4; k++) s[half][k] = vdupq_n_s32(0);
    for (int cp = 0; cp < 4; cp++) {  /* chunk pair 2cp, 2cp+1: values 8cp..8cp+7 */
        const int8x16_t am = vcombine_s8(vld1_s8(a + 8 * cp), vld1_s8(a + 32 + 8 * cp));
        for (int k = 0; k < 4; k++) SMMLA(s[cp >> 1][k], am, bm[cp][k]);
    }
    for (int half = 0; half < 2; half++)
        for (int h = 0; h < 2; h++) {  /* rows 4h..4h+3: pairs 2h, 2h+1 */
            const int64x2_t x = vreinterpretq_s64_s32(s[half][2 * h]), y = vreinterpretq_s64_s32(s[half][2 * h + 1]);
            const int32x4_t ra = vreinterpretq_s32_s64(vzip1q_s64(x, y)), rb = vreinterpretq_s32_s64(vzip2q_s64(x, y));
            if (half == 0) { i0[0][h] = ra; i0[1][h] = rb; }
            else if (kind == PK_Q6K) { i1[0][h] = ra; i1[1][h] = rb; }
            else { i0[0][h] = vaddq_s32(i0[0][h], ra); i0[1][h] = vaddq_s32(i0[1][h], rb); }
        }
}

T_MM INLINE void mm_packed_body(const uint8_t *pk, int K, const int8_t *q, const float *dx, const float *sx,
                                const int R, float *out, const int hi, const int kind) {
    const int nb = K / 32;
    const size_t bb = pk_size(kind, 8), qb = (size_t)TILE * 32 * (hi ? 2 : 1);
    memset(out, 0, sizeof(float) * 8 * (size_t)R);
    for (int b = 0; b < nb; b++) {
        const uint8_t *p = pk + (size_t)b * bb;
        float32x4_t dw[2], mw[2];
        int8x16_t w[8][2], bm[4][4];
        neon_scales(p, kind, dw, mw);
        neon_weights(p, kind, w);
        for (int cp = 0; cp < 4; cp++)
            for (int h = 0; h < 2; h++) {
                const int32x4_t x = vreinterpretq_s32_s8(w[2 * cp][h]), y = vreinterpretq_s32_s8(w[2 * cp + 1][h]);
                bm[cp][2 * h] = vreinterpretq_s8_s32(vzip1q_s32(x, y));
                bm[cp][2 * h + 1] = vreinterpretq_s8_s32(vzip2q_s32(x, y));
            }
        int r = 0;
        for (; r + 2 <= R; r += 2) {
            const int8_t *a = q + b * qb + r * 32;
            int32x4_t i0[2][2], i1[2][2] = {{vdupq_n_s32(0), vdupq_n_s32(0)}, {vdupq_n_s32(0), vdupq_n_s32(0)}};
            mm_dots(bm, a, kind, i0, i1);
            if (hi) {
                int32x4_t j0[2][2], j1[2][2] = {{vdupq_n_s32(0), vdupq_n_s32(0)}, {vdupq_n_s32(0), vdupq_n_s32(0)}};
                mm_dots(bm, a + TILE * 32, kind, j0, j1);
                for (int e = 0; e < 2; e++)
                    for (int h = 0; h < 2; h++) {
                        i0[e][h] = vaddq_s32(vshlq_n_s32(i0[e][h], 8), j0[e][h]);
                        i1[e][h] = vaddq_s32(vshlq_n_s32(i1[e][h], 8), j1[e][h]);
                    }
            }
            for (int e = 0; e < 2; e++)
                neon_epilogue(kind, nb, b, r + e, dx, sx, i0[e], i1[e], dw, mw, out + 8 * (r + e));
        }
        if (r < R) {  /* an odd last row: sdot */
            const int8_t *a = q + b * qb + r * 32;
            int32x4_t i0[2], i1[2] = {vdupq_n_s32(0), vdupq_n_s32(0)};
            neon_dots(w, a, kind, i0, i1);
            if (hi) {
                int32x4_t j0[2], j1[2] = {vdupq_n_s32(0), vdupq_n_s32(0)};
                neon_dots(w, a + TILE * 32, kind, j0, j1);
                for (int h = 0; h < 2; h++) {
                    i0[h] = vaddq_s32(vshlq_n_s32(i0[h], 8), j0[h]);
                    i1[h] = vaddq_s32(vshlq_n_s32(i1[h], 8), j1[h]);
                }
            }
            neon_epilogue(kind, nb, b, r, dx, sx, i0, i1, dw, mw, out + 8 * r);
        }
    }
}

/* rows 0..R-1 of a tile with i8mm; one row (decode) is sdot's (nothing to pair) */
T_MM static void packed_tile_i8mm(const uint8_t *pk, int K, const int8_t *q, const float *dx, const float *sx,
                                  int R, float *out, int hi, int kind) {
    if (R == 1) { packed_tile_neon(pk, K, q, dx, sx, R, out, hi, kind); return; }
#define BODY(KK) do { if (hi) mm_packed_body(pk, K, q, dx, sx, R, out, 1, KK); \
                      else mm_packed_body(pk, K, q, dx, sx, R, out, 0, KK); } while (0)
    switch (kind) {
    case PK_Q4: BODY(PK_Q4); break;
    case PK_Q4S: BODY(PK_Q4S); break;
    case PK_Q8: BODY(PK_Q8); break;
    case PK_Q4K: BODY(PK_Q4K); break;
    case PK_Q5K: BODY(PK_Q5K); break;
    case PK_Q5: BODY(PK_Q5); break;
    default: BODY(PK_Q6K);
    }
#undef BODY
}
