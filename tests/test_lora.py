"""LoRA layers against references: PEFT on the transformers model, merged == unmerged, the
quantized frozen base == its dequantized float weights (values and gradients)."""
import pytest
import torch

from homellm.model.formats.hf import read_hf, write_hf
from homellm.train.adapter import apply_adapter, read_adapter, save_adapter
from homellm.train.base import load_base
from homellm.train.config import LoraConfig
from homellm.train.frozen import FrozenQuantLinear, Int4Weight
from homellm.train.lora import LoRALinear, adapters_disabled, apply_lora, lora_layers, merge_lora
from homellm.train.merge import merged_tensors

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False)


def reference_folder(path, seed=0, **overrides):
    """A random transformers Llama saved to `path` (norms randomized too)."""
    torch.manual_seed(seed)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**CONFIG, **overrides}))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ref.eval().save_pretrained(path)
    return path


def randomize_adapters(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)


def lora_model(folder, lora: LoraConfig, seed=1):
    _, _, model = load_base(folder, tokenizer=False)
    apply_lora(model, lora, seed=0)
    randomize_adapters(model, seed)
    return model.eval()


def test_fresh_adapter_changes_nothing_and_disabling_gives_the_base(tmp_path):
    folder = reference_folder(tmp_path / "base")
    _, _, base = load_base(folder, tokenizer=False)
    tokens = torch.randint(0, 300, (2, 23))
    expected = base(tokens)
    apply_lora(base, LoraConfig(rank=4), seed=0)
    torch.testing.assert_close(base(tokens), expected, rtol=0, atol=0)  # B = 0
    randomize_adapters(base)
    assert (base(tokens) - expected).abs().max() > 1e-3
    with adapters_disabled(base):
        torch.testing.assert_close(base(tokens), expected, rtol=0, atol=0)
    assert all(m.enabled for _, m in lora_layers(base))


@pytest.mark.parametrize("targets", [["q", "v"], ["q", "k", "v", "o", "gate", "up", "down"]])
def test_our_adapter_loads_in_peft_and_outputs_agree(tmp_path, targets):
    folder = reference_folder(tmp_path / "base")
    lora = LoraConfig(rank=4, alpha=8, targets=targets)
    ours = lora_model(folder, lora)
    save_adapter(ours, lora, tmp_path / "adapter", str(folder))
    theirs = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter").eval()
    tokens = torch.randint(0, 300, (2, 31))
    with torch.no_grad():
        expected = theirs(tokens).logits
        torch.testing.assert_close(ours(tokens), expected, rtol=1e-4, atol=1e-4)
    # and PEFT saw a real update: with its adapter off, it differs
    with theirs.disable_adapter(), torch.no_grad():
        assert (theirs(tokens).logits - expected).abs().max() > 1e-3


def test_peft_adapter_loads_in_ours(tmp_path):
    folder = reference_folder(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "down_proj"],
                          lora_dropout=0.0, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    theirs.save_pretrained(tmp_path / "peft")
    _, _, ours = load_base(folder, tokenizer=False)
    lora = apply_adapter(ours, tmp_path / "peft")
    assert lora.rank == 4 and lora.scaling == 4.0 and sorted(lora.targets) == ["down", "o", "q"]
    tokens = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs.eval()(tokens).logits, rtol=1e-4, atol=1e-4)


def test_merged_equals_unmerged(tmp_path):
    folder = reference_folder(tmp_path / "base", tie_word_embeddings=True)
    lora = LoraConfig(rank=8, alpha=16)
    model = lora_model(folder, lora)
    tokens = torch.randint(0, 300, (2, 29))
    with torch.no_grad():
        unmerged = model(tokens)
        merge_lora(model)
        assert not list(lora_layers(model))
        torch.testing.assert_close(model(tokens), unmerged, rtol=1e-5, atol=1e-5)
    # the file path: the adapter folded into the checkpoint's tensors, written and read back
    model = lora_model(folder, lora)
    save_adapter(model, lora, tmp_path / "adapter")
    ckpt = read_hf(folder)
    write_hf(tmp_path / "merged", ckpt.args, merged_tensors(ckpt, tmp_path / "adapter"), dtype=torch.float32)
    _, _, merged = load_base(tmp_path / "merged", tokenizer=False)
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), unmerged, rtol=1e-5, atol=1e-5)


