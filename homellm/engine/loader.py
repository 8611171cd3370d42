"""Checkpoint -> a runnable Llama: built on the meta device, weights assigned without copies.

What each weight becomes is decided by what the checkpoint records, never by a file name:
- float tensors: kept in the requested dtype (or quantized when `quant` asks for it);
- GGUF blocks on the CPU: our C kernels compute on the memory-mapped blocks themselves
  (engine/kernels, GGMLLinear: Q4_0, Q4_1, Q8_0, F16, F32; exact to the stored weights), so
  loading converts nothing; other types, or a machine where the kernels cannot be built, use
  PyTorch's int4/int8 layers (engine/quant.py), exact where the packing allows;
- the token embedding keeps its raw blocks and dequantizes the rows it looks up;
- where q/k/v (and gate/up) are packed GGMLLinear layers, the layer also gets a fused
  projection (`qkv_proj`, `gate_up_proj`: kernels.FusedProjection) over the same packed
  weights: the activation is quantized once, and SiLU(gate) * up comes out of the kernel;
- on a float32 CPU model with the kernels built, attention of prefill chunks runs in C
  (`attention_fn`: kernels.CausalAttention, causal part only, GQA without expanding).
No float copy of the whole model is ever held for a quantized checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from homellm.errors import ModelFileError
from homellm.model.formats.checkpoint import Checkpoint, GGMLTensor
from homellm.model.llama import Llama, rope_inv_freq

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _expect(ckpt: Checkpoint, name: str, shape: tuple[int, ...]):
    t = ckpt.tensors.get(name)
    if t is None:
        raise ModelFileError(f"{ckpt.source}: tensor {name} is missing")
    if tuple(t.shape) != tuple(shape):
        raise ModelFileError(f"{ckpt.source}: tensor {name} has shape {tuple(t.shape)}, "
                             f"expected {tuple(shape)} from the model config")
    return t


def _float(t, dtype, device) -> torch.Tensor:
    t = t.dequantize(torch.float32) if isinstance(t, GGMLTensor) else t
    return t.to(device=device, dtype=dtype)


def _set_module(root: nn.Module, path: str, module: nn.Module):
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _set_param(model: nn.Module, ckpt: Checkpoint, name: str, shape: tuple[int, ...], device):
    """A norm's weight or bias from the checkpoint, float32 (as the norms compute)."""
    owner, _, leaf = name.rpartition(".")
    value = _float(_expect(ckpt, name, shape), torch.float32, device)
    setattr(model.get_submodule(owner), leaf, nn.Parameter(value, requires_grad=False))


def _linear(ckpt, path, out_f, in_f, bias, dtype, device, quant):
    """quant: "keep" (what the file records), "none" (float), "int8" or "int4"."""
    from homellm.engine import quant as q
    weight = _expect(ckpt, f"{path}.weight", (out_f, in_f))
    b = _float(_expect(ckpt, f"{path}.bias", (out_f,)), dtype, device) if bias else None
    if isinstance(weight, GGMLTensor) and quant == "keep" and device.type == "cpu":
        from homellm.engine import kernels
        if weight.ggml_type in kernels.SUPPORTED_TYPES and kernels.available():
            return kernels.GGMLLinear(weight, b, hi=True)
        return q.linear_from_ggml(weight, b)
    mode = "none" if quant == "keep" else quant
    return q.linear_from_float(_float(weight, dtype, device), b, mode).to(device)


def _fuse_projections(layer: nn.Module):
    """Give a decoder layer one-call q/k/v and SiLU-gated gate/up projections where its
    layers are packed GGMLLinear (same weights, no copy); leave it as it is otherwise."""
    from homellm.engine import kernels
    attn, mlp = layer.self_attn, layer.mlp
    groups = [(attn, "qkv_proj", (attn.q_proj, attn.k_proj, attn.v_proj), False)]
    if mlp.gate_proj is not None and mlp.act is F.silu:  # the kernel's epilogue is SiLU
        groups.append((mlp, "gate_up_proj", (mlp.gate_proj, mlp.up_proj), True))
    for owner, name, parts, glu in groups:
        try:
            setattr(owner, name, kernels.FusedProjection(list(parts), glu=glu))
        except ValueError:
            pass  # not all packed (other ggml types, other CPUs): the separate layers run


