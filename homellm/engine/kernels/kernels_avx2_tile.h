/* homellm CPU kernels: the AVX2 packed kernel (included three times by kernels_avx2.h: AVX2_T its
 * target, AVX2_VNNI whether vpdpbusd (AVX2_DP) or vpmaddubsw makes the integer dots, AVX2_SFX
 * its names). */

/* a row's integer dots against one level of its block's 32 activation bytes a (chunk c of the
 * weights: values 4c..4c+3 of 8 rows, against 4 broadcast bytes): Q6_K's two halves (values
 * 0..15 into *i0, 16..31 into *i1), every other kind's whole sum into *i0 (Q4_0's nibbles and,
 * with vpdpbusd, Q8_0's bytes + 128: before their offsets come off) */
AVX2_T INLINE void AVX2_SFX(dots)(const __m256i *w, const uint8_t *pw, const int8_t *a, const int kind,
                                  __m256i *i0, __m256i *i1) {
#define BC(c) _mm256_set1_epi32(ld4(a + 4 * (c)))
#if AVX2_VNNI
    (void)pw;
    const __m256i z = _mm256_setzero_si256();
    __m256i s0 = AVX2_DP(z, w[0], BC(0)), s1 = AVX2_DP(z, w[4], BC(4));
    for (int c = 1; c < 4; c++) {
        s0 = AVX2_DP(s0, w[c], BC(c));
        s1 = AVX2_DP(s1, w[c + 4], BC(c + 4));
    }
    if (kind == PK_Q6K) { *i0 = s0; *i1 = s1; }
    else *i0 = _mm256_add_epi32(s0, s1);
#else
    const __m256i ones = _mm256_set1_epi16(1);
#define MU(c) _mm256_maddubs_epi16(w[c], BC(c))
    if (PK_NIB(kind) && kind != PK_Q5) {  /* nibbles: all 8 chunks in int16 (<= 30480) */
        __m256i s = MU(0);
        for (int c = 1; c < 8; c++) s = _mm256_add_epi16(s, MU(c));
        *i0 = _mm256_madd_epi16(s, ones);
    } else if (kind == PK_Q5K || kind == PK_Q5) {  /* 5 bits: 4 chunks in int16 (<= 31496) */
        const __m256i s0 = _mm256_add_epi16(_mm256_add_epi16(MU(0), MU(1)), _mm256_add_epi16(MU(2), MU(3)));
        const __m256i s1 = _mm256_add_epi16(_mm256_add_epi16(MU(4), MU(5)), _mm256_add_epi16(MU(6), MU(7)));
        *i0 = _mm256_add_epi32(_mm256_madd_epi16(s0, ones), _mm256_madd_epi16(s1, ones));
    } else if (kind == PK_Q6K) {  /* 6 bits: 2 chunks in int16 (<= 32004) */
        *i0 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_add_epi16(MU(0), MU(1)), ones),
                               _mm256_madd_epi16(_mm256_add_epi16(MU(2), MU(3)), ones));
        *i1 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_add_epi16(MU(4), MU(5)), ones),
                               _mm256_madd_epi16(_mm256_add_epi16(MU(6), MU(7)), ones));
    } else {  /* Q8_0: |q| (w) against the activations with q's signs, one chunk a vpmaddwd */
        __m256i s = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++) {
            const __m256i sg = _mm256_sign_epi8(BC(c), _mm256_loadu_si256((const __m256i *)(pw + 32 * c)));
            s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(w[c], sg), ones));
        }
        *i0 = s;
    }
#undef MU
#endif
#undef BC
}

#ifndef AVX2_FIFTH_BITS
#define AVX2_FIFTH_BITS
/* chunk c's 5th bits of a PK_Q5 block (G = 8: byte k of h holds bit c for chunk c's byte k) as
 * bytes of 16 or 0: bit c moved to bit 4 by a 16-bit shift (a byte's other bits, and those the
 * shift brings in from the neighbour byte, land elsewhere than bit 4), then masked */
