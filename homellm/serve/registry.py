"""The models a server offers: loaded on first request, kept alive while used, unloaded when
idle (like Ollama's keep_alive), all within a memory budget.

Each loaded model is opened as `homellm.load` opens it (api.open_model): a GGUF file of the
types the C runtime takes runs on it (a `NativeModel`, no PyTorch in the process), anything
else on the PyTorch network; with its tokenizer and a BatchEngine with its own thread. A
model counts against the budget with its file size plus its prefix cache; loading one that
does not fit first unloads the least recently used idle models, and answers 503 if that is
not enough.

LoRA adapters (`serve --adapter NAME=PATH`, ServeConfig.adapters) belong to the first model
(the base): each is a model id of its own, `base:NAME`, listed and chosen like any other; a
request for it runs on the base's engine with the adapter applied to its rows by the C runtime
(engine/lora.py), beside requests for the base or for other adapters, on one copy of the base's
weights. The adapters load with their base.

Conversations keep their keys and values: a request naming one (`prompt_cache_key`, the web
app's conversation) is kept in memory while there is room and on disk under
$HOMELLM_HOME/kvcache/<model file's hash>/ when it leaves memory or the model unloads
(engine/kv_persist.py, within ServeConfig.kv_disk_bytes); `forget_cache` deletes one.
"""
from __future__ import annotations

import asyncio
import gc
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from homellm.serve.errors import APIError, model_not_found

DEFAULT_CTX = 4096
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class ServeConfig:
    ctx: int | None = None            # positions per sequence; None: min(4096, the model's)
    max_batch: int = 8                # sequences decoded together, per model
    max_queue: int = 64               # requests waiting for a slot, per model
    keep_alive_s: float = 300.0       # unload this long after the last request; < 0: never
    memory_budget_bytes: int | None = None  # None: 3/4 of the machine's memory
    prefix_cache_bytes: int = 256 << 20     # per model
    prefill_chunk_busy: int = 128     # prompt positions per step while others decode
    threads: int | None = None        # matmul threads; None: one per physical core
    adapters: dict[str, str | Path] = field(default_factory=dict)  # NAME -> LoRA folder, on the first model
    kv_disk_bytes: int = 4 << 30      # conversations' keys and values on disk, per model; 0: none
    kv_dir: str | Path | None = None  # None: $HOMELLM_HOME/kvcache

    def __post_init__(self):
        if self.ctx is not None and self.ctx < 2:
            raise ValueError(f"ctx={self.ctx}: the context must hold at least 2 tokens")
        if self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch}: expected at least 1")
        if self.max_queue < 0:
            raise ValueError(f"max_queue={self.max_queue}: expected 0 or more")
        for name in self.adapters:
            if not ADAPTER_NAME.fullmatch(name):
                raise ValueError(f"adapter name {name!r}: expected letters, digits, '.', '_' or '-'")


def machine_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class LoadedModel:
    id: str
    path: Path
    tokenizer: object         # homellm.tokenizer.Tokenizer
    network: object           # kernels.NativeModel (the C runtime) or a PyTorch Llama
    engine: object            # homellm.engine.batch.BatchEngine
    ctx: int
    nbytes: int               # what it counts against the memory budget
    load_s: float
    created: int = field(default_factory=lambda: int(time.time()))
    in_use: int = 0           # open requests
    last_used: float = field(default_factory=time.monotonic)
    adapters: dict = field(default_factory=dict)  # NAME -> engine.lora.LoraAdapter (C runtime)
    adapter: object = None    # this id's adapter: a view of its base (`base`) with one adapter
    base: "LoadedModel | None" = None

    def with_adapter(self, mid: str, name: str) -> "LoadedModel":
        """This model's view for adapter `name`, named `mid`: requests run on this engine with
        the adapter on their rows; scoring and embeddings through the adapter too."""
        from dataclasses import replace

        from homellm.engine.kernels.native import AdaptedModel
        adapter = self.adapters[name]
        return replace(self, id=mid, adapter=adapter, base=self, network=AdaptedModel(self.network, adapter))

    @property
    def idle_s(self) -> float:
        if self.in_use or not self.engine.idle:
            return 0.0
        return time.monotonic() - max(self.last_used, self.engine.last_active)


