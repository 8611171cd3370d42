"""The whole network in C, without PyTorch: prefill and decode on the GGUF file's own blocks.

`NativeModel` holds the C model (ggml_cpu.c `model_t`): per-layer matrices as raw GGUF blocks
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F16, F32; for the vector paths every quantized
type repacked, exactly, 16 rows a register for AVX512 and 8 for AVX2 and NEON: `repack`), norm
weights, RoPE frequencies from model/config.py, the options of LLaMA's relatives (Gemma 3, Qwen3, Mistral, Phi-3, StableLM,
GPT-NeoX: `_set_arch`, network.h hl_model_set_arch), and the KV cache as numpy arrays (n_kv_heads, max_seq_len, head_dim) per
layer, float16 by default (as llama.cpp keeps it: half the memory, and half the bandwidth
long-context decoding spends on it) or float32. `forward(ids, start_pos)` runs a prompt chunk
and `decode(token, pos)` one token on that cache; `batch(...)` runs rows of several sequences
at once on a `SlotCache` (slots of sequences), each row with its own position, slot and LoRA
adapter: the C runtime's one entry point (network.h hl_batch, which forward and decode are
too). A row's logits are the same bits whatever else is in its batch.

Only numpy and ctypes: a process that runs a GGUF model through this never imports torch
(torch alone costs ~220 MB of resident memory and a second of start-up).
"""
from __future__ import annotations

import ctypes
import mmap
import threading
import weakref

import numpy as np

from homellm.engine.kernels import SUPPORTED_TYPES, build, path_id
from homellm.engine.tokens import common_prefix
from homellm.model.config import ModelArgs, rope_attention_factor, rope_inv_freq

MATS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ACTS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}  # network.h ACT_*


def layer_vectors(args: ModelArgs) -> list[tuple[str, bool]]:
    """A layer's vectors in network.h's V_* order: (name after "model.layers.N.", whether it is
    an RMSNorm weight, which the C side gets as its multiplier, norm_offset + w). V_LN2 is the
    MLP's input norm: post_attention_layernorm, or Gemma's pre_feedforward_layernorm, whose
    post_attention_layernorm norms the attention's output (V_ATT_OUT)."""
    rms = args.norm_type == "rms"
    mlp_in, att_out = ("pre_feedforward_layernorm", "post_attention_layernorm") if args.sandwich_norms \
        else ("post_attention_layernorm", None)
    return [("input_layernorm.weight", rms), (f"{mlp_in}.weight", rms), ("self_attn.q_proj.bias", False),
            ("self_attn.k_proj.bias", False), ("self_attn.v_proj.bias", False),
            ("input_layernorm.bias", False), (f"{mlp_in}.bias", False),
            ("self_attn.q_norm.weight", True), ("self_attn.k_norm.weight", True),
            ("self_attn.o_proj.bias", False), ("mlp.gate_proj.bias", False), ("mlp.up_proj.bias", False),
            ("mlp.down_proj.bias", False), (f"{att_out}.weight" if att_out else "", True),
            ("post_feedforward_layernorm.weight" if args.sandwich_norms else "", True)]


MAX_CHUNK = 512  # prompt positions per hl_forward call: bounds the activation buffers


def _as_array(t) -> np.ndarray:
    """A float or block tensor's memory as a numpy array, without a copy where possible
    (numpy arrays as they are; CPU torch tensors through their array interface)."""
    if isinstance(t, np.ndarray):
        return t
    if hasattr(t, "detach"):  # a torch tensor (the only other kind a Checkpoint holds)
        t = t.detach()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def _ggml_type(t) -> int | None:
    """The ggml type of a GGMLTensor (duck-typed: no import of the checkpoint module)."""
    return getattr(t, "ggml_type", None)


# one packed copy per weight, shared by every user of the same blocks (prefill layers, decoders)
_PACKED: "weakref.WeakValueDictionary[tuple, np.ndarray]" = weakref.WeakValueDictionary()


class _Packed(np.ndarray):
    """A memoized pack, holding the blocks it was made from: while it lives, their mapping does
    too, so no other file's blocks can take their address and be handed this pack (the key)."""
    source: np.ndarray


