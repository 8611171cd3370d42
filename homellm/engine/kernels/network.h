/* homellm's C runtime: the whole LLaMA network over a batch of rows (included once, by ggml_cpu.c,
 * after the kernels it calls), and its relatives as small options of the one network
 * (model/config.py has the table; hl_model_set_arch): LayerNorm with biases (StableLM, GPT-NeoX),
 * RMSNorm of each head's q and k (Qwen3, Gemma 3), partial rotary (RoPE on the first n_rot
 * values of each head), sliding-window layers with their own RoPE frequencies (Mistral, Gemma 3),
 * GeGLU / GELU MLPs with or without a gate and with biases, Gemma's norms of the attention and
 * MLP outputs, GPT-NeoX's parallel residual (x + attn(n1(x)) + mlp(n2(x))), an embedding scale,
 * the attention scale (query_pre_attn_scalar) and LongRoPE's cos/sin factor. RMSNorm weights
 * come as the multipliers themselves (Gemma's 1 + w added by the caller).
 *
 * One entry point, in the spirit of llama.cpp's llama_decode over a llama_batch: hl_batch takes
 * n rows, row i being token tokens[i] of the sequence in KV-cache slot slot[i] at position pos[i],
 * with its own LoRA adapter (or none). Consecutive rows of one slot at consecutive positions form
 * a chunk: a prompt chunk of a new request and single decode rows of running ones go through the
 * network together. Every projection is one matmul over all rows (weights read once for the
 * batch), attention runs per chunk on its slot's keys and values, and each row's adapter adds its
 * low-rank product x A^T B^T (scaled) to that row's projection outputs only. Past the last
 * layer's attention only the rows that give an output go on (the tail: a prompt's last row; as
 * llama.cpp selects its output rows there); the other rows end with their keys and values.
 * The call's buffers stay in the model from call to call (batch_buffers).
 *
 * Row independence, which everything above the runtime relies on: every step computes a row's
 * values from that row alone (matmul kernels keep one accumulator per row and block order; the
 * activation quantization, norms, RoPE, SiLU and the LoRA products are per row; attention per
 * (query, head) row, see attn_t), so a row gives the same bits whatever else is in the batch, in
 * whichever chunk of its sequence it comes, and on any number of threads. hl_forward and
 * hl_decode (one sequence, the model's own cache) are this same call.
 *
 * The call is one job of the thread pool: per layer, matmul phases (groups of 8 or 16 weight rows,
 * all rows of an M chunk each) alternate with row phases (norms, RoPE, cache writes, activation
 * quantization: parallel over rows, or for a few rows the serial close of the phase, as a decode
 * step needs no more), and an attention phase of (chunk, query tile, kv head) items.
 */

/* ---- the model --------------------------------------------------------------------------- */

/* pk: the weights packed pg rows a group (hl_repack), or NULL */
typedef struct { int type, N, K; const uint8_t *w; int64_t rb; const uint8_t *pk; int pg; } mat_t;

enum { M_Q, M_K, M_V, M_O, M_GATE, M_UP, M_DOWN, M_COUNT };
/* a layer's vectors: attention input norm (and its LayerNorm bias), MLP input norm (and bias),
 * q/k/v biases, per-head q/k norms, o/gate/up/down biases, the norms of the attention and MLP
 * outputs (Gemma's sandwich norms); NULL where the network has none */
enum { V_LN1, V_LN2, V_BQ, V_BK, V_BV, V_LN1B, V_LN2B, V_QN, V_KN, V_BO, V_BG, V_BU, V_BD, V_ATT_OUT,
       V_MLP_OUT, V_COUNT };

typedef struct {
    mat_t m[M_COUNT];
    const float *v[V_COUNT];
} layer_t;

/* a KV cache: per layer (slots, n_kv, S, head_dim) values, f32 or IEEE f16 (kv16) alike in every
 * layer, in memory its owner (Python: numpy arrays) keeps alive */
typedef struct { int L, slots, S, kv16; void **k, **v; } kv_t;

/* a LoRA adapter: per layer and matrix (L x M_COUNT), r = 0 where it adapts nothing, else
 * A (r, K) and B (N, r) float32 and the scale (alpha / r): y += scale (x A^T) B^T */
typedef struct { int r; float scale; const float *A, *B; } lora_mat_t;
typedef struct { int L; lora_mat_t *m; } lora_t;

typedef struct {
    int L, H, nh, nkv, hd, F, V, nthreads, path, hi;
    float eps;
    float *inv_freq;        /* (n_rot / 2) */
    layer_t *layers;
    mat_t emb, head;
    const float *norm, *norm_b;  /* the final norm (LayerNorm: and its bias) */
    kv_t own;  /* the cache of hl_forward / hl_decode: one slot */
    /* the relatives' options (hl_model_set_arch); LLaMA: 0, 0, 0, 0, 1, ACT_SILU, hd, 1, hd^-1/2,
     * 1, 0, no swa layers */
    int norm_layer, qk_norm, sandwich, parallel, gated, act, n_rot, window;
    float embed_scale, attn_scale, rope_factor;
    float *inv_freq_local;  /* (n_rot / 2) the sliding layers' own, or NULL: inv_freq */
    int *swa;               /* per layer: 1 = sliding-window attention */
    /* the buffers of hl_batch, kept from call to call (batch_buffers): the largest call's bytes,
     * taken by one call at a time (ws_busy) */
    char *ws;
    size_t ws_cap;
    int ws_busy;
} model_t;

void *hl_model_new(int L, int H, int nh, int nkv, int hd, int F, int V, float eps, const float *inv_freq) {
    model_t *c = calloc(1, sizeof(model_t));
    if (!c) return NULL;
    c->L = L; c->H = H; c->nh = nh; c->nkv = nkv; c->hd = hd; c->F = F; c->V = V; c->eps = eps;
    c->nthreads = pool_cpus(); c->path = hl_best_path(); c->hi = 1;
    c->gated = 1; c->act = ACT_SILU; c->n_rot = hd; c->embed_scale = 1.f; c->attn_scale = 1.0f / sqrtf((float)hd);
    c->rope_factor = 1.f;
    c->inv_freq = malloc(sizeof(float) * (hd / 2 > 0 ? hd / 2 : 1));
    c->layers = calloc(L > 0 ? L : 1, sizeof(layer_t));
    c->swa = calloc(L > 0 ? L : 1, sizeof(int));
    c->own = (kv_t){L, 1, 0, 0, calloc(L > 0 ? L : 1, sizeof(void *)), calloc(L > 0 ? L : 1, sizeof(void *))};
    if (!c->inv_freq || !c->layers || !c->swa || !c->own.k || !c->own.v) {
        free(c->inv_freq); free(c->layers); free(c->swa); free(c->own.k); free(c->own.v); free(c);
        return NULL;
    }
    memcpy(c->inv_freq, inv_freq, sizeof(float) * hd / 2);
    return c;
}