def _attach_attention(model: Llama, device: torch.device, dtype: torch.dtype):
    """Causal attention in C for prefill (engine/kernels CausalAttention) on float32 CPU
    models where the kernels built with a vector path (at T=512: AVX512 3x, AVX2 1.8x faster
    than SDPA; AVX-VNNI's is AVX2's, ARM64's NEON; the portable scalar path is slower); SDPA
    stays otherwise."""
    from homellm.engine import kernels
    if device.type != "cpu" or dtype != torch.float32 or not kernels.available() \
            or kernels.cpu_features().get("path", "scalar") == "scalar":
        return
    fn = kernels.CausalAttention()
    for layer in model.model.layers:
        layer.self_attn.attention_fn = fn


def build_model(ckpt: Checkpoint, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, quant: str | None = None,
                progress=None) -> Llama:
    """A Llama in eval mode with the checkpoint's weights.

    quant: None keeps what the checkpoint records (GGUF blocks -> int4/int8 layers, float
    stays float); "none" dequantizes everything to `dtype`; "int8"/"int4" quantize float
    weights at load time.
    """
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    args = ckpt.args
    model = Llama(args, device="meta")
    h, d = args.hidden_size, args.head_dim
    shapes = {"self_attn.q_proj": (args.num_attention_heads * d, h),
              "self_attn.k_proj": (args.num_key_value_heads * d, h),
              "self_attn.v_proj": (args.num_key_value_heads * d, h),
              "self_attn.o_proj": (h, args.num_attention_heads * d),
              "mlp.gate_proj": (args.intermediate_size, h),
              "mlp.up_proj": (args.intermediate_size, h),
              "mlp.down_proj": (h, args.intermediate_size)}
    mode = quant if quant is not None else "keep"
    if mode not in ("keep", "none", "int8", "int4"):
        raise ValueError(f"quant={quant!r}: expected None, 'none', 'int8' or 'int4'")
    total = args.num_hidden_layers + 2
    for i in range(args.num_hidden_layers):
        prefix = f"model.layers.{i}"
        layer = model.model.layers[i]
        for lin in LINEARS:
            owner, _, leaf = lin.partition(".")
            meta = getattr(layer.get_submodule(owner), leaf)
            if meta is None:  # (no gate in a plain MLP: GPT-NeoX)
                continue
            module = _linear(ckpt, f"{prefix}.{lin}", *shapes[lin], meta.bias is not None, dtype,
                             device, mode)
            _set_module(model, f"{prefix}.{lin}", module)
        if mode == "keep":
            _fuse_projections(layer)
        for name, param in list(layer.named_parameters()):  # norms: weights and LayerNorm biases
            if "norm" in name.rsplit(".", 2)[-2]:
                _set_param(model, ckpt, f"{prefix}.{name}", tuple(param.shape), device)
        if progress:
            progress(i + 1, total)
    for name, param in list(model.model.norm.named_parameters()):
        _set_param(model, ckpt, f"model.norm.{name}", tuple(param.shape), device)

    from homellm.engine import quant as q
    embed = _expect(ckpt, "model.embed_tokens.weight", (args.vocab_size, h))
    head_name = "model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight"
    head = _expect(ckpt, head_name, (args.vocab_size, h))
    if isinstance(embed, GGMLTensor) and device.type == "cpu" and mode != "none":
        model.model.embed_tokens = q.GGMLEmbedding(embed)  # rows dequantized on lookup
    else:
        model.model.embed_tokens = nn.Embedding.from_pretrained(_float(embed, dtype, device))
    if args.tie_word_embeddings and isinstance(model.model.embed_tokens, nn.Embedding) \
            and mode in ("keep", "none"):
        model.lm_head = nn.Linear(h, args.vocab_size, bias=False, device="meta")
        model.lm_head.weight = model.model.embed_tokens.weight  # shared, as in transformers
    else:
        model.lm_head = _linear(ckpt, head_name.removesuffix(".weight"), args.vocab_size, h,
                                False, dtype, device, mode)
    if progress:
        progress(total, total)
    model.inv_freq = rope_inv_freq(args).to(device)
    model.inv_freq_local = rope_inv_freq(args, local=True).to(device)
    _attach_attention(model, device, dtype)
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.device.type == "meta":
            raise ModelFileError(f"{ckpt.source}: no weights for {name}")
    model.requires_grad_(False)
    if device.type == "cpu":  # the C kernels' pool and torch's threads must not spin at each other
        from homellm.engine.kernels.threads import torch_beside_kernels
        torch_beside_kernels(model)
    return model.eval()
