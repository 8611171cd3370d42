/* A test driver for the C kernels without Python: built with ggml_cpu.c (included) for this
 * machine and, cross-compiled, for ARM64 under qemu (tests/test_kernels_arm64.py). It makes its
 * own inputs (a fixed xorshift stream: random blocks of every type with finite scales, random
 * activations, a tiny random LLaMA), runs them on every kernel path this CPU has, and writes the
 * results as records to stdout: u32 name length, the name, u32 count, count float32 (or the raw
 * bytes of int8 data, as floats of their values). The test compares the records of two builds.
 *
 * Records: "cpu" the path names; "quant.<hi>" the activation quantization (q, q2, d, s);
 * "raw.<type>.<path>.<M>.<hi>" hl_matmul on the raw blocks; "pk.<type>.<path>.<M>.<hi>"
 * hl_matmul_packed on the path's pack; "glu.<type>.<path>.<hi>" the gated pair;
 * "net.<type>.<path>.<threads>" a tiny network's prefill logits (all positions), then
 * "dec.<type>.<path>" one decode step after it.
 */
#include "ggml_cpu.c"
#include <stdio.h>

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
    uint64_t x = rng_state;
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    rng_state = x;
    return (uint32_t)(x >> 32);
}
/* every input is one rounding of an integer (the build reassociates float sums: -fassociative-math) */
static float urand(int lo, int hi, float scale) { return (float)(lo + (int)(rnd() % (uint32_t)(hi - lo))) * scale; }
static float nrand(void) {  /* ~N(0, 1): a sum of four uniform integers, centred, scaled once */
    int s = 0;
    for (int i = 0; i < 4; i++) s += (int)(rnd() >> 20);
    return (float)(s - 8190) * (1.0f / 1182.0f);
}

static void emit(const char *name, const float *v, int n) {
    uint32_t l = (uint32_t)strlen(name), c = (uint32_t)n;
    fwrite(&l, 4, 1, stdout); fwrite(name, 1, l, stdout); fwrite(&c, 4, 1, stdout); fwrite(v, 4, (size_t)n, stdout);
}
static void emit_i8(const char *name, const int8_t *v, int n) {
    float *f = malloc(sizeof(float) * (size_t)n);
    for (int i = 0; i < n; i++) f[i] = v[i];
    emit(name, f, n); free(f);
}