void hl_model_free(void *p) {
    model_t *c = p;
    if (!c) return;
    free(c->inv_freq); free(c->inv_freq_local); free(c->layers); free(c->swa); free(c->own.k); free(c->own.v);
    free(c->ws); free(c);
}

/* the relatives' options (see the top of this file): norm_layer (LayerNorm with biases), qk_norm,
 * sandwich (norms of the attention and MLP outputs), parallel (residual), gated (MLP), act
 * (ACT_*), n_rot (even, <= hd) with inv_freq (n_rot / 2) and inv_freq_local (n_rot / 2, or NULL),
 * embed_scale, attn_scale, rope_factor (cos and sin multiplied), window (0: none) and swa (L
 * flags: the layers it applies to; NULL: every layer when window > 0). -1 for bad values. */
int hl_model_set_arch(void *p, int norm_layer, int qk_norm, int sandwich, int parallel, int gated, int act,
                      int n_rot, const float *inv_freq, const float *inv_freq_local, float embed_scale,
                      float attn_scale, float rope_factor, int window, const int *swa) {
    model_t *c = p;
    if (n_rot < 2 || n_rot > c->hd || n_rot % 2 || act < ACT_SILU || act > ACT_GELU || window < 0) return -1;
    float *f = malloc(sizeof(float) * n_rot / 2), *fl = inv_freq_local ? malloc(sizeof(float) * n_rot / 2) : NULL;
    if (!f || (inv_freq_local && !fl)) { free(f); free(fl); return -3; }
    memcpy(f, inv_freq, sizeof(float) * n_rot / 2);
    if (fl) memcpy(fl, inv_freq_local, sizeof(float) * n_rot / 2);
    free(c->inv_freq); free(c->inv_freq_local);
    c->inv_freq = f; c->inv_freq_local = fl;
    c->norm_layer = norm_layer; c->qk_norm = qk_norm; c->sandwich = sandwich; c->parallel = parallel;
    c->gated = gated; c->act = act; c->n_rot = n_rot; c->embed_scale = embed_scale; c->attn_scale = attn_scale;
    c->rope_factor = rope_factor; c->window = window;
    for (int l = 0; l < c->L; l++) c->swa[l] = window > 0 && (!swa || swa[l]);
    return 0;
}

/* which: 0..6 a layer's q,k,v,o,gate,up,down; -1 token embedding; -2 lm_head */
int hl_model_set_mat(void *p, int layer, int which, int type, int N, int K, const uint8_t *w, int64_t rb) {
    model_t *c = p;
    if (!type_block_bytes(type) || K % type_qk(type)) return -1;
    mat_t m = {type, N, K, w, rb, NULL, 0};
    if (which == -1) c->emb = m;
    else if (which == -2) c->head = m;
    else c->layers[layer].m[which] = m;
    return 0;
}

/* a matrix's weights packed by hl_repack G rows a group (used by the paths whose hl_pack_rows is
 * G; the others compute on the raw blocks); NULL: raw blocks only; which as for hl_model_set_mat
 * (-1 the embedding table: its rows then come from the pack, -2 the head) */
int hl_model_set_packed(void *p, int layer, int which, const uint8_t *pk, int G) {
    model_t *c = p;
    mat_t *m = which == -1 ? &c->emb : which == -2 ? &c->head : &c->layers[layer].m[which];
    if (pk && (hl_pack_kind(m->type) < 0 || !good_g(G))) return -1;
    m->pk = pk; m->pg = pk ? G : 0;
    return 0;
}

/* which: a layer's V_* vector; layer -1: the final norm (which 0) and its LayerNorm bias (1) */
void hl_model_set_vec(void *p, int layer, int which, const float *v) {
    model_t *c = p;
    if (layer < 0) { if (which == 1) c->norm_b = v; else c->norm = v; }
    else c->layers[layer].v[which] = v;
}

/* the model's own cache (hl_forward, hl_decode): a layer's (n_kv, S, head_dim) f32, or f16 with
 * kv16 = 1 (every layer the same kind) */
void hl_model_set_kv(void *p, int layer, void *k, void *v, int S, int kv16) {
    model_t *c = p;
    c->own.k[layer] = k; c->own.v[layer] = v; c->own.S = S; c->own.kv16 = kv16;
}

int hl_model_set_threads(void *p, int nthreads, int path, int hi) {
    model_t *c = p;
    c->hi = hi;
    if (path < 0) path = hl_best_path();
    if (!path_ok(path)) return -2;
    c->nthreads = nthreads > 0 ? nthreads : pool_cpus(); c->path = path;
    if (path_width(path) < LOAD(&quant_width, RLX)) STORE(&quant_width, path_width(path), RLX);
    return 0;
}

/* ---- KV caches and adapters ---------------------------------------------------------------- */

void *hl_kv_new(int L, int slots, int S, int kv16) {
    kv_t *kv = calloc(1, sizeof(kv_t));
    if (!kv) return NULL;
    *kv = (kv_t){L, slots, S, kv16, calloc(L > 0 ? L : 1, sizeof(void *)), calloc(L > 0 ? L : 1, sizeof(void *))};
    if (!kv->k || !kv->v) { free(kv->k); free(kv->v); free(kv); return NULL; }
    return kv;
}

/* layer's keys and values: (slots, n_kv, S, head_dim) each */
void hl_kv_set(void *p, int layer, void *k, void *v) {
    kv_t *kv = p;
    kv->k[layer] = k; kv->v[layer] = v;
}

void hl_kv_free(void *p) {
    kv_t *kv = p;
    if (kv) { free(kv->k); free(kv->v); free(kv); }
}

void *hl_lora_new(int L) {
    lora_t *lo = calloc(1, sizeof(lora_t));
    if (!lo) return NULL;
    lo->L = L;
    lo->m = calloc((size_t)(L > 0 ? L : 1) * M_COUNT, sizeof(lora_mat_t));
    if (!lo->m) { free(lo); return NULL; }
    return lo;
}

/* matrix `which` (0..6) of `layer`: A (r, K), B (N, r) float32, kept by the caller */
int hl_lora_set(void *p, int layer, int which, int r, float scale, const float *A, const float *B) {
    lora_t *lo = p;
    if (layer < 0 || layer >= lo->L || which < 0 || which >= M_COUNT || r < 0) return -1;
    lo->m[layer * M_COUNT + which] = (lora_mat_t){r, scale, A, B};
    return 0;
}

void hl_lora_free(void *p) {
    lora_t *lo = p;
    if (lo) { free(lo->m); free(lo); }
}

/* ---- row steps ----------------------------------------------------------------------------- */

/* (the row steps' loops are INLINE: row_step compiles them once for each x86 path's vectors, see
 * row_step) */
INLINE void rmsnorm(const float *x, const float *w, int n, float eps, float *out) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