T256 INLINE __m256i fifth_bits(__m256i h, const int c) {
    const __m256i x = c < 4 ? _mm256_slli_epi16(h, 4 - c) : c > 4 ? _mm256_srli_epi16(h, c - 4) : h;
    return _mm256_and_si256(x, _mm256_set1_epi8(16));
}
#endif

/* one activation row's integer dots with a block (weights at pw: the block's integers), both
 * levels (a2 NULL: one), the chunks streamed through a few registers instead of kept in eight:
 * the sums AVX2_SFX(dots) makes, in int16 where it keeps them there, as exact (no partial sum of
 * a register of int16 exceeds the bounds of kernels_avx2.h in any order) */
AVX2_T INLINE void AVX2_SFX(row_dots)(const uint8_t *pw, const int8_t *a, const int8_t *a2, const int kind,
                                      __m256i *i0, __m256i *i1) {
    const __m256i z = _mm256_setzero_si256(), lo = _mm256_set1_epi8(15);
#define BCA(x, c) _mm256_set1_epi32(ld4((x) + 4 * (c)))
#define LD(c) _mm256_loadu_si256((const __m256i *)(pw + 32 * (c)))
#if AVX2_VNNI
    /* s[level][half]: values 0..15 (chunks 0..3), 16..31 (chunks 4..7) */
    __m256i s00 = z, s01 = z, s10 = z, s11 = z;
    if (PK_NIB(kind)) {
        const __m256i h = kind == PK_Q5 ? LD(4) : z;
        for (int c = 0; c < 4; c++) {
            const __m256i x = LD(c);
            __m256i wl = _mm256_and_si256(x, lo), wh = _mm256_and_si256(_mm256_srli_epi16(x, 4), lo);
            if (kind == PK_Q5) { wl = _mm256_or_si256(wl, fifth_bits(h, c)); wh = _mm256_or_si256(wh, fifth_bits(h, c + 4)); }
            s00 = AVX2_DP(s00, wl, BCA(a, c)); s01 = AVX2_DP(s01, wh, BCA(a, c + 4));
            if (a2) { s10 = AVX2_DP(s10, wl, BCA(a2, c)); s11 = AVX2_DP(s11, wh, BCA(a2, c + 4)); }
        }
    } else {
        for (int c = 0; c < 4; c++) {
            __m256i wl = LD(c), wh = LD(c + 4);
            if (kind == PK_Q8) { wl = _mm256_xor_si256(wl, _mm256_set1_epi8((char)0x80)); wh = _mm256_xor_si256(wh, _mm256_set1_epi8((char)0x80)); }
            s00 = AVX2_DP(s00, wl, BCA(a, c)); s01 = AVX2_DP(s01, wh, BCA(a, c + 4));
            if (a2) { s10 = AVX2_DP(s10, wl, BCA(a2, c)); s11 = AVX2_DP(s11, wh, BCA(a2, c + 4)); }
        }
    }
    if (kind == PK_Q6K) {
        *i0 = a2 ? _mm256_add_epi32(_mm256_slli_epi32(s00, 8), s10) : s00;
        *i1 = a2 ? _mm256_add_epi32(_mm256_slli_epi32(s01, 8), s11) : s01;
    } else {
        const __m256i t = _mm256_add_epi32(s00, s01);
        *i0 = a2 ? _mm256_add_epi32(_mm256_slli_epi32(t, 8), _mm256_add_epi32(s10, s11)) : t;
    }
#else
    const __m256i ones = _mm256_set1_epi16(1);
#define MUA(w, x, c) _mm256_maddubs_epi16(w, BCA(x, c))
    if (PK_NIB(kind)) {  /* int16 sums of 4 chunks a half (5 bits: <= 31496; nibbles: 8 chunks <= 30480) */
        __m256i s00 = z, s01 = z, s10 = z, s11 = z;
        const __m256i h = kind == PK_Q5 ? LD(4) : z;
        for (int c = 0; c < 4; c++) {
            const __m256i x = LD(c);
            __m256i wl = _mm256_and_si256(x, lo), wh = _mm256_and_si256(_mm256_srli_epi16(x, 4), lo);
            if (kind == PK_Q5) { wl = _mm256_or_si256(wl, fifth_bits(h, c)); wh = _mm256_or_si256(wh, fifth_bits(h, c + 4)); }
            s00 = _mm256_add_epi16(s00, MUA(wl, a, c)); s01 = _mm256_add_epi16(s01, MUA(wh, a, c + 4));
            if (a2) { s10 = _mm256_add_epi16(s10, MUA(wl, a2, c)); s11 = _mm256_add_epi16(s11, MUA(wh, a2, c + 4)); }
        }
        __m256i t, u = z;
        if (kind == PK_Q5) {
            t = _mm256_add_epi32(_mm256_madd_epi16(s00, ones), _mm256_madd_epi16(s01, ones));
            if (a2) u = _mm256_add_epi32(_mm256_madd_epi16(s10, ones), _mm256_madd_epi16(s11, ones));
        } else {
            t = _mm256_madd_epi16(_mm256_add_epi16(s00, s01), ones);
            if (a2) u = _mm256_madd_epi16(_mm256_add_epi16(s10, s11), ones);
        }
        *i0 = a2 ? _mm256_add_epi32(_mm256_slli_epi32(t, 8), u) : t;
    } else if (kind == PK_Q5K || kind == PK_Q6K) {  /* int16 sums of 4 chunks (5 bits) or 2 (6 bits) */
        __m256i s[2][4];  /* [level][pair of chunks 2k, 2k+1] */
        for (int l = 0; l < 2; l++) for (int k = 0; k < 4; k++) s[l][k] = z;
        for (int c = 0; c < 8; c++) {
            const __m256i w = LD(c);
            s[0][c / 2] = _mm256_add_epi16(s[0][c / 2], MUA(w, a, c));
            if (a2) s[1][c / 2] = _mm256_add_epi16(s[1][c / 2], MUA(w, a2, c));
        }
        __m256i v[2][2];  /* [level][half] int32 */
        for (int l = 0; l < (a2 ? 2 : 1); l++) {
            if (kind == PK_Q5K) {
                v[l][0] = _mm256_madd_epi16(_mm256_add_epi16(s[l][0], s[l][1]), ones);
                v[l][1] = _mm256_madd_epi16(_mm256_add_epi16(s[l][2], s[l][3]), ones);
            } else {
                v[l][0] = _mm256_add_epi32(_mm256_madd_epi16(s[l][0], ones), _mm256_madd_epi16(s[l][1], ones));
                v[l][1] = _mm256_add_epi32(_mm256_madd_epi16(s[l][2], ones), _mm256_madd_epi16(s[l][3], ones));
            }
        }
        if (kind == PK_Q6K) {
            *i0 = a2 ? _mm256_add_epi32(_mm256_slli_epi32(v[0][0], 8), v[1][0]) : v[0][0];
            *i1 = a2 ? _mm256_add_epi32(_mm256_slli_epi32(v[0][1], 8), v[1][1]) : v[0][1];
        } else {
            const __m256i t = _mm256_add_epi32(v[0][0], v[0][1]);
            *i0 = a2 ? _mm256_add_epi32(_mm256_slli_epi32(t, 8), _mm256_add_epi32(v[1][0], v[1][1])) : t;
        }
    } else {  /* Q8_0: |q| against the activations with q's signs, one chunk a vpmaddwd */
        __m256i t = z, u = z;
        for (int c = 0; c < 8; c++) {
            const __m256i x = LD(c), w = _mm256_abs_epi8(x);
            t = _mm256_add_epi32(t, _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_sign_epi8(BCA(a, c), x)), ones));
            if (a2) u = _mm256_add_epi32(u, _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_sign_epi8(BCA(a2, c), x)), ones));
        }
        *i0 = a2 ? _mm256_add_epi32(_mm256_slli_epi32(t, 8), u) : t;
    }