static const char *PATH_NAMES[P_COUNT] = {"scalar", "avx2", "avx512", "avxvnni", "neon", "i8mm"};
static const int TYPES[] = {T_Q4_0, T_Q4_1, T_Q8_0, T_Q5_0, T_Q5_1, T_Q4_K, T_Q5_K, T_Q6_K, T_F16, T_F32};
static const char *TYPE_NAMES[] = {"Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "F16", "F32"};
#define NTYPES 10

/* a half with about this value (f2h: round to nearest even) */
static void put_f16(uint8_t *p, float f) { uint16_t h = f2h(f); memcpy(p, &h, 2); }

/* N rows of K values of type t: random bytes, the f16 scales set to small finite values */
static uint8_t *random_rows(int t, int N, int K, int64_t *rb) {
    const int qk = type_qk(t), bs = type_block_bytes(t), nb = K / qk;
    *rb = (int64_t)nb * bs;
    uint8_t *w = malloc((size_t)N * *rb);
    for (size_t i = 0; i < (size_t)N * *rb; i++) w[i] = (uint8_t)rnd();
    for (int n = 0; n < N; n++)
        for (int b = 0; b < nb; b++) {
            uint8_t *p = w + (size_t)n * *rb + (size_t)b * bs;
            if (t == T_F32) { float f = urand(-1000, 1000, 1e-4f); memcpy(p, &f, 4); continue; }
            if (t == T_F16) { put_f16(p, urand(-1000, 1000, 1e-4f)); continue; }
            if (t == T_Q6_K) { put_f16(p + 208, urand(100, 300, 1e-5f)); continue; }
            put_f16(p, t == T_Q8_0 ? urand(200, 600, 1e-5f) : t == T_Q4_K || t == T_Q5_K ? urand(100, 300, 1e-5f)
                                                                   : urand(500, 1500, 1e-5f));
            if (t == T_Q4_1 || t == T_Q5_1) put_f16(p + 2, urand(-8000, 0, 1e-5f));
            if (t == T_Q4_K || t == T_Q5_K) put_f16(p + 2, urand(0, 200, 1e-5f));
        }
    return w;
}

static void matmuls(void) {
    const int K = 512, N = 40, Ms[3] = {1, 7, 37};
    float *x = malloc(sizeof(float) * 37 * K), *y = malloc(sizeof(float) * 37 * N), *y2 = malloc(sizeof(float) * 37 * N);
    char name[128];
    for (int ti = 0; ti < NTYPES; ti++) {
        const int t = TYPES[ti];
        int64_t rb;
        uint8_t *w = random_rows(t, N, K, &rb), *w2 = random_rows(t, N, K, &rb);
        for (int i = 0; i < 37 * K; i++) x[i] = nrand();
        for (int p = 0; p < P_COUNT; p++) {
            if (!hl_path_ok(p)) continue;
            for (int mi = 0; mi < 3; mi++)
                for (int hi = 0; hi < 2; hi++) {
                    if (hl_matmul(x, Ms[mi], K, w, rb, t, N, y, 2, p, hi)) { fprintf(stderr, "hl_matmul failed\n"); exit(1); }
                    snprintf(name, sizeof name, "raw.%s.%s.%d.%d", TYPE_NAMES[ti], PATH_NAMES[p], Ms[mi], hi);
                    emit(name, y, Ms[mi] * N);
                }
            const int G = hl_pack_rows(p), kind = hl_pack_kind(t);
            if (!G || kind < 0) continue;
            const int64_t bytes = hl_packed_bytes(t, N, K, G);
            uint8_t *pk = malloc((size_t)bytes), *pk2 = malloc((size_t)bytes);
            if (hl_repack(t, w, rb, N, K, pk, G) || hl_repack(t, w2, rb, N, K, pk2, G)) {
                fprintf(stderr, "hl_repack failed\n"); exit(1);
            }
            for (int mi = 0; mi < 3; mi++)
                for (int hi = 0; hi < 2; hi++) {
                    if (hl_matmul_packed(x, Ms[mi], K, pk, N, y, 2, hi, kind, p)) { fprintf(stderr, "packed failed\n"); exit(1); }
                    snprintf(name, sizeof name, "pk.%s.%s.%d.%d", TYPE_NAMES[ti], PATH_NAMES[p], Ms[mi], hi);
                    emit(name, y, Ms[mi] * N);
                }
            for (int hi = 0; hi < 2; hi++) {
                const uint8_t *pks[2] = {pk, pk2};
                const int Ns[2] = {N, N}, kinds[2] = {kind, kind};
                float *ys[2] = {y, y2};
                if (hl_matmul_packed_multi(x, 37, K, 2, pks, Ns, ys, 2, hi, 1, kinds, p)) { fprintf(stderr, "glu failed\n"); exit(1); }
                snprintf(name, sizeof name, "glu.%s.%s.%d", TYPE_NAMES[ti], PATH_NAMES[p], hi);
                emit(name, y, 37 * N);
            }
            free(pk); free(pk2);
        }
        free(w); free(w2);
    }
    free(x); free(y); free(y2);
}

static void quantization(void) {
    const int M = 5, K = 512;
    float *x = malloc(sizeof(float) * M * K), d[5 * 16], s[5 * 16];
    int8_t *q = malloc((size_t)M * K), *q2 = malloc((size_t)M * K);
    for (int i = 0; i < M * K; i++) x[i] = i % 97 == 0 ? urand(-40000, 40000, 1e-3f) : nrand();
    for (int i = 0; i < 32; i++) x[K + i] = 0.f;  /* a block of zeros */
    for (int hi = 0; hi < 2; hi++) {
        char name[32];
        hl_quantize_rows(x, M, K, q, d, s, hi ? q2 : NULL);
        snprintf(name, sizeof name, "quant.%d.q", hi); emit_i8(name, q, M * K);
        if (hi) { snprintf(name, sizeof name, "quant.%d.q2", hi); emit_i8(name, q2, M * K); }
        snprintf(name, sizeof name, "quant.%d.d", hi); emit(name, d, M * K / 32);
        snprintf(name, sizeof name, "quant.%d.s", hi); emit(name, s, M * K / 32);
    }
    free(x); free(q); free(q2);
}

/* a tiny LLaMA (2 layers, hidden 256, 4 heads of 64, 2 kv heads, MLP 512, vocab 300) with every
 * matrix of type t (packed for path p where it has packs), f32 cache */
static void network(int ti) {
    const int t = TYPES[ti], L = 2, H = 256, nh = 4, nkv = 2, hd = 64, F = 512, V = 300, S = 48, T = 20;
    float inv_freq[32];
    for (int i = 0; i < hd / 2; i++) inv_freq[i] = 1.0f / (1.0f + 3.0f * (float)i);
    const int Ns[7] = {nh * hd, nkv * hd, nkv * hd, H, F, F, H}, Ks[7] = {H, H, H, nh * hd, H, H, F};
    uint8_t *mats[2][7], *emb, *head;
    int64_t rbs[2][7], rbe, rbh;
    float *vecs[2][2], *norm = malloc(sizeof(float) * H);
    for (int l = 0; l < L; l++) {
        for (int j = 0; j < 7; j++) mats[l][j] = random_rows(t, Ns[j], Ks[j], &rbs[l][j]);
        for (int j = 0; j < 2; j++) {
            vecs[l][j] = malloc(sizeof(float) * H);
            for (int i = 0; i < H; i++) vecs[l][j][i] = urand(800, 1200, 1e-3f);
        }
    }
    for (int i = 0; i < H; i++) norm[i] = urand(800, 1200, 1e-3f);
    emb = random_rows(t, V, H, &rbe); head = random_rows(t, V, H, &rbh);
    int tokens[20];
    for (int i = 0; i < T; i++) tokens[i] = (int)(rnd() % V);
    float *kv = malloc(sizeof(float) * 2 * L * nkv * S * hd), *logits = malloc(sizeof(float) * T * V);
    char name[64];
    for (int p = 0; p < P_COUNT; p++) {
        if (!hl_path_ok(p)) continue;
        const int G = hl_pack_rows(p), kind = hl_pack_kind(t);
        uint8_t *packs[2][7] = {{0}}, *pe = NULL, *ph = NULL;
        for (int threads = 1; threads <= 2; threads++) {
            void *c = hl_model_new(L, H, nh, nkv, hd, F, V, 1e-5f, inv_freq);
            for (int l = 0; l < L; l++) {
                for (int j = 0; j < 7; j++) {
                    hl_model_set_mat(c, l, j, t, Ns[j], Ks[j], mats[l][j], rbs[l][j]);
                    if (G && kind >= 0) {
                        if (!packs[l][j]) {
                            packs[l][j] = malloc((size_t)hl_packed_bytes(t, Ns[j], Ks[j], G));
                            hl_repack(t, mats[l][j], rbs[l][j], Ns[j], Ks[j], packs[l][j], G);
                        }
                        hl_model_set_packed(c, l, j, packs[l][j], G);
                    }
                }
                hl_model_set_vec(c, l, V_LN1, vecs[l][0]);
                hl_model_set_vec(c, l, V_LN2, vecs[l][1]);
                hl_model_set_kv(c, l, kv + (size_t)(2 * l) * nkv * S * hd, kv + (size_t)(2 * l + 1) * nkv * S * hd, S, 0);
            }
            hl_model_set_mat(c, 0, -1, t, V, H, emb, rbe);
            hl_model_set_mat(c, 0, -2, t, V, H, head, rbh);
            if (G && kind >= 0) {
                if (!pe) {
                    pe = malloc((size_t)hl_packed_bytes(t, V, H, G)); ph = malloc((size_t)hl_packed_bytes(t, V, H, G));
                    hl_repack(t, emb, rbe, V, H, pe, G); hl_repack(t, head, rbh, V, H, ph, G);
                }
                hl_model_set_packed(c, 0, -1, pe, G); hl_model_set_packed(c, 0, -2, ph, G);
            }
            hl_model_set_vec(c, -1, 0, norm);
            if (hl_model_set_threads(c, threads, p, 1)) { fprintf(stderr, "set_threads failed\n"); exit(1); }
            if (hl_forward(c, tokens, T, 0, logits, 1)) { fprintf(stderr, "hl_forward failed\n"); exit(1); }
            snprintf(name, sizeof name, "net.%s.%s.%d", TYPE_NAMES[ti], PATH_NAMES[p], threads);
            emit(name, logits, T * V);
            if (threads == 2) {
                if (hl_decode(c, tokens[3], T, logits)) { fprintf(stderr, "hl_decode failed\n"); exit(1); }
                snprintf(name, sizeof name, "dec.%s.%s", TYPE_NAMES[ti], PATH_NAMES[p]);
                emit(name, logits, V);
            }
            hl_model_free(c);
        }
        for (int l = 0; l < L; l++) for (int j = 0; j < 7; j++) free(packs[l][j]);
        free(pe); free(ph);
    }
    for (int l = 0; l < L; l++) {
        for (int j = 0; j < 7; j++) free(mats[l][j]);
        free(vecs[l][0]); free(vecs[l][1]);
    }
    free(emb); free(head); free(norm); free(kv); free(logits);
}

int main(int argc, char **argv) {
    const int net = argc < 2 || strcmp(argv[1], "--no-net") != 0;
    float paths[P_COUNT];
    for (int p = 0; p < P_COUNT; p++) paths[p] = (float)hl_path_ok(p);
    emit("cpu", paths, P_COUNT);
    quantization();
    matmuls();
    if (net)
        for (int ti = 0; ti < NTYPES; ti++) network(ti);
    return 0;
}