/* LayerNorm: (x - mean) / sqrt(var + eps) * w + b (out may be x) */
INLINE void layernorm(const float *x, const float *w, const float *b, int n, float eps, float *out) {
    float mean = 0.f, var = 0.f;
    for (int i = 0; i < n; i++) mean += x[i];
    mean /= (float)n;
    for (int i = 0; i < n; i++) { const float d = x[i] - mean; var += d * d; }
    const float r = 1.0f / sqrtf(var / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = (x[i] - mean) * r * w[i] + (b ? b[i] : 0.f);
}

/* the network's norm of a row: RMSNorm, or LayerNorm with its bias */
INLINE void norm_row(const model_t *c, const float *x, const float *w, const float *b, int n, float *out) {
    if (c->norm_layer) layernorm(x, w, b, n, c->eps, out);
    else rmsnorm(x, w, n, c->eps, out);
}

INLINE void add_vec(float *y, const float *b, int n) { if (b) for (int i = 0; i < n; i++) y[i] += b[i]; }

/* the embedding of token into x (H floats), from the packed table where there is one */
static void embed_row(const model_t *c, int token, float *x) {
    if (c->emb.pk && c->emb.pg == hl_pack_rows(c->path))
        pk_dequant_row(hl_pack_kind(c->emb.type), c->emb.pk, c->H, token, c->emb.pg, x);
    else dequant_row(c->emb.type, c->emb.w + (size_t)token * c->emb.rb, c->H, x);
}

/* y += scale (x A^T) B^T for one row: x (K), y (N); the float order is the row's own */
static void lora_row(const lora_mat_t *l, const float *x, int K, float *y, int N) {
    float t[512];
    const int r = l->r < 512 ? l->r : 512;
    for (int i = 0; i < r; i++) t[i] = fdot(l->A + (size_t)i * K, x, K) * l->scale;
    for (int n = 0; n < N; n++) y[n] += fdot(l->B + (size_t)n * l->r, t, r);
}

/* ---- the batch ------------------------------------------------------------------------------ */

#define MM_ROWS MCHUNK  /* activation rows per matmul phase (their quantized tiles stay in L2) */
#define SERIAL_ROWS 8   /* fewer rows than this: a row step runs in its phase's close, on one thread */

enum { OP_EMBED, OP_MM_QKV, OP_ROW_QKV, OP_ATT_S, OP_ATT, OP_ROW_ATT, OP_MM_O, OP_ROW_O, OP_MM_GU, OP_ROW_GU,
       OP_MM_DOWN, OP_ROW_DOWN, OP_MM_HEAD };

typedef struct { int op, layer, m0, m1; } phase_t;  /* m0, m1: a matmul phase's activation rows */

typedef struct {
    model_t *c; const kv_t *kv; kern_fn kern;
    int M, nout, natt, natt_tail, nph, hi, L2, Kmax, tm;  /* tm: the tiles' mode (TM_*) */
    const int *tok, *pos, *slot;
    const lora_t *const *lora;      /* per row, or NULL */
    const int *outj;                /* per row: its output row, or -1 */
    /* the last layer past its attention computes the output rows alone (tail: fewer outputs
     * than rows), output row j in place j: its row outm[j], its residual and attention output
     * copied to xc and attc (row j) */
    int tail; const int *outm; float *xc, *attc;
    float *logits, *hidden;
    int *att_run, *att_qt;          /* attention items: chunk, query tile (kv head: item % nkv); from
                                     * natt on the tail's (the tiles with an output row): natt_tail */
    int *run0, *runn;               /* chunk i: rows run0[i] .. run0[i] + runn[i] - 1 */
    float *sc; size_t scs;          /* one decode row's scores, attention in two phases (attn_split_tiles) */
    float *rope; const float **rope_of;  /* per row: cos, sin (n_rot / 2 each) of its position for rope_of[m] */
    phase_t *ph;
    /* (M, .) float rows: residual, normed input, q, k, v, attention output, MLP hidden, matmul
     * outputs (o, down; up when gate/up are not fused); xo (nout, H): the final-norm rows */
    float *x, *xn, *q, *k, *v, *att, *hb, *y, *u, *xo, *ya;  /* ya: attention outputs (parallel) */
    /* quantized activations: row-major (raw kernels) and in tiles (packed kernels) */
    int8_t *aq, *aq2; float *ad, *as;
    int8_t *tq; float *td, *ts;
    int fail;
} batch_t;

/* computed on its pack: one made for this path's kernels */
static int is_packed(const batch_t *b, const mat_t *m) { return m->pk && m->pg == hl_pack_rows(b->c->path); }

/* the activations of a stage's matrices (consumers), row m of K values at src: tiles for packed
 * matrices, rows for raw quantized ones (float weights read src itself) */
static void quantize_for(const batch_t *b, const mat_t *const *ms, int nm, const float *src, int K, int m) {
    int tile = 0, row = 0;
    for (int i = 0; i < nm; i++) {
        if (is_packed(b, ms[i])) tile = 1;
        else if (is_quant(ms[i]->type)) row = 1;
    }
    if (tile && b->M == 1 && row1_kernel(b->c->path)) {  /* one row in all: compact (packed_group) */
        quantize_row1(src, K, b->L2, b->tq, b->td, b->ts);
    } else if (tile) {
        const int nb = K / 32, L2 = b->L2;
        quantize_tile_row(src, K, b->tm, b->tq + (size_t)(m / TILE) * TILE * K * L2,
                          b->td + (size_t)(m / TILE) * TILE * nb, b->ts + (size_t)(m / TILE) * TILE * ACT_SUMS * nb,
                          m % TILE);
    }
    if (row)
        quantize_row(src, K, b->aq + (size_t)m * K, b->ad + (size_t)m * K / 4, b->as + (size_t)m * K / 4,
                     b->hi ? b->aq2 + (size_t)m * K : NULL);
}

static const lora_mat_t *lora_of(const batch_t *b, int m, int l, int which) {
    if (!b->lora || !b->lora[m]) return NULL;
    const lora_mat_t *lm = &b->lora[m]->m[l * M_COUNT + which];
    return lm->r > 0 ? lm : NULL;
}

/* gate/up in one packed call with the SiLU (or tanh-GELU) product in its epilogue: both packed,
 * no biases, and no row of this batch adapts either (an adapter adds to gate and up before it) */
static int glu_fused(const batch_t *b, int l) {
    const layer_t *ly = &b->c->layers[l];
    if (!b->c->gated || b->c->act == ACT_GELU || ly->v[V_BG] || ly->v[V_BU]) return 0;
    if (!is_packed(b, &ly->m[M_GATE]) || !is_packed(b, &ly->m[M_UP])) return 0;
    for (int m = 0; b->lora && m < b->M; m++)
        if (lora_of(b, m, l, M_GATE) || lora_of(b, m, l, M_UP)) return 0;
    return 1;
}

/* a row step of the last layer past its attention, on the output rows alone (see tail) */
static int is_tail(const batch_t *b, int op, int l) {
    return b->tail && l == b->c->L - 1 && (op == OP_ROW_ATT || op == OP_ROW_O || op == OP_ROW_GU || op == OP_ROW_DOWN);
}

/* the next layer's input norm (or the final norm and the head's activations) for row m (tail:
 * output row m, its residual in xc) */
INLINE void row_layer_input(batch_t *b, int l, int m, int tail) {
    model_t *c = b->c;
    const int H = c->H;
    const float *x = (tail ? b->xc : b->x) + (size_t)m * H;
    if (l < c->L) {
        const layer_t *ly = &c->layers[l];
        float *xn = b->xn + (size_t)m * H;
        norm_row(c, x, ly->v[V_LN1], ly->v[V_LN1B], H, xn);
        const mat_t *ms[3] = {&ly->m[M_Q], &ly->m[M_K], &ly->m[M_V]};
        quantize_for(b, ms, 3, xn, H, m);
        return;
    }
    const int j = tail ? m : b->outj[m];
    if (j < 0) return;
    /* output row j (the rows that want one, in order: j <= m, and the quantized activations of
     * the last matmul are read already) */
    float *xo = b->xo + (size_t)j * H;
    norm_row(c, x, c->norm, c->norm_b, H, xo);
    if (b->hidden) memcpy(b->hidden + (size_t)j * H, xo, 4 * (size_t)H);
    const mat_t *ms[1] = {&c->head};
    if (b->logits) quantize_for(b, ms, 1, xo, H, j);
}

INLINE void row_step_body(batch_t *b, int op, int l, int m) {
    model_t *c = b->c;
    const int H = c->H, F = c->F, hd = c->hd, nh = c->nh, nkv = c->nkv, nq = nh * hd, nk = nkv * hd;
    const layer_t *ly = l < c->L ? &c->layers[l] : NULL;
    const lora_mat_t *lm;
    /* tail: m is an output row; mo its row in the batch (its adapter), xr its residual */
    const int tail = is_tail(b, op, l), mo = tail ? b->outm[m] : m;
    float *const xr = (tail ? b->xc : b->x) + (size_t)m * H;
    const float *const ar = tail ? b->attc + (size_t)m * nq : b->att + (size_t)m * nq;
    switch (op) {
    case OP_EMBED: {
        float *x = b->x + (size_t)m * H;
        embed_row(c, b->tok[m], x);
        if (c->embed_scale != 1.f) for (int j = 0; j < H; j++) x[j] *= c->embed_scale;
        row_layer_input(b, 0, m, 0);
        return;
    }
    case OP_ROW_QKV: {
        float *q = b->q + (size_t)m * nq, *k = b->k + (size_t)m * nk, *v = b->v + (size_t)m * nk;
        const float *xn = b->xn + (size_t)m * H;
        float *ys[3] = {q, k, v};
        const int Ns[3] = {nq, nk, nk};
        for (int i = 0; i < 3; i++) {
            const float *bias = ly->v[V_BQ + i];
            if (bias) for (int n = 0; n < Ns[i]; n++) ys[i][n] += bias[n];
            if ((lm = lora_of(b, m, l, M_Q + i))) lora_row(lm, xn, H, ys[i], Ns[i]);
        }
        if (c->qk_norm)  /* each head's q and k RMS-normed before RoPE (Qwen3, Gemma 3) */
            for (int h = 0; h < nh + nkv; h++) {
                float *t = h < nh ? q + h * hd : k + (h - nh) * hd;
                rmsnorm(t, ly->v[h < nh ? V_QN : V_KN], hd, c->eps, t);
            }
        /* RoPE, HF rotate-half layout on the first n_rot values of each head:
         * (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); the sliding layers' own frequencies */
        const int half = c->n_rot / 2, p = b->pos[m];
        const float *inv = c->swa[l] && c->inv_freq_local ? c->inv_freq_local : c->inv_freq;
        float *cs = b->rope + (size_t)m * 2 * (half > 0 ? half : 1), *sn = cs + half;
        if (b->rope_of[m] != inv) {  /* made once a row for each table (layers share them) */
            for (int i = 0; i < half; i++) {
                const float a = (float)p * inv[i];
                cs[i] = cosf(a); sn[i] = sinf(a);
                if (c->rope_factor != 1.f) { cs[i] *= c->rope_factor; sn[i] *= c->rope_factor; }
            }
            b->rope_of[m] = inv;
        }
        for (int h = 0; h < nh + nkv; h++) {
            float *t = h < nh ? q + h * hd : k + (h - nh) * hd;
            for (int i = 0; i < half; i++) {
                const float x1 = t[i], x2 = t[i + half];
                t[i] = x1 * cs[i] - x2 * sn[i];
                t[i + half] = x2 * cs[i] + x1 * sn[i];
            }
        }
        /* k, v into the slot's cache at position p: (slots, n_kv, S, hd) */
        const kv_t *kv = b->kv;
        const size_t S = kv->S, base = (size_t)b->slot[m] * nkv * S * hd;
        for (int g = 0; g < nkv; g++) {
            const size_t at = base + ((size_t)g * S + p) * hd;
            if (kv->kv16) {
                to_f16(c->path, k + g * hd, (uint16_t *)kv->k[l] + at, hd);
                to_f16(c->path, v + g * hd, (uint16_t *)kv->v[l] + at, hd);
            } else {
                memcpy((float *)kv->k[l] + at, k + g * hd, 4 * (size_t)hd);
                memcpy((float *)kv->v[l] + at, v + g * hd, 4 * (size_t)hd);
            }
        }
        return;
    }
    case OP_ROW_ATT: {
        const mat_t *ms[1] = {&ly->m[M_O]};
        if (tail) {
            memcpy(xr, b->x + (size_t)mo * H, 4 * (size_t)H);
            memcpy((float *)ar, b->att + (size_t)mo * nq, 4 * (size_t)nq);
        }
        quantize_for(b, ms, 1, ar, nq, m);
        return;
    }
    case OP_ROW_O: {
        float *x = xr, *y = b->y + (size_t)m * H, *xn = b->xn + (size_t)m * H;
        add_vec(y, ly->v[V_BO], H);
        if ((lm = lora_of(b, mo, l, M_O))) lora_row(lm, ar, nq, y, H);
        if (c->sandwich) rmsnorm(y, ly->v[V_ATT_OUT], H, c->eps, y);
        if (c->parallel) memcpy(b->ya + (size_t)m * H, y, 4 * (size_t)H);  /* added with the MLP's */
        else for (int j = 0; j < H; j++) x[j] += y[j];
        norm_row(c, x, ly->v[V_LN2], ly->v[V_LN2B], H, xn);
        const mat_t *ms[2] = {&ly->m[M_UP], &ly->m[M_GATE]};
        quantize_for(b, ms, c->gated ? 2 : 1, xn, H, m);
        return;
    }
    case OP_ROW_GU: {
        float *h = b->hb + (size_t)m * F;
        const float *xn = b->xn + (size_t)m * H;
        if (!c->gated) {  /* h holds the up's outputs: act(up(x)) (GPT-NeoX) */
            add_vec(h, ly->v[V_BU], F);
            if ((lm = lora_of(b, mo, l, M_UP))) lora_row(lm, xn, H, h, F);
            for (int j = 0; j < F; j++) h[j] = c->act == ACT_GELU ? gelu_erf(h[j]) : c->act == ACT_GELU_TANH
                                             ? gelu_tanh(h[j]) : h[j] / (1.0f + expf(-h[j]));
        } else if (!glu_fused(b, l)) {  /* h holds the gate's outputs, u the up's */
            float *u = b->u + (size_t)m * F;
            add_vec(h, ly->v[V_BG], F);
            add_vec(u, ly->v[V_BU], F);
            if ((lm = lora_of(b, mo, l, M_GATE))) lora_row(lm, xn, H, h, F);
            if ((lm = lora_of(b, mo, l, M_UP))) lora_row(lm, xn, H, u, F);
            glu_row(c->path, c->act, h, u, h, F);
        }
        const mat_t *ms[1] = {&ly->m[M_DOWN]};
        quantize_for(b, ms, 1, h, F, m);
        return;
    }
    case OP_ROW_DOWN: {
        float *x = xr, *y = b->y + (size_t)m * H;
        add_vec(y, ly->v[V_BD], H);
        if ((lm = lora_of(b, mo, l, M_DOWN))) lora_row(lm, b->hb + (size_t)m * F, F, y, H);
        if (c->sandwich) rmsnorm(y, ly->v[V_MLP_OUT], H, c->eps, y);
        if (c->parallel) {  /* GPT-NeoX: mlp + attn + x */
            const float *ya = b->ya + (size_t)m * H;
            for (int j = 0; j < H; j++) x[j] = (y[j] + ya[j]) + x[j];
        } else for (int j = 0; j < H; j++) x[j] += y[j];
        row_layer_input(b, l + 1, m, tail);
        return;
    }
    default: return;
    }
}

/* One row's step. Its loops (norms, RoPE, residual sums) are vector loops of the model's path:
 * on x86 the body is compiled once more for AVX512 and for AVX2 (16 or 8 lanes with fused
 * multiply-adds: the sums of a norm in another order than the plain build's, within rounding of
 * it; every row of a path, decode or prefill, takes the same code, so the same bits). Gemma 3
 * 270M's prefill: the row steps ~2.8% -> ~1% of its time. */
static void row_step_any(batch_t *b, int op, int l, int m) { row_step_body(b, op, l, m); }
#if HL_X86
T512 static void row_step_512(batch_t *b, int op, int l, int m) { row_step_body(b, op, l, m); }
T256 static void row_step_256(batch_t *b, int op, int l, int m) { row_step_body(b, op, l, m); }
#endif
static void row_step(batch_t *b, int op, int l, int m) {
#if HL_X86
    if (b->c->path == P_AVX512) { row_step_512(b, op, l, m); return; }
    if (is_avx2(b->c->path)) { row_step_256(b, op, l, m); return; }
#endif
    row_step_any(b, op, l, m);
}

/* a matmul phase's matrices, their outputs and the K of their activations */
static int mm_mats(const batch_t *b, const phase_t *ph, const mat_t **ms, float **ys, const float **src, int *K) {
    model_t *c = b->c;
    if (ph->op == OP_MM_HEAD) {
        ms[0] = &c->head; ys[0] = b->logits; *src = b->xo; *K = c->H;
        return 1;
    }
    const layer_t *ly = &c->layers[ph->layer];
    switch (ph->op) {
    case OP_MM_QKV:
        ms[0] = &ly->m[M_Q]; ms[1] = &ly->m[M_K]; ms[2] = &ly->m[M_V];
        ys[0] = b->q; ys[1] = b->k; ys[2] = b->v; *src = b->xn; *K = c->H;
        return 3;
    case OP_MM_O:
        ms[0] = &ly->m[M_O]; ys[0] = b->y; *K = c->nh * c->hd;
        *src = b->tail && ph->layer == c->L - 1 ? b->attc : b->att;
        return 1;
    case OP_MM_GU:
        if (!c->gated) { ms[0] = &ly->m[M_UP]; ys[0] = b->hb; *src = b->xn; *K = c->H; return 1; }
        ms[0] = &ly->m[M_GATE]; ms[1] = &ly->m[M_UP]; ys[0] = b->hb; ys[1] = b->u; *src = b->xn; *K = c->H;
        return glu_fused(b, ph->layer) ? 1 : 2;  /* fused: the gate's groups compute both */
    default: ms[0] = &ly->m[M_DOWN]; ys[0] = b->y; *src = b->hb; *K = c->F; return 1;
    }
}

/* a matrix's work items: groups of rows, its pack's (G rows) where it computes on one, else 16 */
static int group_rows(const batch_t *b, const mat_t *m) { return is_packed(b, m) ? m->pg : 16; }
static int groups(const batch_t *b, const mat_t *m) { return (m->N + group_rows(b, m) - 1) / group_rows(b, m); }

/* group g (G weight rows) of a packed matrix against the tiles of activation rows m0..m1-1
 * (m0 a multiple of TILE) into y (rows of N); with `up`, the gated product (glu_row: the same
 * function as the row step's) */
static void packed_group(const batch_t *b, const mat_t *mt, const mat_t *up, int g, int K, int m0, int m1,
                         float *y, int N) {
    const int kind = hl_pack_kind(mt->type), ku = up ? hl_pack_kind(up->type) : 0, nb = K / 32, L2 = b->L2;
    const int G = mt->pg, nn = N - g * G < G ? N - g * G : G, path = b->c->path;
    const size_t tq = (size_t)TILE * K * L2, td = (size_t)TILE * nb, ts = (size_t)TILE * ACT_SUMS * nb;
    const tile_fn tile = tile_kernel(path);
    const row1_fn row1 = b->M == 1 ? row1_kernel(path) : NULL;  /* (quantize_for's layout) */
    float out[TILE * 16], out2[TILE * 16];
    if (row1) {
        row1(pk_group(mt->pk, kind, g, K, G), K, b->tq, b->td, b->ts, out, b->hi, kind);
        if (up) {
            row1(pk_group(up->pk, ku, g, K, G), K, b->tq, b->td, b->ts, out2, b->hi, ku);
            glu_row(path, b->c->act, out, out2, y + g * G, nn);
        } else {
            memcpy(y + g * G, out, 4 * (size_t)nn);
        }
        return;
    }
    for (int r0 = m0; r0 < m1; r0 += TILE) {
        const int r = m1 - r0 < TILE ? m1 - r0 : TILE, t = r0 / TILE;
        const int8_t *qa = b->tq + (size_t)t * tq;
        const float *da = b->td + (size_t)t * td, *sa = b->ts + (size_t)t * ts;
        tile(pk_group(mt->pk, kind, g, K, G), K, qa, da, sa, r, out, b->tm - 1, kind);
        if (up) {
            tile(pk_group(up->pk, ku, g, K, G), K, qa, da, sa, r, out2, b->tm - 1, ku);
            for (int j = 0; j < r; j++)
                glu_row(path, b->c->act, out + G * j, out2 + G * j, y + (size_t)(r0 + j) * N + g * G, nn);
        } else {
            if (nn == 16)  /* (a whole group of AVX512's 16: the copies inlined, not a call each) */
                for (int j = 0; j < r; j++) memcpy(y + (size_t)(r0 + j) * N + g * G, out + G * j, 64);
            else if (nn == 8)
                for (int j = 0; j < r; j++) memcpy(y + (size_t)(r0 + j) * N + g * G, out + G * j, 32);
            else
                for (int j = 0; j < r; j++) memcpy(y + (size_t)(r0 + j) * N + g * G, out + G * j, 4 * (size_t)nn);
        }
    }
}

/* groups i0..i1 (over the phase's matrices) of weight rows against activation rows m0..m1-1 */
static void mm_run(batch_t *b, const phase_t *ph, int i0, int i1) {
    model_t *c = b->c;
    const mat_t *ms[3]; float *ys[3]; const float *src; int K;
    const int nm = mm_mats(b, ph, ms, ys, &src, &K);
    const int fused = ph->op == OP_MM_GU && nm == 1 && c->gated;
    const int m0 = ph->m0, m1 = ph->m1, R = tile_rows(c->path);
    float *row = NULL;
    for (int gg = i0; gg < i1; gg++) {
        int i = 0, g = gg;
        while (g >= groups(b, ms[i])) { g -= groups(b, ms[i]); i++; }
        const mat_t *mt = ms[i];
        const int gr = group_rows(b, mt), N = mt->N, n0 = g * gr, nn = N - n0 < gr ? N - n0 : gr;
        float *y = ys[i];
        if (is_packed(b, mt)) {
            packed_group(b, mt, fused ? &c->layers[ph->layer].m[M_UP] : NULL, g, K, m0, m1, y, N);
        } else if (is_quant(mt->type)) {
            float out[8];
            for (int n = n0; n < n0 + nn; n++)
                for (int r0 = m0; r0 < m1; r0 += R) {
                    const int r = m1 - r0 < R ? m1 - r0 : R;
                    b->kern(mt->w + (size_t)n * mt->rb, mt->type, K, b->aq + (size_t)r0 * K, b->ad + (size_t)r0 * K / 4,
                            b->as + (size_t)r0 * K / 4, r, out, b->hi ? b->aq2 + (size_t)r0 * K : NULL);
                    for (int t = 0; t < r; t++) y[(size_t)(r0 + t) * N + n] = out[t];
                }
        } else {  /* float weights (F32, F16): a dequantized row against the float activations */
            if (!row && !(row = malloc(4 * (size_t)K))) { STORE(&b->fail, 1, RLX); return; }
            for (int n = n0; n < n0 + nn; n++) {
                dequant_row(mt->type, mt->w + (size_t)n * mt->rb, K, row);
                for (int m = m0; m < m1; m++) y[(size_t)m * N + n] = fdot(src + (size_t)m * K, row, K);
            }
        }
    }
    free(row);
}

/* the attention of layer l for chunk ru of the batch, its slot's cache */
static attn_t att_of(const batch_t *b, int l, int ru) {
    const model_t *c = b->c;
    const kv_t *kv = b->kv;
    const int hd = c->hd, nh = c->nh, nkv = c->nkv, nq = nh * hd, m0 = b->run0[ru];
    const size_t esz = kv->kv16 ? 2 : 4, S = kv->S, base = (size_t)b->slot[m0] * nkv * S * hd * esz;
    const attn_t a = {b->q + (size_t)m0 * nq, (const uint8_t *)kv->k[l] + base, (const uint8_t *)kv->v[l] + base,
                      nq, hd, hd, (int64_t)S * hd, hd, (int64_t)S * hd, b->runn[ru], nh, nkv, hd, b->pos[m0],
                      kv->kv16, c->attn_scale, b->att + (size_t)m0 * nq, c->swa[l] ? c->window : 0};
    return a;
}

/* a decode row's key tiles at layer l when its attention runs in two phases (OP_ATT_S: scores
 * of (tile, kv head) items; OP_ATT: one head an item), else 0 */
static int att_split(const batch_t *b, int l) {
    if (b->M != 1 || !b->sc) return 0;
    const attn_t a = att_of(b, l, 0);
    return attn_split_tiles(b->c->path, &a);
}

/* attention items i0..i1-1 of layer l: (chunk, query tile, kv head); split: heads */
static void att_run(batch_t *b, int l, int i0, int i1) {
    model_t *c = b->c;
    if (att_split(b, l)) {
        const attn_t a = att_of(b, l, 0);
        for (int h = i0; h < i1; h++) attn_split_head(c->path, &a, h, b->sc, b->scs);
        return;
    }
    const int hd = c->hd, nh = c->nh, nkv = c->nkv, r = nh / nkv;
    const int Rp = (r * AQ + 3) & ~3;
    const size_t ws_floats = (size_t)2 * Rp * hd + (size_t)hd * AK + (size_t)Rp * AK + 4 * (size_t)Rp;
    float *ws = malloc(ws_floats * sizeof(float));
    if (!ws) { STORE(&b->fail, 1, RLX); return; }
    const int at = b->tail && l == c->L - 1 ? b->natt : 0;  /* (a multiple of nkv) */
    for (int i = at + i0; i < at + i1; i++) {
        const attn_t a = att_of(b, l, b->att_run[i]);
        attn_item(c->path, &a, i % nkv, b->att_qt[i], ws);
    }
    free(ws);
}

/* score items i0..i1-1 of layer l (split): key tile i / nkv of kv head i % nkv */
static void att_scores_run(batch_t *b, int l, int i0, int i1) {
    const attn_t a = att_of(b, l, 0);
    for (int i = i0; i < i1; i++) attn_split_scores(b->c->path, &a, i % b->c->nkv, i / b->c->nkv, b->sc, b->scs);
}

static int is_row_op(int op) {
    return op == OP_EMBED || op == OP_ROW_QKV || op == OP_ROW_ATT || op == OP_ROW_O || op == OP_ROW_GU ||
           op == OP_ROW_DOWN;
}

/* the rows of a row phase */
static int row_count(const batch_t *b, const phase_t *ph) { return is_tail(b, ph->op, ph->layer) ? b->nout : b->M; }

static int batch_items(void *a, int p) {
    const batch_t *b = a;
    const phase_t *ph = &b->ph[p];
    if (is_row_op(ph->op)) return row_count(b, ph) >= SERIAL_ROWS ? row_count(b, ph) : 0;
    if (ph->op == OP_ATT_S) return att_split(b, ph->layer) * b->c->nkv;
    if (ph->op == OP_ATT)
        return att_split(b, ph->layer) ? b->c->nh : b->tail && ph->layer == b->c->L - 1 ? b->natt_tail : b->natt;
    if (ph->m1 <= ph->m0) return 0;
    const mat_t *ms[3]; float *ys[3]; const float *src; int K;
    const int nm = mm_mats(b, ph, ms, ys, &src, &K);
    int n = 0;
    for (int i = 0; i < nm; i++) n += groups(b, ms[i]);
    return n;
}

static void batch_run(void *a, int p, int i0, int i1, int tid) {
    (void)tid;
    batch_t *b = a;
    const phase_t *ph = &b->ph[p];
    if (is_row_op(ph->op)) for (int m = i0; m < i1; m++) row_step(b, ph->op, ph->layer, m);
    else if (ph->op == OP_ATT_S) att_scores_run(b, ph->layer, i0, i1);
    else if (ph->op == OP_ATT) att_run(b, ph->layer, i0, i1);
    else mm_run(b, ph, i0, i1);
}

static void batch_close(void *a, int p) {
    batch_t *b = a;
    const phase_t *ph = &b->ph[p];
    if (is_row_op(ph->op) && row_count(b, ph) < SERIAL_ROWS)
        for (int m = 0; m < row_count(b, ph); m++) row_step(b, ph->op, ph->layer, m);
}

/* A call's buffers (b->M rows), carved one after another (64-byte aligned) from ws; ws NULL:
 * only their bytes, returned. One block that hl_batch keeps in the model from call to call: a
 * buffer freed after each call gave its pages back (glibc returns a large free block), and the
 * next call had them faulted in and zeroed again (Gemma 3 270M, a 512-token prompt: ~4,500 page
 * faults and 1-5% of the call). */
static size_t batch_buffers(batch_t *b, char *ws, int pos0) {
    const model_t *c = b->c;
    const size_t M = (size_t)b->M, Mt = (M + TILE - 1) / TILE, H = c->H, F = c->F, Kmax = b->Kmax;
    const size_t nq = (size_t)c->nh * c->hd, nk = (size_t)c->nkv * c->hd, nb = Kmax / 32;
    size_t at = 0;
#define CARVE(ptr, bytes) do { const size_t n_ = (bytes); if (ws) ptr = (void *)(ws + at); \
                               at += (n_ + 63) & ~(size_t)63; } while (0)
    CARVE(b->x, 4 * M * H); CARVE(b->xn, 4 * M * H); CARVE(b->q, 4 * M * nq); CARVE(b->k, 4 * M * nk);
    CARVE(b->v, 4 * M * nk); CARVE(b->att, 4 * M * nq); CARVE(b->hb, 4 * M * F); CARVE(b->u, 4 * M * F);
    CARVE(b->y, 4 * M * H); CARVE(b->xo, 4 * (size_t)(b->nout > 0 ? b->nout : 1) * H);
    if (b->tail) { CARVE(b->xc, 4 * (size_t)b->nout * H); CARVE(b->attc, 4 * (size_t)b->nout * nq); }
    if (c->parallel) CARVE(b->ya, 4 * M * H);
    CARVE(b->rope, 4 * M * 2 * (size_t)(c->n_rot / 2 > 0 ? c->n_rot / 2 : 1));
    CARVE(b->rope_of, M * sizeof(float *));
    if (M == 1 && c->nthreads > 1) {  /* a decode row on threads: room for its scores (att_split) */
        b->scs = ((size_t)pos0 / AK + 2) * AK;
        CARVE(b->sc, 4 * b->scs * (size_t)c->nh);
    }
    CARVE(b->aq, M * Kmax + 64); CARVE(b->aq2, M * Kmax + 64);
    CARVE(b->ad, M * Kmax + 64); CARVE(b->as, M * Kmax + 64);  /* K/4 floats a row each */
    if (hl_pack_rows(c->path)) {  /* tiles for the packed kernels */
        CARVE(b->tq, Mt * TILE * Kmax * b->L2 + 64);
        CARVE(b->td, 4 * (Mt * TILE * nb + 16)); CARVE(b->ts, 4 * (Mt * TILE * ACT_SUMS * nb + 16));
    }
#undef CARVE
    if (ws) memset(b->rope_of, 0, M * sizeof(float *));  /* (no table made yet) */
    return at;
}