def pack_rows(path: str | None = None) -> int:
    """Weight rows side by side in the packs of `path`'s kernels (None or "auto": the best path
    this CPU has): 16 for avx512, 8 for avx2, avxvnni, neon and i8mm; 0 for scalar, for a path
    this CPU does not run, and without the kernels."""
    lib = build.load()
    if lib is None:
        return 0
    pid = path_id(path)
    pid = lib.hl_best_path() if pid < 0 else pid
    return lib.hl_pack_rows(pid) if lib.hl_path_ok(pid) else 0


def repack_q4(t, path: str | None = None) -> np.ndarray | None:
    """Q4_0/Q4_1 blocks reordered for `path`'s packed kernels (the rows of a register side by
    side; same size, exact: a byte reorder) as a uint8 array, or None where the path or type has
    no packed kernel.

    The same GGUF tensor gives the same packed array (memoized while anyone holds it), and once
    packed, the file pages of the raw blocks are dropped from this process's memory: nothing
    reads them again on this path (a later read would fetch them from the file)."""
    return _repack(t, (2, 3), path=path)


PACKABLE = (2, 3, 6, 7, 8, 12, 13, 14)  # Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K


def repack(t, memo: bool = True, path: str | None = None) -> np.ndarray | None:
    """What `path`'s kernels (None: this CPU's best) compute on: Q4_0/Q4_1 as `repack_q4`; Q8_0
    reordered the same way (the file's bytes, exact); the K-quants and Q5_1 as rows of unsigned
    integers with float32 scales (exact; 1.33-1.82x the bytes); or None (raw blocks: the scalar
    path, or a type without a pack). memo=False for blocks made in memory (their address may be
    reused once freed)."""
    return _repack(t, PACKABLE, memo, path)


def pack_kind(ggml_type: int) -> int:
    """The C side's pack kind of a type (what hl_matmul_packed_multi takes), -1 for none."""
    lib = build.load()
    return -1 if lib is None else lib.hl_pack_kind(ggml_type)


REPACK_ROWS = 4096  # a multiple of 16


def _repack(t, types: tuple[int, ...], memo: bool = True, path: str | None = None) -> np.ndarray | None:
    from homellm.model.formats.gguf_file import release_file_pages
    lib = build.load()
    kind = _ggml_type(t)
    G = pack_rows(path)
    if lib is None or kind not in types or not G:
        return None
    data = np.asarray(t.data)
    key = (data.__array_interface__["data"][0], kind, tuple(t.shape), G)
    hit = _PACKED.get(key) if memo else None
    if hit is not None:
        return hit
    N, K = t.shape
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(N, -1)
    if K % 32:
        return None
    out = np.empty(lib.hl_packed_bytes(kind, N, K, G), dtype=np.uint8)
    if memo:
        out = out.view(_Packed)
        out.source = data  # (its pages are still dropped below: only the mapping stays)
    # a few thousand rows at a time, each chunk's file pages dropped once packed: the raw
    # blocks and their packed copy are never both resident in full (peak RSS)
    for r0 in range(0, N, REPACK_ROWS):
        n = min(REPACK_ROWS, N - r0)
        at = lib.hl_packed_bytes(kind, r0, K, G)  # (r0 is a whole number of groups)
        if lib.hl_repack(kind, raw[r0].ctypes.data, raw.strides[0], n, K, out[at:].ctypes.data, G) != 0:
            return None
        release_file_pages(raw[r0:r0 + n])
    if memo:
        _PACKED[key] = out
    release_file_pages(data)
    return out


Q5_0, Q8_0 = 6, 8


