"""The fast paths of `homellm pretrain` keep the math: block causal attention equals SDPA's
(loss and gradients), a torch.compile'd run equals the eager one and resumes bit for bit, a
compile that fails falls back to eager cleanly, and MFU's peak follows the CPU's datapath."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from homellm.train.pretrain import (LMLoss, PretrainConfig, block_causal_attention, build_model,
                                    choose_attention, describe_peak_flops, model_args, pretrain,
                                    use_blocks)

sys.path.insert(0, os.path.dirname(__file__))
from pretrain_fixtures import make_corpus  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("pretrain-speed"), n_docs=150, vocab=384)


def test_block_attention_equals_sdpa_with_grouped_heads():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, d = 2, 4, 2, 300, 16  # 300: blocks of 128, 128 and a short 44
    q, k, v = (torch.randn(B, h, T, d, generator=g, dtype=torch.float64).requires_grad_()
               for h in (H, Hkv, Hkv))
    go = torch.randn(B, T, H * d, generator=g, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref = ref.transpose(1, 2).reshape(B, T, H * d)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    got = block_causal_attention(q, k, v)
    grads = torch.autograd.grad(got, (q, k, v), go)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(None, 1e-5), (torch.bfloat16, 3e-2)])
def test_the_loss_and_gradients_with_block_attention_equal_sdpa(dtype, tol):
    args = model_args(2, 300, 320)
    x = torch.randint(0, 300, (2, 301), generator=torch.Generator().manual_seed(0))
    results = []
    for blocks in (False, True):
        model = build_model(args, seed=1)
        if blocks:
            use_blocks(model)
        loss = LMLoss(model, dtype)(x[:, :-1], x[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=tol / 10, atol=0)
    for name, g in ref_grads.items():  # relative to the largest gradient of each tensor
        err = (grads[name] - g).abs().max() / g.abs().max()
        assert err < tol, (name, err.item())


def test_attention_auto_takes_blocks_on_a_cpu_at_short_contexts():
    args = model_args(4, 8192, 512)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    c = PretrainConfig(seq_len=512)
    assert choose_attention(c, args, cpu, compiled=False) == "blocks"
    assert choose_attention(c, args, cuda, compiled=True) == "sdpa"
    assert choose_attention(replace(c, seq_len=1024), args, cpu, compiled=False) == "sdpa"
    assert choose_attention(replace(c, seq_len=1024), args, cpu, compiled=True) == "blocks"
    assert choose_attention(replace(c, seq_len=2048), args, cpu, compiled=True) == "sdpa"
    # the probabilities kept for the backward bound it: depth 20 at 1024, 8 a micro-batch: 3.5 GB
    assert choose_attention(replace(c, seq_len=1024), model_args(20, 8192, 1024), cpu, True) == "sdpa"
    assert choose_attention(replace(c, attention="sdpa"), args, cpu, compiled=False) == "sdpa"


ZEN4 = """vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
cpu MHz\t\t: 2600.000
flags\t\t: fpu sse2 avx fma avx2 avx512f avx512dq avx512_bf16 avx512_vnni
"""
SAPPHIRE_RAPIDS = """vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
cpu MHz\t\t: 2000.000
flags\t\t: fpu sse2 avx fma avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""
HASWELL = """vendor_id\t: GenuineIntel
cpu family\t: 6
cpu MHz\t\t: 3000.000
flags\t\t: fpu sse2 avx fma avx2
"""


def test_the_peak_follows_the_datapath_not_the_instruction_set():
    cpu = torch.device("cpu")
    # Zen 4 runs AVX512 on 256-bit units: 2 FMA pipes x 8 float32 lanes x 2 = 32 a cycle
    peak, how = describe_peak_flops(cpu, "float32", 2, cpuinfo=ZEN4)
    assert peak == 2 * 2600e6 * 32 and "256-bit" in how and "32 float32 FLOPs/cycle" in how
    assert describe_peak_flops(cpu, "bfloat16", 1, cpuinfo=ZEN4)[0] == 2600e6 * 64  # BF16 dot: x2
    # an Intel core with AVX512 has 512-bit FMA units; AMX multiplies bf16 tiles
    assert describe_peak_flops(cpu, "float32", 1, cpuinfo=SAPPHIRE_RAPIDS)[0] == 2000e6 * 64
    assert describe_peak_flops(cpu, "bfloat16", 1, cpuinfo=SAPPHIRE_RAPIDS)[0] == 2000e6 * 1024
    assert describe_peak_flops(cpu, "float32", 4, cpuinfo=HASWELL)[0] == 4 * 3000e6 * 32


def tiny(corpus: Path, out: Path, **kw) -> PretrainConfig:
    base = dict(data=str(corpus), out=str(out), depth=2, seq_len=64, batch_tokens=512,
                device_batch=4, steps=6, lr=3e-3, dtype="bfloat16", threads=1, val_tokens=1024,
                val_every=3)
    return PretrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_a_compiled_run_equals_eager_and_resumes_exactly(corpus, tmp_path):
    events = []
    compiled = pretrain(tiny(corpus, tmp_path / "c"), progress=events.append)  # compile: auto
    start = events[0]
    assert start["compile"] is True and start["attention"] == "blocks"
    assert any(e.get("compiling") for e in events) and any("compiled" in e for e in events)
    assert not any("compile_failed" in e for e in events)
    eager = pretrain(tiny(corpus, tmp_path / "e", compile=False))
    # the same math in other kernels: bf16 roundings apart, the same curve
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=2e-2, atol=0)
    assert abs(compiled.val[-1]["loss"] - eager.val[-1]["loss"]) < 2e-2 * eager.val[-1]["loss"]
    cut = tiny(corpus, tmp_path / "cut")
    pretrain(cut, stop_after=3)
    resumed = pretrain(cut, resume=True)
    assert resumed.losses == compiled.losses  # bit for bit
    assert resumed.val == compiled.val


@pytest.mark.slow
def test_a_failed_compile_falls_back_to_eager_without_a_traceback(corpus, tmp_path):
    """No C++ compiler for inductor (CXX names none; a fresh cache, so nothing compiled
    earlier is reused): a warning, then the run is the eager run exactly."""
    common = ["pretrain", "--data", str(corpus), "--depth", "2", "--seq-len", "64",
              "--batch-tokens", "512", "--device-batch", "4", "--steps", "4", "--threads", "1",
              "--dtype", "bfloat16"]
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), HOMELLM_HOME=str(tmp_path / "home"))
    runs = {}
    for name, extra in (("fallback", []), ("eager", ["--no-compile"])):
        proc = subprocess.run([sys.executable, "-m", "homellm", *common, "--out", str(tmp_path / name),
                               *extra], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        runs[name] = proc.stderr
    assert "compiling the model with torch.compile" in runs["fallback"]
    assert "warning: torch.compile failed" in runs["fallback"] and "C++ compiler" in runs["fallback"]
    assert "compiling" not in runs["eager"] and "eager, blocks attention" in runs["eager"]
    a, b = (json.loads((tmp_path / n / "history.json").read_text()) for n in ("fallback", "eager"))
    assert a["losses"] == b["losses"] and a["val"] == b["val"]