#undef MUA
#endif
#undef LD
#undef BCA
}

/* block b's float lanes for one activation row: acc + its dots i0, i1 (i1: Q6_K's second half)
 * scaled by the block's weights' d and m at p, the row's scale dxb and its sums at sx (row's
 * entry j at sx[j TILE]: block b j = b; its halves j = nb + 2 b + h) */
AVX2_T INLINE __m256 AVX2_SFX(block_acc)(__m256 acc, __m256i i0, __m256i i1, const uint8_t *p, float dxb,
                                         const float *sx, int nb, int b, const int kind,
                                         const int off) {
    const int f32 = PK_F32(kind);
    const __m256 dw = f32 ? _mm256_loadu_ps((const float *)p) : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    const __m256 da = _mm256_set1_ps(dxb);
#define SX(j) sx[(size_t)(j) * TILE]
    if (kind == PK_Q6K) {  /* s0 (I0 da - 32 hs0) + s1 (I1 da - 32 hs1) (-32 hs: the sums) */
        const __m256 mw = _mm256_loadu_ps((const float *)(p + 32));
        const __m256 t0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), da, _mm256_set1_ps(SX(nb + 2 * b)));
        const __m256 t1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), da, _mm256_set1_ps(SX(nb + 2 * b + 1)));
        acc = _mm256_fmadd_ps(t0, dw, acc);
        return _mm256_fmadd_ps(t1, mw, acc);
    }
    if (kind == PK_Q4S || kind == PK_Q8 || kind == PK_Q5) {  /* d da ((u . q) - off sum(q)) */
        if (off && (kind != PK_Q8 || AVX2_VNNI))
            i0 = _mm256_sub_epi32(i0, _mm256_set1_epi32(((const int32_t *)sx)[(size_t)(3 * nb + b) * TILE]
                                                        * (kind == PK_Q8 ? 128 : kind == PK_Q5 ? 16 : 8)));
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_mul_ps(dw, da), acc);
    }
    const __m256 mw = f32 ? _mm256_loadu_ps((const float *)(p + 32)) : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16)));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_mul_ps(dw, da), acc);
    return _mm256_fmadd_ps(mw, _mm256_set1_ps(SX(b)), acc);