def q5_0_as_q8_0(blocks: np.ndarray, rows_per_step: int = 4096) -> np.ndarray:
    """Q5_0 rows (n, nb * 22 bytes) as Q8_0 rows (n, nb * 34 bytes) holding the same weights.

    Q5_0 (ggml): f16 d, 4 bytes qh (bit j: the fifth bit of weight j), 16 bytes qs (weight j in
    the low nibble of qs[j], weight j + 16 in the high one); w = d * (q5 - 16). q5 - 16 lies in
    [-16, 15], so it is Q8_0's int8 with the same scale: exact, 1.55x the bytes, and the Q8_0
    kernels (3x faster than the Q5_0 bit unpacking) compute on it."""
    n = blocks.shape[0]
    src = np.ascontiguousarray(blocks).view(np.uint8).reshape(n, -1, 22)
    out = np.empty((n, src.shape[1], 34), dtype=np.uint8)
    shifts = np.arange(32, dtype=np.uint32)
    for r in range(0, n, rows_per_step):  # bounded temporaries
        b = src[r:r + rows_per_step]
        qh = b[..., 2:6].copy().view("<u4")  # (rows, nb, 1)
        fifth = ((qh >> shifts) & 1).astype(np.uint8) << 4  # (rows, nb, 32)
        qs = b[..., 6:22]
        q5 = np.concatenate([qs & 0x0F, qs >> 4], axis=-1) | fifth
        out[r:r + rows_per_step, :, :2] = b[..., :2]
        out[r:r + rows_per_step, :, 2:] = (q5.astype(np.int16) - 16).astype(np.int8).view(np.uint8)
    return out.reshape(n, -1)


def unsupported_network(args: ModelArgs) -> str | None:
    """What of the network `args` describe this runtime does not compute (None: it runs all of
    it). Every option of model/config.py is in network.h (hl_model_set_arch) or, the final
    logit softcap, applied here to the logits the C side returns; a network with an option the
    C side does not know is named here, so that load() and the fast decoder use PyTorch."""
    if args.hidden_act not in ACTS:
        return f"the C runtime has no {args.hidden_act} activation"
    return None


def unsupported(tensors: dict, args: ModelArgs | None = None) -> list[str]:
    """Names of the weight tensors this runtime cannot compute on (e.g. K-quants), and with
    `args` what of the network it does not compute (`unsupported_network`)."""
    bad = [why] if args is not None and (why := unsupported_network(args)) else []
    for name, t in tensors.items():
        kind = _ggml_type(t)
        if kind is not None and kind not in SUPPORTED_TYPES:
            bad.append(f"{name} ({t.type_name})")
    return bad