def load_model(model_id: str, source: str | Path, config: ServeConfig,
               adapters: dict[str, str | Path] | None = None) -> LoadedModel:
    """Open a model (api.open_model) with a BatchEngine and its LoRA adapters (NAME -> folder;
    on the C runtime only) (blocking; seconds)."""
    from homellm.api import open_model
    from homellm.engine.batch import BatchConfig, BatchEngine
    from homellm.engine.lora import LoraAdapter

    t0 = time.perf_counter()
    # the network's own cache serves scoring (echoed prompts' logprobs, embeddings): float32
    # keys and values there; generation's slots keep float16 (BatchEngine)
    opened = open_model(source if isinstance(source, Path) else str(source), device="cpu",
                        ctx=config.ctx or DEFAULT_CTX, trained_ctx=True, threads=config.threads,
                        kv_dtype="f32")
    loras = {name: LoraAdapter(path, opened.checkpoint.args, name)
             for name, path in (adapters or {}).items()} if opened.native else {}
    engine = BatchEngine(opened.network, BatchConfig(
        max_batch=config.max_batch, ctx=opened.ctx, max_queue=config.max_queue,
        prefill_chunk_busy=config.prefill_chunk_busy,
        prefix_cache_bytes=config.prefix_cache_bytes, threads=config.threads),
        kv_store=kv_store_for(opened, config) if opened.native and config.kv_disk_bytes > 0 else None)
    nbytes = size_on_disk(opened.path) + config.prefix_cache_bytes + sum(a.nbytes for a in loras.values())
    return LoadedModel(model_id, opened.path, opened.tokenizer, opened.network, engine, opened.ctx,
                       nbytes, time.perf_counter() - t0, adapters=loras)


def kv_dir(config: ServeConfig) -> Path:
    from homellm.catalog.library import home
    return Path(config.kv_dir) if config.kv_dir is not None else home() / "kvcache"


def kv_store_for(opened, config: ServeConfig):
    """The on-disk keys and values of a model's conversations, tied to its file's hash."""
    from homellm.engine.kv_persist import KVStore
    from homellm.eval.results import model_identity
    return KVStore(kv_dir(config), model_identity(opened.path), opened.checkpoint.args,
                   budget_bytes=config.kv_disk_bytes)