#undef SX
}

/* out (1, 8) = 8 packed weight rows against row 0 of an activation tile (decode): row_dots, then
 * packed_body's float operations for its one row, the accumulator in a register */
AVX2_T INLINE void AVX2_SFX(row_body)(const uint8_t *pk, int K, const int8_t *q, const float *dx, const float *sx,
                                      float *out, const int hi, const int kind) {
    const int nb = K / 32;
    const size_t bb = pk_size(kind, 8), wo = pk_wo(kind, 8), qb = (size_t)TILE * 32 * (hi ? 2 : 1);
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *p = pk + (size_t)b * bb;
        /* the weights stream once, ahead of the hardware prefetcher's reach */
        for (int o = 0; o < (int)bb; o += 64) _mm_prefetch((const char *)p + PF_DIST + o, _MM_HINT_T0);
        const int8_t *a = q + b * qb;
        __m256i i0, i1 = _mm256_setzero_si256();
        AVX2_SFX(row_dots)(p + wo, a, hi ? a + TILE * 32 : NULL, kind, &i0, &i1);
        acc = AVX2_SFX(block_acc)(acc, i0, i1, p, dx[(size_t)b * TILE], sx, nb, b, kind, 1);
    }
    _mm256_storeu_ps(out, acc);
}

/* out (R, 8) = 8 packed weight rows (one group's blocks at pk) against rows 0..R-1 (R <= TILE)
 * of an activation tile (see TILE), `kind` (PK_*) and `hi` (two levels) constants: per block
 * the weights in 8 registers, then each row's dots and its float lanes, operation for operation
 * what packed_body (AVX512) does with its 16 (one row, decode: row_body) */
