"""`homellm run/chat --adapter` (homellm.load(..., adapter=)) on the C runtime: the adapter's
low-rank rows beside the GGUF file's own blocks (engine/lora.py, as the server applies them),
equal to the PyTorch network with the adapter's layers (native_adapter=False) within the C
runtime's tolerance (2e-3 x max|logit|)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from homellm.engine import kernels

sys.path.insert(0, os.path.dirname(__file__))
from gguf_fixtures import TINY_LLAMA, write_tiny_gguf  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.status()}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from homellm.api import load
    from homellm.train.adapter import save_adapter
    from homellm.train.config import LoraConfig
    from homellm.train.lora import apply_lora, lora_layers
    root = tmp_path_factory.mktemp("run-adapter")
    gguf_path = write_tiny_gguf(root / "tiny.gguf", TINY_LLAMA, "f32")
    model = load(gguf_path, device="cpu", dtype=torch.float32)
    lora = LoraConfig(rank=4, alpha=8)
    apply_lora(model.network, lora, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model.network):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    save_adapter(model.network, lora, root / "adapter")
    return gguf_path, root / "adapter"


def test_an_adapter_runs_on_the_c_runtime_as_on_pytorch(tiny):
    from homellm.api import load
    gguf_path, adapter = tiny
    native = load(gguf_path, ctx=64, adapter=adapter)
    torch_side = load(gguf_path, ctx=64, adapter=adapter, device="cpu", dtype=torch.float32,
                      native_adapter=False)
    base = load(gguf_path, ctx=64)
    assert native.runtime == "native" and torch_side.runtime == "torch"
    ids = list(range(3, 40))
    got, ref = native.logits(ids), torch_side.logits(ids)
    # the C runtime's tolerance (tests/test_native.py; here its float16 KV cache rounds)
    assert (got - ref).abs().max() < 2e-3 * ref.abs().max()
    assert (base.logits(ids) - ref).abs().max() > 1e-2 * ref.abs().max()  # the adapter counts
    def greedy(m):
        return [s.token for s in m.generate(ids, max_tokens=12, temperature=0) if s.token is not None]
    assert greedy(native) == greedy(torch_side) != greedy(base)


def test_a_bad_adapter_for_the_c_runtime_is_a_clear_error(tiny, tmp_path):
    from homellm.api import load
    from homellm.errors import HomellmError
    gguf_path, _ = tiny
    with pytest.raises(HomellmError, match="not a LoRA adapter"):
        load(gguf_path, ctx=64, adapter=tmp_path)
