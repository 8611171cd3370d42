"""The Python API: `homellm.load(name_or_path)` and the model object it returns.

This layer joins the engine (token ids) and the tokenizer (text): detokenization that is
safe for multi-byte characters, stop strings (text that could still become a stop string is
held back until it cannot), chat templates, and a chat session whose earlier turns stay in
the KV cache.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from homellm.engine.generate import Engine, Step, Timings
from homellm.engine.sampling import SAMPLING_FIELDS, NonFiniteLogitsError, split_sampling  # noqa: F401
from homellm.errors import ContextOverflowError, HomellmError

if TYPE_CHECKING:
    import torch

DEFAULT_CTX = 4096
DIAGNOSE_TOKENS = 256  # tokens the NaN diagnosis re-runs in numpy (attention is (T, T) there)


class StopStrings:
    """Cuts a text stream at the first stop string, holding back a possible partial match."""

    def __init__(self, stops: Iterable[str] | None):
        self.stops = [s for s in (stops or []) if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was found."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = 0  # the longest tail of pending that begins some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def check_logit_bias(bias: dict | None, vocab_size: int) -> dict[int, float] | None:
    """{token id: bias} with ids in the vocabulary and finite numbers, or HomellmError naming the
    entry; None or {} stays None."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            tid = int(key)
        except (TypeError, ValueError):
            raise HomellmError(f"logit_bias: {key!r} is not a token id (an integer)") from None
        if not 0 <= tid < vocab_size:
            raise HomellmError(f"logit_bias: token id {tid} is outside the vocabulary [0, {vocab_size})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                or abs(value) == float("inf"):
            raise HomellmError(f"logit_bias: the bias of token {tid} must be a finite number, got {value!r}")
        out[tid] = float(value)
    return out


class TextStream:
    """Token ids in, text out, for every streamed reply (the Python API, the CLI, the server):
    incremental detokenization (a character split over tokens comes out once whole) and stop
    strings (text that could still become one is held back until it cannot)."""

    def __init__(self, tokenizer, stops: Iterable[str] | None = None):
        self.decoder = tokenizer.stream_decoder()
        self.stops = StopStrings(stops)

    def feed(self, token: int) -> tuple[str, bool]:
        """Text safe to emit after `token`, and whether a stop string ended the reply there."""
        return self.stops.feed(self.decoder.step(token))

    def flush(self) -> str:
        """What was held back, at the end of the reply."""
        return self.stops.flush()


class Model:
    """A loaded model: tokenizer, network and an engine with its KV cache.

    network: the C runtime (`kernels.NativeModel`, no PyTorch) or a PyTorch `Llama`."""

    def __init__(self, checkpoint, network, tokenizer, ctx: int, load_s: float,
                 fast_decode: bool = True):
        self.checkpoint = checkpoint
        self.args = checkpoint.args
        self.network = network
        self.tokenizer = tokenizer
        self.ctx = ctx
        self.load_s = load_s
        self.weight_bytes_per_token = 0  # bytes of weights a decode step reads (set by load())
        self.engine = Engine(network, ctx)
        if fast_decode:
            self.engine.attach_fast_decoder(checkpoint)

    @property
    def device(self) -> str:
        """"cpu", "cuda:0", ...: where the network runs."""
        return self.engine.device

    @property
    def runtime(self) -> str:
        """"native" (our C runtime, no PyTorch) or "torch"."""
        return "native" if self.engine.native else "torch"

    @property
    def threads(self) -> int:
        """CPU threads the network computes with."""
        if self.engine.native:
            return self.network.threads or default_threads()
        import torch
        return torch.get_num_threads()

    def logits(self, token_ids: "list[int] | torch.Tensor") -> "torch.Tensor":
        """Teacher-forced float32 logits [T, vocab] for a sequence, as a torch tensor.

        The C runtime computes them through its KV cache (which then holds this sequence, so
        at most `ctx` tokens); the PyTorch network without a cache."""
        import torch
        if self.engine.native:
            ids = [int(i) for i in torch.as_tensor(token_ids).reshape(-1).tolist()]
            if len(ids) > self.ctx:
                raise ContextOverflowError(len(ids), self.ctx)
            return torch.from_numpy(self.network.forward(ids, 0, last_only=False))
        with torch.inference_mode():
            ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).reshape(1, -1)
            return self.network(ids).float()[0]

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if not isinstance(prompt, str) else self.tokenizer.encode(prompt)

    def generate(self, prompt_or_ids: str | list[int], *, max_tokens: int | None = None,
                 stop: list[str] | None = None, top_logprobs: int = 0,
                 response_format: dict | None = None, logit_bias: dict | None = None,
                 logprobs: bool = True, **sampling) -> Iterator[Step]:
        """Stream Steps for a raw prompt (no chat template): text deltas, ids, logprobs.

        Sampling keywords: SamplingParams' fields (temperature, top_k, top_p, min_p,
        repeat_penalty, repeat_last_n, frequency_penalty, presence_penalty, seed); logit_bias
        ({token id: bias}, added to the logits before sampling). `response_format` (OpenAI's field:
        {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}})
        constrains the output to JSON (ValueError for an invalid one). `logprobs=False`: no
        Step.logprob (saves a pass over the vocabulary a token). The last Step has
        finish_reason and timings.
        """
        params, extra = split_sampling(sampling)
        if extra:
            raise TypeError(f"unknown generation options: {', '.join(sorted(extra))}")
        ids = self.encode_prompt(prompt_or_ids)
        return self._stream(ids, params, max_tokens, stop, top_logprobs,
                            grammar=self._grammar(response_format), logit_bias=logit_bias,
                            logprobs=logprobs)

    def chat(self, messages: list[dict], **options) -> Iterator[Step]:
        """Stream the assistant's reply to `messages` (rendered with the model's template)."""
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except HomellmError as e:
            raise about(self.checkpoint.source, e) from None
        params, rest = split_sampling(options)
        grammar = self._grammar(rest.pop("response_format", None))
        return self._stream(ids, params, rest.pop("max_tokens", None), rest.pop("stop", None),
                            rest.pop("top_logprobs", 0), grammar=grammar, **rest)

    def _grammar(self, response_format):
        """The compiled response_format, or None; raises ValueError now, not on first step."""
        from homellm.engine.constrain import compile_response_format
        return compile_response_format(self.tokenizer, response_format)

    def _stream(self, ids, params, max_tokens, stop, top_logprobs, grammar=None,
                logit_bias: dict | None = None, logprobs: bool = True, **extra) -> Iterator[Step]:
        if extra:
            raise TypeError(f"unknown generation options: {', '.join(sorted(extra))}")
        text = TextStream(self.tokenizer, stop)
        timings = Timings()
        steps = self.engine.generate(ids, params, max_tokens, self.tokenizer.eos_ids,
                                     top_logprobs, timings,
                                     constraint=grammar.start() if grammar else None,
                                     logit_bias=check_logit_bias(logit_bias, self.args.vocab_size),
                                     logprobs=logprobs)
        try:
            for step in steps:
                if step.finish_reason is not None:
                    step.text = text.flush()
                    yield step
                    return
                step.text, hit = text.feed(step.token)
                yield step
                if hit:
                    steps.close()
                    yield Step(token=None, finish_reason="stop", timings=timings)
                    return
        except NonFiniteLogitsError as e:
            raise self.explain_nonfinite(getattr(e, "ids", None) or ids) from None
        finally:
            steps.close()

    def explain_nonfinite(self, ids: list[int]) -> NonFiniteLogitsError:
        """The error for NaN/inf logits, naming the first stage of the network that produced
        them: the prompt's first tokens are run again through a numpy reference of the
        network (model/numpy_forward.py) read afresh from the file."""
        from homellm.model.formats import open_checkpoint
        from homellm.model.numpy_forward import first_nonfinite
        source = self.checkpoint.source
        try:
            ckpt = open_checkpoint(source, as_numpy=True)
            where = first_nonfinite(ckpt.args, ckpt.tensors, list(ids)[:DIAGNOSE_TOKENS])
        except (HomellmError, MemoryError, ValueError, OSError):
            where = None
        if where is not None:
            return NonFiniteLogitsError(
                f"{source}: the model produced NaN/inf values at {where}: its weights or "
                f"metadata are broken (the numpy reference of the network finds the same)", where)
        return NonFiniteLogitsError(
            f"{source}: the model produced NaN/inf logits (its weights or metadata are broken, "
            f"or its values overflow the runtime's arithmetic)")

    def session(self, system: str | None = None) -> "ChatSession":
        return ChatSession(self, system)