AVX2_T INLINE void AVX2_SFX(packed_body)(const uint8_t *pk, int K, const int8_t *q, const float *dx,
                                         const float *sx, const int R, float *out, const int hi, const int kind) {
    const int nb = K / 32, nib = PK_NIB(kind);
    const size_t bb = pk_size(kind, 8), wo = pk_wo(kind, 8), qb = (size_t)TILE * 32 * (hi ? 2 : 1);
    const __m256i lo = _mm256_set1_epi8(15);
    __m256 accs[TILE];
    for (int r = 0; r < R; r++) accs[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *p = pk + (size_t)b * bb;  /* (its d and m: block_acc) */
        __m256i w[8];
        if (nib) {
            for (int c = 0; c < 4; c++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(p + wo + 32 * c));
                w[c] = _mm256_and_si256(x, lo);
                w[c + 4] = _mm256_and_si256(_mm256_srli_epi16(x, 4), lo);
            }
            if (kind == PK_Q5) {  /* the 5th bits: + 16 where set */
                const __m256i h = _mm256_loadu_si256((const __m256i *)(p + wo + 128));
                for (int c = 0; c < 8; c++) w[c] = _mm256_or_si256(w[c], fifth_bits(h, c));
            }
        } else {
            for (int c = 0; c < 8; c++) {
                w[c] = _mm256_loadu_si256((const __m256i *)(p + wo + 32 * c));
                /* Q8_0: vpdpbusd's unsigned operand q + 128, or vpmaddubsw's |q| */
                if (kind == PK_Q8)
                    w[c] = AVX2_VNNI ? _mm256_xor_si256(w[c], _mm256_set1_epi8((char)0x80)) : _mm256_abs_epi8(w[c]);
            }
        }
        for (int r = 0; r < R; r++) {
            const int8_t *a = q + b * qb + r * 32;
            __m256i i0, i1 = _mm256_setzero_si256();
            AVX2_SFX(dots)(w, p + wo, a, kind, &i0, &i1);
            if (hi) {
                __m256i j0, j1 = _mm256_setzero_si256();
                AVX2_SFX(dots)(w, p + wo, a + TILE * 32, kind, &j0, &j1);
                i0 = _mm256_add_epi32(_mm256_slli_epi32(i0, 8), j0);
                i1 = _mm256_add_epi32(_mm256_slli_epi32(i1, 8), j1);
            }
            accs[r] = AVX2_SFX(block_acc)(accs[r], i0, i1, p, dx[(size_t)b * TILE + r], sx + r, nb, b, kind, 1);
        }
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(out + 8 * r, accs[r]);
}

#if !AVX2_VNNI
/* The int16 tiles (tile mode TM_A16: two levels as one value a = 256 q + q2 per activation, see
 * quantize_tile_row): out (R, 8) = 8 packed weight rows against rows 0..R-1 of such a tile. The
 * integer dots w . a = 256 (w . q) + (w . q2) are packed_body's, exact in int32 (|a| <= 32639,
 * |w| <= 128: 32 values < 2^27), so block_acc gets the same integers and the outputs are the
 * same bits. The weights are widened to int16 (a16_widen): row n's values 4c, 4c + 1 of chunk c
 * in int32 lane n of wb[2c], 4c + 2, 4c + 3 in that of wb[2c + 1], so a 32-bit broadcast of the
 * row's two activations against each makes lanes that are rows 0..7 in order: one accumulator
 * a row, no lane pairs to add back (the vphaddd of a 64-bit broadcast's layout). Q4_0's and
 * Q5_0's offsets come off the widened weights themselves (w - 8, w - 16: signed), so their
 * integers are the offset-corrected ones block_acc would make (the same integers, fewer
 * operations a row). A group's widened weights (512 bytes a block) are made once for all its
 * tiles (a16_group: the thread's last two groups, gate and up alternating); a tile's 8 rows go
 * at once (8 int32 accumulators; Q6_K's halves one after the other). Forced AVX2 path, one core,
 * ns a row and block of matmul_packed (128 rows, one thread, the quantization included): Q5_0 4.49 -> 3.91,
 * Q4_K 4.59 -> 4.12, Q6_K 5.41 -> ~5.06, Q8_0 4.93 -> 4.64. */