class ModelRegistry:
    """Model ids -> sources (catalog names or paths); loads and unloads them on demand.

    `models`: {id: source}. `aliases`: other names a client may use for an id.
    """

    def __init__(self, models: dict[str, str | Path], config: ServeConfig | None = None,
                 aliases: dict[str, str] | None = None):
        if not models:
            raise ValueError("a server needs at least one model")
        self.sources = dict(models)
        self.aliases = dict(aliases or {})
        self.config = config or ServeConfig()
        # adapter ids (base:NAME) -> (base id, NAME, folder); listed after their base
        base = next(iter(self.sources))
        self.adapters = {f"{base}:{name}": (base, name, Path(path))
                         for name, path in self.config.adapters.items()}
        listed = {}
        for mid, source in self.sources.items():
            listed[mid] = source
            for aid, (b, _, _) in self.adapters.items():
                if b == mid:
                    listed[aid] = source
        self.sources = listed
        self.budget = self.config.memory_budget_bytes or machine_memory_bytes() * 3 // 4
        self.loaded: dict[str, LoadedModel] = {}
        self.keep_alive: dict[str, float] = {}  # per-model keep_alive_s set by requests
        self.loads = self.unloads = 0
        self._lock = threading.Lock()        # guards `loaded`
        self._load_lock = threading.Lock()   # one load at a time

    @classmethod
    def from_names(cls, names: list[str] | None, config: ServeConfig | None = None) -> "ModelRegistry":
        """The models for `homellm serve -m NAME ...`: catalog names or paths; none given,
        the whole catalog (and the default model, pulled on first use)."""
        from homellm import catalog
        from homellm.catalog.library import ALIASES, DEFAULT_NAME, name_from
        models, aliases = {}, {}
        if not names:
            for entry in catalog.list_models():
                models[entry.name] = entry.name
            models.setdefault(DEFAULT_NAME, DEFAULT_NAME)
            names = []
        for name in names:
            entry = catalog.library.find(name)
            path = Path(name).expanduser()
            if entry is not None:
                models[entry.name] = entry.name
                if name != entry.name:
                    aliases[name] = entry.name
            elif path.exists():
                mid = name_from(path.stem if path.is_file() else path.name)
                models[mid] = path.resolve()
                aliases[str(name)] = aliases[path.name] = mid
            elif ALIASES.get(name, name) in catalog.library.KNOWN:  # pulled on first use
                canonical = ALIASES.get(name, name)
                models[canonical] = canonical
                if name != canonical:
                    aliases[name] = canonical
            else:
                raise catalog.library.not_found(name)
        for alias, target in ALIASES.items():
            if target in models:
                aliases.setdefault(alias, target)
        for mid in list(models):  # a family name finds its one model ("smollm2" -> "smollm2:135m")
            family = mid.split(":")[0]
            if ":" in mid and sum(1 for m in models if m.split(":")[0] == family) == 1:
                aliases.setdefault(family, mid)
        return cls(models, config, aliases)

    def ids(self) -> list[str]:
        return list(self.sources)

    def context_of(self, mid: str) -> int:
        """The context a model will be served with, read from its metadata (no loading; a
        known model that is not pulled yet is pulled)."""
        from homellm.catalog import resolve
        from homellm.model.formats import open_checkpoint
        source = self.sources[mid]
        args = open_checkpoint(resolve(source if isinstance(source, Path) else str(source))).args
        return min(self.config.ctx or DEFAULT_CTX, args.max_position_embeddings)

    def resolve_id(self, name) -> str:
        if not isinstance(name, str) or not name:
            raise APIError(400, "model: expected the id of a model (GET /v1/models lists them)",
                           param="model", code="invalid_value")
        mid = name if name in self.sources else self.aliases.get(name)
        if mid is None and ":" in name:  # an adapter of a base named by an alias
            base, _, suffix = name.rpartition(":")
            base = base if base in self.sources else self.aliases.get(base)
            mid = f"{base}:{suffix}" if f"{base}:{suffix}" in self.adapters else None
        if mid is None:
            raise model_not_found(name, self.ids())
        return mid

    def adapters_of(self, mid: str) -> dict[str, Path]:
        """NAME -> folder of the adapters that load with base model `mid`."""
        return {name: path for b, name, path in self.adapters.values() if b == mid}

    def check_adapters(self):
        """Read every adapter against its base's shapes now (HomellmError naming the file):
        `serve --adapter` fails at start, not at the first request."""
        from homellm.catalog import resolve
        from homellm.engine.lora import LoraAdapter
        from homellm.model.formats import open_checkpoint
        for aid, (base, name, path) in self.adapters.items():
            source = self.sources[base]
            args = open_checkpoint(resolve(source if isinstance(source, Path) else str(source))).args
            LoraAdapter(path, args, name)

    # -- use --------------------------------------------------------------------------------

    async def acquire(self, name: str) -> LoadedModel:
        """The loaded model for `name` (loading it first if needed), marked in use: call
        `release` when the request is over."""
        mid = self.resolve_id(name)
        if mid in self.adapters:
            base_id, adapter, _ = self.adapters[mid]
            base = await self.acquire(base_id)
            if adapter not in base.adapters:
                self.release(base)
                raise APIError(400, f"model {mid!r}: its adapter runs on the C runtime, and the base "
                               f"model {base_id!r} runs on PyTorch here (a GGUF file of the types "
                               "the C runtime takes is needed)", param="model", code="unsupported")
            return base.with_adapter(mid, adapter)
        with self._lock:
            model = self.loaded.get(mid)
            if model is not None:
                model.in_use += 1
                model.last_used = time.monotonic()
                return model
        model = await asyncio.to_thread(self._load, mid)
        with self._lock:
            model.in_use += 1
            model.last_used = time.monotonic()
        return model

    def release(self, model: LoadedModel):
        model = model.base if model.base is not None else model
        with self._lock:
            model.in_use = max(0, model.in_use - 1)
            model.last_used = time.monotonic()

    def _load(self, mid: str) -> LoadedModel:
        from homellm.errors import HomellmError
        with self._load_lock:
            with self._lock:
                if mid in self.loaded:  # another request loaded it meanwhile
                    return self.loaded[mid]
            source = self.sources[mid]
            need = self._estimate(source)
            self._make_room(need)
            try:
                model = load_model(mid, source, self.config, self.adapters_of(mid))
            except HomellmError as e:
                raise APIError(500, f"model {mid!r} could not be loaded: {e}", type="server_error",
                               param="model", code="model_load_failed") from None
            with self._lock:
                self.loaded[mid] = model
                self.loads += 1
            return model

    def _estimate(self, source) -> int:
        from homellm.catalog import library
        try:
            path = Path(source) if isinstance(source, Path) else library.find(str(source))
            path = path.path if hasattr(path, "path") else path
            size = size_on_disk(path) if path is not None and path.exists() else 0
        except OSError:
            size = 0
        return size + self.config.prefix_cache_bytes

    def _make_room(self, need: int):
        while True:
            with self._lock:
                used = sum(m.nbytes for m in self.loaded.values())
                if used + need <= self.budget:
                    return
                idle = sorted((m for m in self.loaded.values() if m.idle_s > 0),
                              key=lambda m: m.last_used)
            if not idle:
                raise APIError(503, f"not enough memory to load another model: {need >> 20} MB "
                               f"needed, {(self.budget - used) >> 20} MB of the "
                               f"{self.budget >> 20} MB budget free, and every loaded model is busy",
                               type="server_error", code="insufficient_memory",
                               headers={"Retry-After": "10"})
            self.unload(idle[0].id)

    def unload(self, mid: str) -> bool:
        from homellm.api import release_free_heap
        with self._lock:
            model = self.loaded.pop(mid, None)
        if model is None:
            return False
        model.engine.close()
        self.unloads += 1
        del model
        gc.collect()
        release_free_heap()
        return True

    def forget_cache(self, key: str):
        """Delete a conversation's keys and values (it was deleted): from every loaded model's
        memory and from disk for every model."""
        from homellm.engine.kv_persist import remove_everywhere
        with self._lock:
            models = list(self.loaded.values())
        for m in models:
            m.engine.forget(key)
        remove_everywhere(kv_dir(self.config), key)

    def keep_alive_of(self, mid: str) -> float:
        """Seconds model `mid` stays loaded once idle: its own (a request's keep_alive, as
        Ollama's API sets it) or the server's."""
        return self.keep_alive.get(mid, self.config.keep_alive_s)

    def unload_idle(self) -> list[str]:
        """Unload models idle for longer than keep_alive; returns their ids."""
        with self._lock:
            stale = []
            for m in self.loaded.values():
                keep = self.keep_alive_of(m.id)
                if keep >= 0 and (m.idle_s > keep or (keep == 0 and m.idle_s > 0)):
                    stale.append(m.id)
        return [mid for mid in stale if self.unload(mid)]

    async def reap_forever(self, every_s: float = 1.0):
        """The background task that applies keep_alive."""
        while True:
            await asyncio.sleep(every_s)
            await asyncio.to_thread(self.unload_idle)

    def close(self):
        for mid in list(self.loaded):
            self.unload(mid)

    def describe(self) -> list[dict]:
        """For GET /v1/models and /health."""
        out = []
        for mid in self.sources:
            if mid in self.adapters:
                base, name, _ = self.adapters[mid]
                out.append({"id": mid, "loaded": base in self.loaded, "base": base, "adapter": name})
                continue
            m = self.loaded.get(mid)
            out.append({"id": mid, "loaded": m is not None,
                        **({"ctx": m.ctx, "in_use": m.in_use, "idle_s": round(m.idle_s, 1),
                            "engine": m.engine.stats()} if m is not None else {})})
        return out