def test_adapter_round_trip_and_errors(tmp_path):
    folder = reference_folder(tmp_path / "base")
    lora = LoraConfig(rank=2, alpha=4, targets=["v", "up"])
    model = lora_model(folder, lora)
    save_adapter(model, lora, tmp_path / "a")
    read_lora, pairs = read_adapter(tmp_path / "a")
    assert read_lora == lora and len(pairs) == 4  # 2 layers x (v_proj, up_proj)
    for name, layer in lora_layers(model):
        torch.testing.assert_close(pairs[name][0], layer.lora_A.detach())
        torch.testing.assert_close(pairs[name][1], layer.lora_B.detach())
    from homellm.errors import HomellmError
    with pytest.raises(HomellmError, match="not a LoRA adapter"):
        read_adapter(tmp_path)
    other = reference_folder(tmp_path / "wide", hidden_size=128, intermediate_size=256)
    _, _, wide = load_base(other, tokenizer=False)
    with pytest.raises(HomellmError, match="do not fit"):
        apply_adapter(wide, tmp_path / "a")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_frozen_quantized_layer_matches_its_dequantized_weight(mode):
    torch.manual_seed(0)
    w = torch.randn(48, 96) * 0.1
    layer = FrozenQuantLinear.from_tensor(w, mode, bias=torch.randn(48))
    dense = layer.dequantize()
    assert (dense - w).abs().max() < (0.01 if mode == "int8" else 0.05)  # it is a quantization of w
    x = torch.randn(3, 5, 96, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, dense, layer.bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    # LoRA over it trains A and B with the same gradients as over the dense weight
    lora_q = LoRALinear(layer, 4, 8)
    lora_d = LoRALinear(torch.nn.Linear(96, 48), 4, 8)
    with torch.no_grad():
        lora_d.base.weight.copy_(dense), lora_d.base.bias.copy_(layer.bias)
        lora_d.lora_A.copy_(lora_q.lora_A), lora_d.lora_B.fill_(0.01), lora_q.lora_B.fill_(0.01)
    lora_d.base.requires_grad_(False)
    for m in (lora_q, lora_d):
        (m(x.detach()) ** 2).sum().backward()
    torch.testing.assert_close(lora_q.lora_A.grad, lora_d.lora_A.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lora_q.lora_B.grad, lora_d.lora_B.grad, rtol=1e-4, atol=1e-5)


def test_int4_from_gguf_blocks_is_the_files_weight(default_gguf):
    from homellm.model.formats import open_checkpoint
    t = open_checkpoint(default_gguf).tensors["model.layers.0.self_attn.q_proj.weight"]
    assert t.type_name == "Q4_1"
    torch.testing.assert_close(Int4Weight.from_ggml(t).dequantize(), t.dequantize(torch.float32),
                               rtol=1e-6, atol=1e-6)


def test_quantized_base_is_close_to_the_float_base(tmp_path):
    folder = reference_folder(tmp_path / "base")
    tokens = torch.randint(0, 300, (1, 30))
    _, _, float_base = load_base(folder, tokenizer=False)
    expected = float_base(tokens)
    for mode, tol in (("int8", 0.05), ("int4", 0.5)):
        _, _, q = load_base(folder, quant=mode, tokenizer=False)
        assert isinstance(q.model.layers[0].self_attn.q_proj, FrozenQuantLinear)
        assert isinstance(q.lm_head, FrozenQuantLinear)
        got = q(tokens)
        assert (got - expected).abs().max() < tol, mode
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.8


def test_swiglu_gradients_match_autograd():
    from homellm.train.fused import SwiGLU
    g = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (g, u))
    torch.testing.assert_close(SwiGLU.apply(g, u), torch.nn.functional.silu(g) * u)
    from homellm.train.fused import GateUpSwiGLU
    y = torch.randn(2, 3, 14, dtype=torch.float64, requires_grad=True)  # [g | u] side by side
    assert torch.autograd.gradcheck(GateUpSwiGLU.apply, (y,))
    torch.testing.assert_close(GateUpSwiGLU.apply(y), torch.nn.functional.silu(y[..., :7]) * y[..., 7:])


def test_bfloat16_base_is_close_to_the_float_base_and_trains_the_same_adapters(tmp_path):
    from homellm.train.frozen import BF16Linear
    from homellm.train.fused import fuse_mlps
    from homellm.train.lora import lora_parameters
    folder = reference_folder(tmp_path / "base", tie_word_embeddings=True)
    tokens = torch.randint(0, 300, (2, 30))
    models = {}
    for dtype in ("float32", "bfloat16"):
        _, _, m = load_base(folder, tokenizer=False, dtype=dtype)
        apply_lora(m, LoraConfig(rank=4), seed=0)
        randomize_adapters(m)
        fuse_mlps(m)
        models[dtype] = m
    b = models["bfloat16"]
    assert isinstance(b.lm_head, BF16Linear) and b.lm_head.weight.data_ptr() == b.model.embed_tokens.weight.data_ptr()
    logits = {k: m(tokens) for k, m in models.items()}
    assert (logits["bfloat16"] - logits["float32"]).abs().max() < 0.05 * logits["float32"].abs().max()
    for m, out in zip(models.values(), logits.values()):
        out.logsumexp(-1).sum().backward()
    for p32, p16 in zip(lora_parameters(models["float32"]), lora_parameters(models["bfloat16"])):
        assert p16.grad.dtype == torch.float32
        torch.testing.assert_close(p16.grad, p32.grad, rtol=0.05, atol=0.02 * p32.grad.abs().max().item())
    # merging a bfloat16 base gives the float update on the bfloat16 weights
    with torch.no_grad():
        before = b(tokens)
        merge_lora(b)
        torch.testing.assert_close(b(tokens), before, rtol=0.02, atol=0.05)