AVX2_T INLINE __m256i AVX2_SFX(bq2)(const int16_t *a) { return _mm256_set1_epi32(ld4((const int8_t *)a)); }

/* block p's weights (of `kind`), widened into wb[0..16): chunk c's values 4c, 4c + 1 of row n in
 * wb[2c]'s int32 lane n, values 4c + 2, 4c + 3 in wb[2c + 1]'s; Q4_0's and Q5_0's with their
 * offsets taken off (signed: w - 8, w - 16), Q8_0's sign-extended */
AVX2_T INLINE void AVX2_SFX(a16_widen)(const uint8_t *p, const int kind, __m256i *wb) {
    const size_t wo = pk_wo(kind, 8);
    const __m256i lo = _mm256_set1_epi8(15), z = _mm256_setzero_si256();
    for (int c = 0; c < 8; c++) {  /* chunk c's bytes */
        __m256i x;
        if (PK_NIB(kind)) {
            const __m256i y = _mm256_loadu_si256((const __m256i *)(p + wo + 32 * (c & 3)));
            x = _mm256_and_si256(c < 4 ? y : _mm256_srli_epi16(y, 4), lo);
            if (kind == PK_Q5) x = _mm256_or_si256(x, fifth_bits(_mm256_loadu_si256((const __m256i *)(p + wo + 128)), c));
            if (kind == PK_Q5 || kind == PK_Q4S) x = _mm256_sub_epi8(x, _mm256_set1_epi8(kind == PK_Q5 ? 16 : 8));
        } else {
            x = _mm256_loadu_si256((const __m256i *)(p + wo + 32 * c));
        }
        /* each 128-bit lane's 4 rows: their values 4c, 4c + 1, then their 4c + 2, 4c + 3 */
        x = _mm256_shuffle_epi8(x, _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                                    0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
        const int sg = kind == PK_Q8 || kind == PK_Q5 || kind == PK_Q4S;
        const __m256i e = sg ? _mm256_cmpgt_epi8(z, x) : z;  /* signed bytes */
        _mm256_store_si256(wb + 2 * c, _mm256_unpacklo_epi8(x, e));  /* (int16: rows 0..3 | 4..7) */
        _mm256_store_si256(wb + 2 * c + 1, _mm256_unpackhi_epi8(x, e));
    }
}

/* the integer dots of rows 0..n-1 of a (n <= 8), chunks c0..c1-1, lane n of i[rr] row n's */
AVX2_T INLINE void AVX2_SFX(a16_rows)(const __m256i *wb, const int16_t *a, int c0, int c1, const int n,
                                      __m256i *i) {
    __m256i s[8];
    for (int rr = 0; rr < n; rr++) s[rr] = _mm256_setzero_si256();
    for (int c = c0; c < c1; c++) {
        const __m256i wl = _mm256_load_si256(wb + 2 * c), wh = _mm256_load_si256(wb + 2 * c + 1);
        for (int rr = 0; rr < n; rr++) {
            s[rr] = _mm256_add_epi32(s[rr], _mm256_madd_epi16(wl, AVX2_SFX(bq2)(a + rr * 32 + 4 * c)));
            s[rr] = _mm256_add_epi32(s[rr], _mm256_madd_epi16(wh, AVX2_SFX(bq2)(a + rr * 32 + 4 * c + 2)));
            /* (kept as running sums in registers: else gcc reassociates them into all the
             * products first, spilled, then summed) */
            __asm__("" : "+x"(s[rr]));
        }
    }
    for (int rr = 0; rr < n; rr++) i[rr] = s[rr];
}

/* rows 0..n-1 of block b (weights p, widened wb; activations a), into their accumulators */
AVX2_T INLINE void AVX2_SFX(a16_block)(const __m256i *wb, const int16_t *a, const uint8_t *p, const float *dx,
                                       const float *sx, int nb, int b, const int n, const int kind, __m256 *accs) {
    __m256i i0[8], i1[8];
    AVX2_SFX(a16_rows)(wb, a, 0, kind == PK_Q6K ? 4 : 8, n, i0);
    if (kind == PK_Q6K) AVX2_SFX(a16_rows)(wb, a, 4, 8, n, i1);
    for (int r = 0; r < n; r++)
        accs[r] = AVX2_SFX(block_acc)(accs[r], i0[r], kind == PK_Q6K ? i1[r] : _mm256_setzero_si256(), p,
                                      dx[(size_t)b * TILE + r], sx + r, nb, b, kind, 0);
}

/* wall: the group's widened weights (16 registers a block), or NULL: each block widened here;
 * a whole tile's 8 rows at once (a partial one's 4 and 1 at a time) */
AVX2_T INLINE void AVX2_SFX(a16_body)(const uint8_t *pk, int K, const int8_t *q, const float *dx, const float *sx,
                                      const int R, float *out, const int kind, const __m256i *wall) {
    const int nb = K / 32;
    const size_t bb = pk_size(kind, 8);
    __m256 accs[TILE];
    __m256i own[16];
    for (int r = 0; r < R; r++) accs[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *p = pk + (size_t)b * bb;
        const int16_t *a = (const int16_t *)q + (size_t)b * TILE * 32;
        const __m256i *wb = wall ? wall + 16 * (size_t)b : own;
        if (!wall) AVX2_SFX(a16_widen)(p, kind, own);
        if (R == 8) { AVX2_SFX(a16_block)(wb, a, p, dx, sx, nb, b, 8, kind, accs); continue; }
        for (int r0 = 0; r0 < R;) {
            if (R - r0 >= 4) { AVX2_SFX(a16_block)(wb, a + r0 * 32, p, dx + r0, sx + r0, nb, b, 4, kind, accs + r0); r0 += 4; }
            else { AVX2_SFX(a16_block)(wb, a + r0 * 32, p, dx + r0, sx + r0, nb, b, 1, kind, accs + r0); r0 += 1; }
        }
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(out + 8 * r, accs[r]);
}

/* A thread's widened groups: the last two it met (a gated MLP's gate and up take turns), each
 * valid within one call (a16_epoch: bumped by every call that makes TM_A16 tiles, so a group
 * never outlives the weights it was made from; one made in another call is made again); the
 * buffers are freed with the thread. NULL where memory runs out (then widened block by block). */
typedef struct { const uint8_t *pk; int K, kind; unsigned epoch; size_t cap; __m256i *wb; } a16_slot_t;
static unsigned a16_epoch;
static __thread a16_slot_t a16_slots[2];
static __thread int a16_turn;
static pthread_key_t a16_key;
static pthread_once_t a16_once = PTHREAD_ONCE_INIT;
static void a16_free(void *s) { a16_slot_t *sl = s; free(sl[0].wb); free(sl[1].wb); }
static void a16_key_make(void) { (void)pthread_key_create(&a16_key, a16_free); }
static void a16_new_call(void) { __atomic_add_fetch(&a16_epoch, 1, __ATOMIC_RELAXED); }

AVX2_T static const __m256i *AVX2_SFX(a16_group)(const uint8_t *pk, int K, const int kind) {
    const unsigned ep = LOAD(&a16_epoch, RLX);
    for (int i = 0; i < 2; i++) {
        const a16_slot_t *sl = &a16_slots[i];
        if (sl->wb && sl->pk == pk && sl->K == K && sl->kind == kind && sl->epoch == ep) return sl->wb;
    }
    a16_slot_t *sl = &a16_slots[a16_turn];
    a16_turn ^= 1;
    const size_t need = (size_t)(K / 32) * 16 * sizeof(__m256i);
    if (sl->cap < need) {
        if (!sl->wb) { (void)pthread_once(&a16_once, a16_key_make); (void)pthread_setspecific(a16_key, a16_slots); }
        free(sl->wb);
        sl->wb = aligned_alloc(64, (need + 63) & ~(size_t)63);
        sl->cap = sl->wb ? need : 0;
        if (!sl->wb) return NULL;
    }
    const size_t bb = pk_size(kind, 8), gb = (size_t)(K / 32) * bb;
    for (int b = 0; b < K / 32; b++) AVX2_SFX(a16_widen)(pk + (size_t)b * bb, kind, sl->wb + 16 * (size_t)b);
    /* the group after this one (this thread's next, mostly) on its way to L2 while this one's
     * tiles run: else its widening waits on memory (a prefetch past the weights' end is harmless) */
    for (size_t o = 0; o < gb; o += 64) _mm_prefetch((const char *)pk + gb + o, _MM_HINT_T1);
    sl->pk = pk; sl->K = K; sl->kind = kind; sl->epoch = ep;
    return sl->wb;
}
#endif

/* one row (decode) of each kind and level count, a function of its own (its registers its own) */
#define ROW_FN(KK) \
    AVX2_T __attribute__((noinline)) static void AVX2_SFX(row_##KK)(const uint8_t *pk, int K, const int8_t *q, \
                                                                  const float *dx, const float *sx, float *out, int hi) { \
        if (hi) AVX2_SFX(row_body)(pk, K, q, dx, sx, out, 1, KK); else AVX2_SFX(row_body)(pk, K, q, dx, sx, out, 0, KK); }
ROW_FN(PK_Q4)
ROW_FN(PK_Q4S)
ROW_FN(PK_Q8)
ROW_FN(PK_Q4K)
ROW_FN(PK_Q5K)
ROW_FN(PK_Q5)
ROW_FN(PK_Q6K)
#undef ROW_FN

/* the tile_fn of this variant: the body for each kind and level count */
AVX2_T static void AVX2_SFX(packed_tile)(const uint8_t *pk, int K, const int8_t *q, const float *dx, const float *sx,
                                         int R, float *out, int hi, int kind) {
#if !AVX2_VNNI
    if (hi == 2) {  /* an int16 tile (TM_A16) */
        /* (one row, e.g. the head's last: each block widened as it comes, nothing kept) */
#define BODY16(KK) AVX2_SFX(a16_body)(pk, K, q, dx, sx, R, out, KK, R > 1 ? AVX2_SFX(a16_group)(pk, K, KK) : NULL)
        switch (kind) {
        case PK_Q4: BODY16(PK_Q4); return;
        case PK_Q4S: BODY16(PK_Q4S); return;
        case PK_Q8: BODY16(PK_Q8); return;
        case PK_Q4K: BODY16(PK_Q4K); return;
        case PK_Q5K: BODY16(PK_Q5K); return;
        case PK_Q5: BODY16(PK_Q5); return;
        default: BODY16(PK_Q6K); return;
        }
#undef BODY16
    }
#endif
    if (R == 1) {
        switch (kind) {
        case PK_Q4: AVX2_SFX(row_PK_Q4)(pk, K, q, dx, sx, out, hi); return;
        case PK_Q4S: AVX2_SFX(row_PK_Q4S)(pk, K, q, dx, sx, out, hi); return;
        case PK_Q8: AVX2_SFX(row_PK_Q8)(pk, K, q, dx, sx, out, hi); return;
        case PK_Q4K: AVX2_SFX(row_PK_Q4K)(pk, K, q, dx, sx, out, hi); return;
        case PK_Q5K: AVX2_SFX(row_PK_Q5K)(pk, K, q, dx, sx, out, hi); return;
        case PK_Q5: AVX2_SFX(row_PK_Q5)(pk, K, q, dx, sx, out, hi); return;
        default: AVX2_SFX(row_PK_Q6K)(pk, K, q, dx, sx, out, hi); return;
        }
    }
#define BODY(KK) do { if (hi) AVX2_SFX(packed_body)(pk, K, q, dx, sx, R, out, 1, KK); \
                      else AVX2_SFX(packed_body)(pk, K, q, dx, sx, R, out, 0, KK); } while (0)
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