def lazy_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array on anonymous memory pages of its own: a page costs memory once touched,
    4 KB at a time. (numpy asks the kernel for 2 MB huge pages on large arrays: a KV cache whose
    sequences touch a few positions each would then cost 2 MB a touch, ~140 MB more a slot for
    the default model.)"""
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(count * np.dtype(dtype).itemsize, 1))
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


class SlotCache:
    """Keys and values of `slots` sequences for `NativeModel.batch`: per layer (slots, n_kv_heads,
    max_seq_len, head_dim) float16 (default) or float32 numpy arrays (lazy_array: pages no
    position reaches cost no memory). `tokens[s]`: the ids whose keys and values slot s holds
    (kept by the caller; `copy` and `trim` keep it too)."""

    def __init__(self, args: ModelArgs, slots: int, max_seq_len: int, kv_dtype: str = "f16"):
        lib = build.load()
        if lib is None:
            raise RuntimeError(f"homellm kernels are unavailable: {build.status()}")
        if kv_dtype not in ("f16", "f32"):
            raise ValueError(f"kv_dtype {kv_dtype!r}: expected 'f16' or 'f32'")
        if slots < 1 or max_seq_len < 1:
            raise ValueError(f"a cache needs at least one slot and one position, got {slots} x {max_seq_len}")
        self.lib, self.args, self.slots, self.max_seq_len, self.kv_dtype = lib, args, slots, max_seq_len, kv_dtype
        dt = np.float16 if kv_dtype == "f16" else np.float32
        shape = (slots, args.num_key_value_heads, max_seq_len, args.head_dim)
        self.k = [lazy_array(shape, dt) for _ in range(args.num_hidden_layers)]
        self.v = [lazy_array(shape, dt) for _ in range(args.num_hidden_layers)]
        self.tokens: list[list[int]] = [[] for _ in range(slots)]
        self.handle = lib.hl_kv_new(args.num_hidden_layers, slots, max_seq_len, int(kv_dtype == "f16"))
        if not self.handle:
            raise MemoryError("hl_kv_new: out of memory")
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            lib.hl_kv_set(self.handle, i, k.ctypes.data, v.ctypes.data)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of keys and values one position of one slot takes."""
        k = self.k[0]
        return 2 * len(self.k) * k.shape[1] * k.shape[3] * k.itemsize

    def common_prefix(self, slot: int, ids) -> int:
        """How many leading ids slot `slot` already holds."""
        return common_prefix(self.tokens[slot], ids)

    def copy(self, src: int, dst: int, n: int | None = None):
        """Slot dst holds the first n positions of slot src (all it holds: n None), e.g. a
        fork: n > 1 choices or a regeneration from a shared prompt (llama.cpp's seq_cp)."""
        n = len(self.tokens[src]) if n is None else min(n, len(self.tokens[src]))
        if src != dst:
            for k, v in zip(self.k, self.v):
                k[dst, :, :n] = k[src, :, :n]
                v[dst, :, :n] = v[src, :, :n]
        self.tokens[dst] = list(self.tokens[src][:n])

    def trim(self, slot: int, n: int):
        """Keep the first n positions of a slot (the rest is forgotten; llama.cpp's seq_rm)."""
        del self.tokens[slot][n:]

    def read(self, slot: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of a slot's first n positions: keys and values (n_layers, n_kv, n, head_dim)."""
        return (np.stack([k[slot, :, :n] for k in self.k]), np.stack([v[slot, :, :n] for v in self.v]))

    def write(self, slot: int, keys: np.ndarray, values: np.ndarray, tokens: list[int]):
        """Positions 0..n-1 of a slot from (n_layers, n_kv, n, head_dim) keys and values."""
        n = len(tokens)
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            k[slot, :, :n] = keys[i, :, :n]
            v[slot, :, :n] = values[i, :, :n]
        self.tokens[slot] = list(tokens)

    def __del__(self):
        handle, self.handle = getattr(self, "handle", None), None
        if handle:
            self.lib.hl_kv_free(handle)


class NativeModel:
    """forward(ids, start_pos) / decode(token, pos) -> float32 logits, with the KV cache inside.

    tensors: HF names -> GGMLTensor blocks or float arrays (numpy, or CPU torch tensors), as in
    `Checkpoint.tensors`. kv: optional per-layer (k, v) float32 arrays (n_kv_heads, S, head_dim)
    to use as the cache (e.g. views of a PyTorch KVCache); by default the model allocates its own
    (np.empty: pages that no position reaches cost no memory).
    threads: the most the thread pool uses (0 or None: one per CPU); path: a kernel path of
    kernels.PATHS ("scalar", "avx2", "avx512", "avxvnni", "neon", "i8mm") or None (the best);
    hi: two-level int8 activations (~256x less activation rounding; see ggml_cpu.c);
    packed: reorder the quantized weights for the path's packed kernels (`repack`; else compute
    on the raw blocks). kv_dtype: "f16" (default) or "f32" for the cache the model allocates itself.
    keep_raw: False lets go of the raw blocks of packed matrices (the packed copy is all the
    path reads): with the caller dropping its references too, the Q/K rows that reading
    un-permuted into memory are freed. Paths with other packs (or none) are then unavailable.
    """

    def __init__(self, args: ModelArgs, tensors: dict, max_seq_len: int, *, threads: int | None = None,
                 path: str | None = None, hi: bool = True, packed: bool = True,
                 kv: list[tuple[np.ndarray, np.ndarray]] | None = None, keep_raw: bool = True,
                 kv_dtype: str = "f16"):
        lib = build.load()
        if lib is None:
            raise RuntimeError(f"homellm kernels are unavailable: {build.status()}")
        why = unsupported_network(args)
        if why:
            raise ValueError(why)
        bad = unsupported(tensors)
        if bad:
            raise ValueError(f"the C runtime cannot compute on {', '.join(bad[:3])}"
                             f"{' and more' if len(bad) > 3 else ''} (it takes F32, F16, Q4_0, Q4_1, Q5_0, "
                             f"Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)")
        self.lib, self.args, self.max_seq_len = lib, args, max_seq_len
        self.tokens: list[int] = []  # the ids whose keys and values the cache holds
        self.lock = threading.RLock()  # held by whoever runs a sequence on the own cache
        self.adapter = None  # a LoraAdapter (engine/lora.py) forward and decode apply, or None
        self._keep: list = []  # every buffer the C side points to
        self.raw_dropped = False
        self.pack_rows = pack_rows(path) if packed else 0  # the packs' rows a group (0: none)
        inv_freq = np.ascontiguousarray(rope_inv_freq(args), dtype=np.float32)  # (rotary_dim / 2)
        padded = np.zeros(args.head_dim // 2, dtype=np.float32)  # (what hl_model_new copies)
        padded[:len(inv_freq)] = inv_freq
        self.ctx = lib.hl_model_new(args.num_hidden_layers, args.hidden_size, args.num_attention_heads,
                                    args.num_key_value_heads, args.head_dim, args.intermediate_size,
                                    args.vocab_size, args.rms_norm_eps, padded.ctypes.data)
        if not self.ctx:
            raise MemoryError("hl_model_new: out of memory")
        self._set_arch(args, inv_freq)
        shape = (args.num_key_value_heads, max_seq_len, args.head_dim)
        if kv is None:
            if kv_dtype not in ("f16", "f32"):
                raise ValueError(f"kv_dtype {kv_dtype!r}: expected 'f16' or 'f32'")
            dt = np.float16 if kv_dtype == "f16" else np.float32
            kv = [(lazy_array(shape, dt), lazy_array(shape, dt)) for _ in range(args.num_hidden_layers)]
        self.kv_dtype = "f16" if kv[0][0].dtype == np.float16 else "f32"
        self.k = [k for k, _ in kv]
        self.v = [v for _, v in kv]
        for i in range(args.num_hidden_layers):
            p = f"model.layers.{i}."
            for j, name in enumerate(MATS):
                if name == "mlp.gate_proj" and not args.mlp_gated:
                    continue  # (GPT-NeoX: up and down only)
                src = tensors[p + name + ".weight"]
                # Q5_0 packs as it is (nibbles and 5th bits: the file's bytes); on raw blocks it
                # runs as the Q8_0 it exactly is (a converted copy must not be memoized by address)
                t = src if self.pack_rows else self._runtime_blocks(src)
                pk = repack(t, memo=t is src, path=path) if self.pack_rows else None
                self._set_mat(i, j, t, p + name, keep=pk is None or keep_raw)
                if pk is not None:
                    self._keep.append(pk)
                    if lib.hl_model_set_packed(self.ctx, i, j, pk.ctypes.data, self.pack_rows) != 0:
                        raise ValueError(f"{p + name}: packed blocks of type {t.ggml_type} are not supported")
                    self.raw_dropped |= not keep_raw
            for j, (name, rms) in enumerate(layer_vectors(args)):
                if name and p + name in tensors:
                    lib.hl_model_set_vec(self.ctx, i, j, self._vec(tensors[p + name],
                                                                   args.norm_offset if rms else 0.0))
            k, v = self.k[i], self.v[i]
            dt = self.k[0].dtype
            if dt not in (np.float16, np.float32) or k.dtype != dt or v.dtype != dt or k.shape != shape \
                    or v.shape != shape or not (k.flags.c_contiguous and v.flags.c_contiguous):
                raise ValueError(f"KV cache layer {i}: expected contiguous float32 or float16 {shape} "
                                 f"(every layer alike), got {k.dtype} {k.shape}")
            lib.hl_model_set_kv(self.ctx, i, k.ctypes.data, v.ctypes.data, max_seq_len,
                                int(dt == np.float16))
        embed = tensors["model.embed_tokens.weight"]
        head = embed if args.tie_word_embeddings else tensors["lm_head.weight"]
        for which, t, name in ((-1, embed, "model.embed_tokens"), (-2, head, "lm_head")):
            # packed too (a tied table once): the head streams at the packed kernels' rate and
            # the embedding's rows come from the same pack
            pk = repack(t, path=path) if self.pack_rows else None
            self._set_mat(0, which, t, name, keep=pk is None or keep_raw)
            if pk is not None:
                self._keep.append(pk)
                if lib.hl_model_set_packed(self.ctx, 0, which, pk.ctypes.data, self.pack_rows) != 0:
                    raise ValueError(f"{name}: packed blocks of type {t.ggml_type} are not supported")
                self.raw_dropped |= not keep_raw
        lib.hl_model_set_vec(self.ctx, -1, 0, self._vec(tensors["model.norm.weight"],
                                                         args.norm_offset if args.norm_type == "rms" else 0.0))
        if "model.norm.bias" in tensors:
            lib.hl_model_set_vec(self.ctx, -1, 1, self._vec(tensors["model.norm.bias"]))
        self.softcap = args.final_logit_softcapping
        self.set_threads(threads, path, hi)

    def set_threads(self, threads: int | None = None, path: str | None = None, hi: bool = True):
        if self.raw_dropped and pack_rows(path) != self.pack_rows:
            raise RuntimeError(f"kernel path {path!r} needs the raw blocks, which this model let go")
        self.threads = threads or 0
        if self.lib.hl_model_set_threads(self.ctx, self.threads, path_id(path), int(hi)) != 0:
            raise RuntimeError(f"kernel path {path!r} is not supported by this CPU")
        self.path, self.hi = path, hi

    def _vec(self, t, offset: float = 0.0) -> int:
        a = np.asarray(t.dequantize_numpy()) if _ggml_type(t) is not None else _as_array(t)
        a = np.ascontiguousarray(a, dtype=np.float32)
        if offset:  # Gemma: the norm multiplies by (1 + w), in float32 as transformers does
            a = a + np.float32(offset)
        self._keep.append(a)
        return a.ctypes.data

    def _set_arch(self, args: ModelArgs, inv_freq: np.ndarray):
        """The relatives' options (network.h hl_model_set_arch)."""
        local = None
        if args.rope_local_theta is not None:
            local = np.ascontiguousarray(rope_inv_freq(args, local=True), dtype=np.float32)
            self._keep.append(local)
        swa = np.ascontiguousarray([args.window(i) is not None for i in range(args.num_hidden_layers)],
                                   dtype=np.int32)
        self._keep += [inv_freq, swa]
        rc = self.lib.hl_model_set_arch(
            self.ctx, int(args.norm_type == "layer"), int(args.qk_norm), int(args.sandwich_norms),
            int(args.parallel_residual), int(args.mlp_gated), ACTS[args.hidden_act], args.rotary_dim,
            inv_freq.ctypes.data, local.ctypes.data if local is not None else None, float(args.embed_scale),
            float(args.attention_scale), float(rope_attention_factor(args)), int(args.sliding_window or 0),
            swa.ctypes.data)
        if rc:
            raise ValueError(f"hl_model_set_arch refused the network of {args.model_type} ({rc})")

    def _capped(self, logits):
        """The final logit softcap, c tanh(logits / c), where the network has one (in place)."""
        if self.softcap is not None and logits is not None:
            c = np.float32(self.softcap)
            np.tanh(logits / c, out=logits)
            logits *= c
        return logits

    @staticmethod
    def _runtime_blocks(t):
        """The blocks the kernels compute on: Q5_0 as exact Q8_0 (the file's pages of it are
        not needed again); everything else as it is."""
        if _ggml_type(t) != Q5_0:
            return t
        from homellm.model.formats.checkpoint import GGMLTensor
        from homellm.model.formats.gguf_file import release_file_pages
        out = GGMLTensor(Q8_0, q5_0_as_q8_0(np.asarray(t.data)), tuple(t.shape))
        release_file_pages(np.asarray(t.data))
        return out

    def _set_mat(self, layer: int, which: int, t, name: str, keep: bool = True):
        if _ggml_type(t) is not None:
            data = np.ascontiguousarray(t.data)
            gtype, (n, k) = t.ggml_type, t.shape
            row_bytes = data.strides[0] if data.ndim == 2 else data.nbytes // n
        else:
            data = _as_array(t)
            if data.dtype not in (np.float32, np.float16):
                data = data.astype(np.float32)
            data = np.ascontiguousarray(data)
            gtype, (n, k) = (0 if data.dtype == np.float32 else 1), data.shape
            row_bytes = data.strides[0]
        if keep:
            self._keep.append(data)
        if self.lib.hl_model_set_mat(self.ctx, layer, which, gtype, n, k, data.ctypes.data, row_bytes) != 0:
            raise ValueError(f"{name}: shape {(n, k)} does not fit ggml type {gtype} blocks")

    # --- running -----------------------------------------------------------------------------

    def forward(self, ids: list[int], start_pos: int, last_only: bool = True,
                logits: bool = True) -> np.ndarray | None:
        """Logits (len(ids) or 1, vocab) float32 for ids at start_pos.. (the cache must hold
        0..start_pos-1); afterwards the cache holds 0..start_pos+len(ids)-1. logits=False: only
        the keys and values (a prompt's chunk before its last: no row goes past the last layer's
        attention, no head), returns None."""
        with self.lock:
            return self._forward(ids, start_pos, last_only, logits)

    def _forward(self, ids: list[int], start_pos: int, last_only: bool,
                 logits: bool = True) -> np.ndarray | None:
        n = len(ids)
        if n == 0:
            raise ValueError("forward: no ids")
        if start_pos + n > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions; asked for {start_pos + n}")
        if n == 1 and logits:
            out = self.decode(ids[0], start_pos)[None]
        else:  # the batch call on the own cache (hl_forward is the same call, without adapters)
            outs = []
            for i in range(0, n, MAX_CHUNK):
                chunk = ids[i:i + MAX_CHUNK]
                last = i + MAX_CHUNK >= n
                want = [logits and (not last_only or (last and j == len(chunk) - 1)) for j in range(len(chunk))]
                try:
                    got = self.batch(None, chunk, range(start_pos + i, start_pos + i + len(chunk)),
                                     [0] * len(chunk), want, [self.adapter] * len(chunk))
                except ValueError:
                    raise self._error(-1, chunk, start_pos + i) from None
                if got is not None:
                    outs.append(got)
            out = None if not outs else outs[0] if len(outs) == 1 else np.concatenate(outs)  # (batch capped them)
        del self.tokens[start_pos:]
        self.tokens.extend(ids)
        return out

    def decode(self, token: int, pos: int, out: np.ndarray | None = None) -> np.ndarray:
        """Logits (vocab,) for `token` at position `pos`; the cache must hold 0..pos-1.
        (Low level: `forward` also keeps `tokens` up to date.)"""
        logits = out if out is not None else np.empty(self.args.vocab_size, dtype=np.float32)
        if self.adapter is not None:
            try:
                logits[:] = self.batch(None, [token], [pos], [0], [True], [self.adapter])[0]
            except ValueError:
                raise self._error(-1, [token], pos) from None
            return logits
        rc = self.lib.hl_decode(self.ctx, int(token), int(pos), logits.ctypes.data)
        if rc:
            raise self._error(rc, [token], pos)
        return self._capped(logits)

    def batch(self, cache: SlotCache | None, tokens, positions, slots, want=None, adapters=None,
              logits: bool = True, hidden: bool = False, out: np.ndarray | None = None):
        """Run rows of several sequences through the network at once (hl_batch).

        Row i is token tokens[i] of the sequence in slot slots[i] of `cache` (None: the
        model's own cache, one slot) at position positions[i]; consecutive rows of a slot at
        consecutive positions form that sequence's chunk (one chunk per slot and call; the slot
        must hold positions 0..first-1).
        want: per row whether it returns logits (None: the last row only); adapters: None, or
        per row a `LoraAdapter` or None. Returns the logits (n_want, vocab) float32 of the
        wanting rows in row order, or with hidden=True the pair (logits or None, final-norm
        hidden states (n_want, hidden)). Each row's keys and values land in its slot; the
        caller keeps `cache.tokens`. out: a float32 C-contiguous array of at least n_want rows
        of vocab for the logits (an engine's own, reused step after step)."""
        n = len(tokens)
        if n == 0:
            raise ValueError("batch: no rows")
        toks = np.ascontiguousarray(tokens, dtype=np.int32)
        pos = np.ascontiguousarray(positions, dtype=np.int32)
        sl = np.ascontiguousarray(slots, dtype=np.int32)
        if pos.shape != (n,) or sl.shape != (n,):
            raise ValueError(f"batch: {n} tokens but {pos.shape} positions and {sl.shape} slots")
        w = np.zeros(n, dtype=np.int32) if want is not None else None
        if w is not None:
            w[:] = np.asarray(want, dtype=bool)
        nout = int(w.sum()) if w is not None else 1
        if not (logits and nout):
            out = None
        elif out is not None and out.dtype == np.float32 and out.flags.c_contiguous \
                and out.ndim == 2 and out.shape[0] >= nout and out.shape[1] == self.args.vocab_size:
            out = out[:nout]
        else:
            out = np.empty((nout, self.args.vocab_size), dtype=np.float32)
        hid = np.empty((nout, self.args.hidden_size), dtype=np.float32) if hidden and nout else None
        ads = None
        if adapters is not None and any(a is not None for a in adapters):
            ads = (ctypes.c_void_p * n)(*[a.handle if a is not None else None for a in adapters])
        handle, size, nslots = (cache.handle, cache.max_seq_len, cache.slots) if cache is not None \
            else (None, self.max_seq_len, 1)
        rc = self.lib.hl_batch(self.ctx, handle, n, toks.ctypes.data, pos.ctypes.data, sl.ctypes.data,
                               ads, w.ctypes.data if w is not None else None,
                               out.ctypes.data if out is not None else None,
                               hid.ctypes.data if hid is not None else None)
        if rc:
            if rc == -3:
                raise MemoryError(f"the C runtime ran out of memory at {n} rows")
            raise ValueError(f"batch: a token (vocab {self.args.vocab_size}), position (cache "
                             f"{size}) or slot ({nslots}) out of range, or a slot in two chunks "
                             f"(slots {sorted(set(sl.tolist()))[:8]})")
        self._capped(out)
        if hidden:
            return out, hid
        return out

    def hidden_states(self, ids: list[int]) -> np.ndarray:
        """(T, hidden) float32: the final-norm states of ids from position 0 (what comes before
        the LM head: embeddings), through the model's own cache."""
        if len(ids) > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions; asked for {len(ids)}")
        with self.lock:
            out = []
            for i in range(0, len(ids), MAX_CHUNK):
                chunk = ids[i:i + MAX_CHUNK]
                out.append(self.batch(None, chunk, range(i, i + len(chunk)), [0] * len(chunk),
                                      [True] * len(chunk), [self.adapter] * len(chunk),
                                      logits=False, hidden=True)[1])
            self.tokens = list(ids)
            return np.concatenate(out) if out else np.zeros((0, self.args.hidden_size), np.float32)

    def _error(self, rc: int, ids: list[int], pos: int) -> Exception:
        if rc == -3:
            return MemoryError(f"the C runtime ran out of memory at {len(ids)} positions")
        return ValueError(f"token ids {min(ids)}..{max(ids)} or positions {pos}..{pos + len(ids) - 1} "
                          f"out of range (vocab {self.args.vocab_size}, cache {self.max_seq_len})")

    def common_prefix(self, ids: list[int]) -> int:
        """How many leading ids already have their keys and values in the cache."""
        return common_prefix(self.tokens, ids)

    def reset(self):
        """Forget the cached positions (the buffers stay allocated)."""
        self.tokens = []

    def __del__(self):
        ctx, self.ctx = getattr(self, "ctx", None), None
        if ctx:
            self.lib.hl_model_free(ctx)


class AdaptedModel:
    """A NativeModel seen through one LoRA adapter (engine/lora.py): its single-sequence calls
    (forward, decode, hidden_states) apply the adapter, everything else is the model's. What a
    server's `base:adapter` id scores and embeds with; the model's weights are shared."""

    def __init__(self, model: NativeModel, adapter):
        self.model, self.adapter = model, adapter

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _through(self, method: str, *args, **kwargs):
        with self.model.lock:
            saved, self.model.adapter = self.model.adapter, self.adapter
            try:
                return getattr(self.model, method)(*args, **kwargs)
            finally:
                self.model.adapter = saved

    def forward(self, ids: list[int], start_pos: int, last_only: bool = True,
                logits: bool = True) -> np.ndarray | None:
        return self._through("forward", ids, start_pos, last_only, logits)

    def decode(self, token: int, pos: int, out: np.ndarray | None = None) -> np.ndarray:
        return self._through("decode", token, pos, out)

    def hidden_states(self, ids: list[int]) -> np.ndarray:
        return self._through("hidden_states", ids)