@pytest.mark.parametrize("dtype,quant,bias", [("float32", "none", False), ("float32", "none", True),
                                              ("float32", "int8", False), ("bfloat16", "none", False)])
def test_fused_lora_groups_equal_the_separate_layers(tmp_path, dtype, quant, bias):
    """fuse_lora (q/k/v, gate/up and o, down as grouped matmuls with their own backward) gives
    the separate float32 layers' logits and gradients for every adapter, a disabled adapter
    still gives the base alone, and the fused model merges to the same model. A bfloat16 base
    loses no more against float32 than the separate bfloat16 layers do."""
    from homellm.train.fused import LoRAGroup, fuse_lora, fuse_mlps
    from homellm.train.loss import labelled_logprobs
    from homellm.train.lora import lora_parameters
    folder = reference_folder(tmp_path / "base", attention_bias=bias)
    tokens = torch.randint(0, 300, (2, 17))
    labels = tokens.clone()
    labels[:, :5] = -100

    def run(dtype, fused):
        _, _, m = load_base(folder, tokenizer=False, dtype=dtype, quant=quant)
        apply_lora(m, LoraConfig(rank=4), seed=0)
        randomize_adapters(m, scale=0.2)
        with torch.no_grad():  # A and B both far from their start
            for _, layer in lora_layers(m):
                layer.lora_A.mul_(3)
        if fused:
            assert fuse_lora(m)
            attn = m.model.layers[0].self_attn
            assert isinstance(attn.o_proj.group, LoRAGroup)
            if quant == "none":  # the weights became views of one tensor
                assert attn.k_proj.base.weight.untyped_storage().data_ptr() == \
                    attn.q_proj.base.weight.untyped_storage().data_ptr()
        else:
            fuse_mlps(m)
        logp, _ = labelled_logprobs(m, tokens, labels, checkpointing=True)
        (-logp.sum()).backward()
        with torch.no_grad(), adapters_disabled(m):
            base_logits = m(tokens)
        return m, m(tokens).detach(), [p.grad for p in lora_parameters(m)], base_logits

    _, ref, ref_grads, ref_base = run("float32", False)
    model, got, got_grads, got_base = run(dtype, True)
    if dtype == "float32":
        close = dict(rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got, ref, **close)
        torch.testing.assert_close(got_base, ref_base, **close)
        for g, r in zip(got_grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
    else:
        close = dict(rtol=0.02, atol=0.05)
        torch.testing.assert_close(got, ref, **close)
        torch.testing.assert_close(got_base, ref_base, **close)
        _, _, separate_grads, _ = run(dtype, False)

        def err(grads):  # mean relative error of the adapters' gradients against float32
            return sum(((g - r).norm() / r.norm()).item() for g, r in zip(grads, ref_grads)) / len(ref_grads)
        assert all(g.dtype == torch.float32 for g in got_grads)
        assert err(got_grads) < 1.5 * err(separate_grads) + 0.01, (err(got_grads), err(separate_grads))
    with torch.no_grad():  # the fused layers still merge into the same model, of plain layers
        merge_lora(model)
        attn = model.model.layers[0].self_attn
        assert attn.qkv_proj is None and model.model.layers[0].mlp.gate_up_proj is None
        assert isinstance(attn.q_proj, torch.nn.Linear)
        torch.testing.assert_close(model(tokens), ref, **close)


def test_head_logprobs_gradients_match_autograd():
    """The chunked head's own backward (logits made again, softmax - onehot in place) ==
    autograd through log_softmax, float64 (gradcheck) and with a bias."""
    from homellm.train.loss import _HeadLogprobs
    head = torch.nn.Linear(6, 11, dtype=torch.float64).requires_grad_(False)
    h = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, 10, 3, 7])
    assert torch.autograd.gradcheck(lambda x: _HeadLogprobs.apply(x, t, head), (h,))
    ref = torch.log_softmax(head(h), -1).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(_HeadLogprobs.apply(h, t, head), ref)