class ChatSession:
    """A conversation whose earlier turns stay in the KV cache between replies."""

    def __init__(self, model: Model, system: str | None = None):
        self.model = model
        self.system = system
        self.messages: list[dict] = []

    def reset(self, system: str | None = None):
        self.system = system if system is not None else self.system
        self.messages = []

    def conversation(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def send(self, text: str, **options) -> Iterator[Step]:
        """Stream the reply to a user message; the reply (even a stopped one) joins the history."""
        self.messages.append({"role": "user", "content": text})
        reply = {"role": "assistant", "content": ""}
        try:
            for step in self.model.chat(self.conversation(), **options):
                reply["content"] += step.text
                yield step
        finally:
            self.messages.append(reply)


def release_free_heap():
    """Return freed heap pages to the OS (glibc keeps them otherwise); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def weight_bytes_per_token(ckpt) -> int:
    """Bytes of stored weights one decode step reads: every tensor of the checkpoint but the
    embedding table, of which a step reads one row (a tied head reads all of it)."""
    tensors = ckpt.tensors
    total = sum(t.nbytes for name, t in tensors.items() if name != "model.embed_tokens.weight")
    if ckpt.args.tie_word_embeddings:
        total += tensors["model.embed_tokens.weight"].nbytes
    return int(total)


def default_threads() -> int:
    """Threads for the C runtime ($HOMELLM_THREADS, capped to the CPUs; engine/kernels/threads.py)."""
    from homellm.engine.kernels.threads import default_threads as threads
    return threads()


def _gpu_present() -> bool:
    """Whether a CUDA GPU may be here, without importing torch where there is no NVIDIA driver."""
    if not os.path.exists("/proc/driver/nvidia/version"):
        return False
    import torch
    return torch.cuda.is_available()


def native_runtime(ckpt, device: str | None, dtype, quant: str | None) -> bool:
    """Whether `load` runs this checkpoint on the C runtime: a GGUF file on the CPU, its weights
    as stored (no dtype or quant asked for), every tensor a type the kernels take, and the
    kernels built. HOMELLM_RUNTIME=torch forces the PyTorch network."""
    from homellm.engine.kernels import build, native
    if os.environ.get("HOMELLM_RUNTIME", "") == "torch" or ckpt.format != "gguf":
        return False
    if dtype is not None or quant is not None or device not in (None, "cpu"):
        return False
    if device is None and _gpu_present():
        return False
    return not native.unsupported(ckpt.tensors, ckpt.args) and build.load() is not None


@dataclass
class Opened:
    """A model file opened for running: what `load` (the CLI, the Python API) and the server's
    registry both start from."""

    path: Path
    checkpoint: object        # model/formats Checkpoint (tensors handed to the network)
    network: object           # kernels.NativeModel (the C runtime) or a PyTorch Llama
    tokenizer: object         # homellm.tokenizer.Tokenizer
    ctx: int
    weight_bytes_per_token: int
    load_s: float

    @property
    def native(self) -> bool:
        from homellm.engine.kernels.native import NativeModel
        return isinstance(self.network, NativeModel)


def open_model(name_or_path: str | Path | None = None, device: str | None = None,
               dtype: "torch.dtype | None" = None, ctx: int | None = None, quant: str | None = None,
               progress=None, adapter: str | Path | None = None, threads: int | None = None,
               trained_ctx: bool = False, kv_dtype: str = "f16", native_adapter: bool = True) -> Opened:
    """Open a model by catalog name, GGUF path or Hugging Face folder (None: the default model):
    its tokenizer and its network, on the C runtime where the file allows (`native_runtime`),
    else on PyTorch. The one way a model is opened, for `load` and for the server.

    ctx: positions of the network's own KV cache (None: min(4096, what the model was trained
    on)); trained_ctx: cap a given ctx at what the model was trained on; kv_dtype: the C
    runtime's own cache, "f16" (as llama.cpp keeps it) or "f32". threads: the C
    runtime's (None: $HOMELLM_THREADS, else one per core). $HOMELLM_KERNEL_PATH (scalar, avx2,
    avxvnni, avx512, neon, i8mm) picks the C runtime's kernels (default: the best this CPU has).
    adapter: a LoRA adapter folder (PEFT layout, `homellm tune`) applied without merging: on
    the C runtime beside the base's own blocks (engine/lora.py, as the server applies adapters
    per request), or with native_adapter=False (or where the C runtime does not run the
    model) on the PyTorch network, the adapter's layers beside the base's."""
    from homellm.catalog import resolve
    from homellm.model.formats import open_checkpoint
    from homellm.tokenizer import Tokenizer

    t0 = time.perf_counter()
    device = check_device(device)
    path = resolve(name_or_path if isinstance(name_or_path, Path) or name_or_path is None
                   else str(name_or_path))
    ckpt = open_checkpoint(path, as_numpy=True)  # (GGUF floats as numpy: no torch yet)
    trained = ckpt.args.max_position_embeddings
    ctx = min(ctx, trained) if ctx and trained_ctx else ctx or min(DEFAULT_CTX, trained)
    try:
        tokenizer = Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template)
    except HomellmError as e:
        raise about(path, e) from None
    wbytes = weight_bytes_per_token(ckpt)
    native = (adapter is None or native_adapter) and native_runtime(ckpt, device, dtype, quant)
    check_ctx(ckpt.args, ctx, device, bytes_per_value=2 if native else 4)
    if native:
        from homellm.engine.kernels.native import NativeModel, pack_rows
        kernel_path = kernel_path_setting()
        with _kv_allocation(ctx):  # (the raw blocks only where the path computes on them)
            network = NativeModel(ckpt.args, ckpt.tensors, ctx, threads=threads or default_threads(),
                                  path=kernel_path, keep_raw=not pack_rows(kernel_path),
                                  kv_dtype=kv_dtype)
        ckpt.tensors = {}  # the C runtime holds what it computes on (packed Q4 replaces the raw rows)
        if adapter is not None:
            from homellm.engine.lora import LoraAdapter
            network.adapter = LoraAdapter(Path(adapter).expanduser(), ckpt.args)
    else:
        from homellm.engine.loader import build_model
        if ckpt.format == "gguf":
            ckpt = open_checkpoint(path)  # floats as torch tensors
        network = build_model(ckpt, device=device, dtype=dtype, quant=quant, progress=progress)
        if adapter is not None:
            from homellm.train.adapter import apply_adapter
            apply_adapter(network, Path(adapter))
    # a loaded model never exports (`homellm export` reads the file afresh): free the
    # vocabulary lists, and hand the heap that loading used back to the system
    ckpt.tokenizer.gguf_fields = None
    tokenizer.forget_source_fields()
    release_free_heap()
    return Opened(Path(path), ckpt, network, tokenizer, ctx, wbytes, time.perf_counter() - t0)


def kernel_path_setting() -> str | None:
    """$HOMELLM_KERNEL_PATH: the C runtime's kernels (scalar, avx2, avxvnni, avx512, neon, i8mm;
    unset or auto: the best this CPU has), or a HomellmError naming it."""
    value = os.environ.get("HOMELLM_KERNEL_PATH", "").strip().lower()
    if value in ("", "auto"):
        return None
    from homellm.engine.kernels import PATHS, cpu_features
    if value not in PATHS:
        raise HomellmError(f"HOMELLM_KERNEL_PATH={value!r}: expected one of {', '.join(PATHS)} or auto")
    runs = cpu_features().get("paths", ["scalar"])
    if value not in runs:
        raise HomellmError(f"HOMELLM_KERNEL_PATH={value}: this CPU runs the {', '.join(runs)} kernels")
    return value


def load(name_or_path: str | Path | None = None, device: str | None = None,
         dtype: "torch.dtype | None" = None, ctx: int | None = None, quant: str | None = None,
         progress=None, adapter: str | Path | None = None, native_adapter: bool = True) -> Model:
    """Load a model by catalog name, GGUF path or Hugging Face folder (None: the default model).

    adapter: a LoRA adapter folder (PEFT layout, `homellm tune`) applied without merging (see
    open_model)."""
    opened = open_model(name_or_path, device, dtype, ctx, quant, progress, adapter,
                        native_adapter=native_adapter)
    # the C decoder computes on the file's own blocks: only when the weights are kept as stored
    with _kv_allocation(opened.ctx):
        model = Model(opened.checkpoint, opened.network, opened.tokenizer, opened.ctx,
                      opened.load_s, fast_decode=quant is None and adapter is None)
    model.weight_bytes_per_token = opened.weight_bytes_per_token
    return model


def about(path, error: HomellmError) -> HomellmError:
    """`error` with the model's path in front, where its message does not name it already
    (a tokenizer or chat template error says what is wrong, not in which file)."""
    if str(path) in str(error):
        return error
    from homellm.errors import ModelFileError
    return ModelFileError(f"{path}: {error}")


DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(device: "str | torch.device | None") -> str | None:
    """`device` as a string torch accepts, or HomellmError saying what is wrong with it:
    an unknown kind ('tpu'), CUDA asked for where there is none, a GPU index past the last."""
    if device is None or str(device) == "cpu":
        return None if device is None else "cpu"
    text = str(device)
    import torch
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise HomellmError(f"device {text!r}: expected 'cpu', 'cuda' or 'cuda:N' (an NVIDIA GPU), "
                           f"or 'mps' (Apple)")
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise HomellmError(f"device {text!r}: this machine has no Apple GPU (MPS); use 'cpu'")
        return text
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
                   else "PyTorch finds no CUDA GPU (driver missing or no device)")
            raise HomellmError(f"device {text!r}: {why}; use 'cpu'")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise HomellmError(f"device {text!r}: this machine has {n} CUDA GPU"
                               f"{'s' if n != 1 else ''} (cuda:0{f'..cuda:{n - 1}' if n > 1 else ''})")
    return text


def kv_cache_bytes(args, ctx: int, bytes_per_value: int) -> int:
    """Bytes of keys and values that `ctx` positions take: 2 x layers x kv heads x head_dim."""
    return 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * ctx * bytes_per_value


def _memory_bytes(device: str | None) -> int | None:
    """Memory the KV cache can live in: the GPU's for CUDA, else the machine's RAM."""
    if device is not None and device.startswith("cuda"):
        import torch
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_ctx(args, ctx: int, device: str | None = None, bytes_per_value: int = 2) -> None:
    """HomellmError when `ctx` positions cannot be held: fewer than 2, or a KV cache larger
    than the memory of the machine (or GPU) it would live in."""
    if ctx < 2:
        raise HomellmError(f"ctx {ctx}: the context must hold at least 2 tokens")
    need, have = kv_cache_bytes(args, ctx, bytes_per_value), _memory_bytes(device)
    if have is not None and need > have:
        raise HomellmError(
            f"--ctx {ctx}: the KV cache would take {_gib(need)}, more than the "
            f"{_gib(have)} of memory here; the model was trained on "
            f"{args.max_position_embeddings} positions (at most {have // (need // ctx)} fit)")


@contextlib.contextmanager
def _kv_allocation(ctx: int):
    """Turns a failed allocation of the KV cache (an address-space limit, or memory that
    check_ctx could not see) into a HomellmError naming --ctx."""
    try:
        yield
    except MemoryError as e:
        raise HomellmError(f"--ctx {ctx}: not enough memory for the model and a KV cache of "
                           f"{ctx} positions ({e or 'MemoryError'}); use a smaller --ctx") from None
    except RuntimeError as e:
        if "out of memory" not in str(e).lower() and "can't allocate" not in str(e).lower():
            raise
        raise HomellmError(f"--ctx {ctx}: not enough memory for the model and a KV cache of "
                           f"{ctx} positions ({e}); use a smaller --ctx") from None