/* n rows: tokens[i] of the sequence in KV slot slot[i] at position pos[i] (rows of one slot at
 * consecutive positions form a chunk; a slot's chunk needs its positions 0..pos-1 in the cache
 * and at most one chunk per slot in a call); lora: NULL, or per row an adapter (hl_lora_new) or
 * NULL; want: per row 1 for an output row (NULL: only the last row). logits (nout, V) and hidden
 * (nout, H, the final-norm states) for the rows that want one, in row order; either may be NULL.
 * kv: a cache of hl_kv_new, or NULL for the model's own (one slot). Afterwards each row's keys
 * and values are in its slot at its position.
 * Returns 0; -1 for bad arguments (a token, position or slot out of range, a slot in two
 * chunks, a layer's cache or an adapter missing); -3 when memory runs out. */
int hl_batch(void *p, void *kvp, int n, const int *tokens, const int *pos, const int *slot,
             void *const *lora, const int *want, float *logits, float *hidden) {
    model_t *c = p;
    const kv_t *kv = kvp ? (const kv_t *)kvp : &c->own;
    if (n <= 0 || kv->S <= 0 || kv->L != c->L) return -1;
    for (int l = 0; l < c->L; l++) if (!kv->k[l] || !kv->v[l]) return -1;
    int nout = 0;
    for (int i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= c->V || pos[i] < 0 || pos[i] >= kv->S || slot[i] < 0 || slot[i] >= kv->slots)
            return -1;
        if (lora && lora[i] && ((const lora_t *)lora[i])->L != c->L) return -1;
        nout += want ? want[i] != 0 : i == n - 1;
    }
    const int H = c->H, F = c->F, nq = c->nh * c->hd, nk = c->nkv * c->hd;
    const int Kmax = H > F ? (H > nq ? H : nq) : (F > nq ? F : nq);
    batch_t b = {0};
    b.c = c; b.kv = kv; b.kern = kernel_for(c->path); b.M = n; b.nout = nout; b.hi = c->hi; b.L2 = c->hi ? 2 : 1;
    b.tm = tile_mode(c->path, c->hi, n);
    b.Kmax = Kmax; b.tok = tokens; b.pos = pos; b.slot = slot; b.lora = (const lora_t *const *)lora;
    b.logits = logits; b.hidden = hidden;
    int *outj = malloc(sizeof(int) * (size_t)n), *run0 = malloc(sizeof(int) * (size_t)n), *runn = malloc(sizeof(int) * (size_t)n);
    int *outm = malloc(sizeof(int) * (size_t)(nout > 0 ? nout : 1));
    char *seen = calloc((size_t)kv->slots, 1);
    int rc = outj && run0 && runn && outm && seen ? 0 : -3, nrun = 0;
    for (int i = 0, j = 0; i < n && !rc; i++) {
        outj[i] = (want ? want[i] != 0 : i == n - 1) ? j++ : -1;
        if (outj[i] >= 0) outm[outj[i]] = i;
        if (i > 0 && slot[i] == slot[i - 1] && pos[i] == pos[i - 1] + 1) { runn[nrun - 1]++; continue; }
        if (seen[slot[i]]) rc = -1;  /* a second chunk of one slot */
        seen[slot[i]] = 1;
        run0[nrun] = i; runn[nrun] = 1; nrun++;
    }
    free(seen);
    b.outj = outj; b.outm = outm; b.run0 = run0; b.runn = runn;
    b.tail = nout < n;  /* (no output row: the last layer ends with its keys and values) */
    /* attention items: chunk by chunk, its query tiles the last (costliest) first, kv heads */
    for (int i = 0; i < nrun && !rc; i++) b.natt += (runn[i] + AQ - 1) / AQ * c->nkv;
    b.att_run = malloc(sizeof(int) * (size_t)(2 * b.natt + 1)); b.att_qt = malloc(sizeof(int) * (size_t)(2 * b.natt + 1));
    if (!rc && (!b.att_run || !b.att_qt)) rc = -3;
    for (int i = 0, it = 0, tt = b.natt; i < nrun && !rc; i++)
        for (int qt = (runn[i] + AQ - 1) / AQ - 1; qt >= 0; qt--) {
            int out = 0;  /* the tail's: the tiles with an output row (the others' rows end at the attention) */
            for (int m = run0[i] + qt * AQ; m < run0[i] + runn[i] && m < run0[i] + (qt + 1) * AQ; m++) out |= outj[m] >= 0;
            for (int g = 0; g < c->nkv; g++, it++) {
                b.att_run[it] = i; b.att_qt[it] = qt;
                if (out) { b.att_run[tt] = i; b.att_qt[tt] = qt; tt++; b.natt_tail++; }
            }
        }
    /* the phases */
    const int nch = (n + MM_ROWS - 1) / MM_ROWS, nchout = (nout + MM_ROWS - 1) / MM_ROWS;
    b.ph = malloc(sizeof(phase_t) * (size_t)(1 + c->L * (4 * nch + 7) + nchout));
    if (!rc && !b.ph) rc = -3;
    if (!rc) {
        int np = 0;
        b.ph[np++] = (phase_t){OP_EMBED, 0, 0, 0};
        const int mm[4] = {OP_MM_QKV, OP_MM_O, OP_MM_GU, OP_MM_DOWN};
        const int rows[4] = {OP_ROW_QKV, OP_ROW_O, OP_ROW_GU, OP_ROW_DOWN};
        for (int l = 0; l < c->L; l++)
            for (int s = 0; s < 4; s++) {
                /* the last layer past its attention: the output rows alone (tail) */
                const int nr = l == c->L - 1 && s > 0 ? nout : n;
                if (nr == 0) break;
                for (int ch = 0; ch * MM_ROWS < nr; ch++)
                    b.ph[np++] = (phase_t){mm[s], l, ch * MM_ROWS, (ch + 1) * MM_ROWS < nr ? (ch + 1) * MM_ROWS : nr};
                b.ph[np++] = (phase_t){rows[s], l, 0, 0};
                if (s == 0) {
                    b.ph[np++] = (phase_t){OP_ATT_S, l, 0, 0};
                    b.ph[np++] = (phase_t){OP_ATT, l, 0, 0};
                    if (l < c->L - 1 || nout > 0) b.ph[np++] = (phase_t){OP_ROW_ATT, l, 0, 0};
                }
            }
        for (int ch = 0; ch < nchout && logits; ch++)
            b.ph[np++] = (phase_t){OP_MM_HEAD, c->L, ch * MM_ROWS, (ch + 1) * MM_ROWS < nout ? (ch + 1) * MM_ROWS : nout};
        b.nph = np;
    }
    /* the buffers */
    char *own = NULL;  /* this call's own block, where another call holds the model's */
    int took = 0;
    if (!rc) {
        const size_t need = batch_buffers(&b, NULL, pos[0]);
        if (!__atomic_exchange_n(&c->ws_busy, 1, __ATOMIC_ACQUIRE)) {
            took = 1;
            if (c->ws_cap < need) {
                free(c->ws);
                c->ws = malloc(need);
                c->ws_cap = c->ws ? need : 0;
            }
            if (c->ws) batch_buffers(&b, c->ws, pos[0]);
            else rc = -3;
        } else if ((own = malloc(need))) {
            batch_buffers(&b, own, pos[0]);
        } else {
            rc = -3;
        }
    }
    if (!rc) {
        const job_t job = {b.nph, batch_items, batch_run, batch_close, &b};
        tiles_new_call(b.tm);
        pool_run(&job, c->nthreads);
        if (b.fail) rc = -3;
    }
    free(outj); free(outm); free(run0); free(runn); free(b.att_run); free(b.att_qt); free(b.ph);
    free(own);
    if (took) __atomic_store_n(&c->ws_busy, 0, __ATOMIC_RELEASE);
    return rc;
}

/* ---- one sequence: hl_batch on the model's own cache --------------------------------------- */

/* logits (T, V) if all, else (1, V) of the last, for T tokens at positions pos.. (the cache must
 * hold 0..pos-1; afterwards it holds 0..pos+T-1). Returns 0, -1 for bad arguments, -3 when out
 * of memory. */
int hl_forward(void *p, const int *tokens, int T, int pos, float *logits, int all) {
    model_t *c = p;
    if (T <= 0 || pos < 0 || pos + T > c->own.S) return -1;
    int *ps = malloc(sizeof(int) * (size_t)T), *sl = calloc((size_t)T, sizeof(int)), *want = malloc(sizeof(int) * (size_t)T);
    int rc = ps && sl && want ? 0 : -3;
    for (int t = 0; t < T && !rc; t++) { ps[t] = pos + t; want[t] = all || t == T - 1; }
    if (!rc) rc = hl_batch(c, NULL, T, tokens, ps, sl, NULL, want, logits, NULL);
    free(ps); free(sl); free(want);
    return rc;
}

/* logits (V,) for token at position pos; the cache must hold positions 0..pos-1 */
int hl_decode(void *p, int token, int pos, float *logits) {
    const int zero = 0, one = 1;
    return hl_batch(p, NULL, 1, &token, &pos, &zero, NULL, &one, logits, NULL);
}
