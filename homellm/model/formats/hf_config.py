"""Hugging Face config.json <-> ModelArgs, for each family the network covers (model/config.py).

Each family's keys are transformers' own (LlamaConfig, MistralConfig, Qwen2Config,
Qwen3Config, Gemma3TextConfig, Phi3Config, StableLmConfig, GPTNeoXConfig), in both the
transformers 4 spelling (rope_theta, rope_scaling, rotary_pct, rope_local_base_freq) and the
transformers 5 one (rope_parameters). Whatever a family's class would do with a key we cannot
run (StableLM's per-head q/k LayerNorm, Gemma 3's bidirectional attention) is refused with a
ValueError naming the key; hf.py turns it into an error naming the file.
"""
from __future__ import annotations

import math
from dataclasses import fields

import numpy as np

from homellm.model.config import ModelArgs, kind_of

# model_type -> the transformers class that `config_from_args` names
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
            "stablelm": "StableLmForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}
# what each class defaults tie_word_embeddings to when config.json leaves it out
TIED_BY_DEFAULT = {"gemma3_text"}
SHAPE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings")


def _rope(config: dict, params: dict | None) -> tuple[float | None, dict | None, float | None]:
    """(rope_theta, rope_scaling or None, partial_rotary_factor) from either spelling."""
    params = dict(params or {})
    theta = params.pop("rope_theta", None)
    partial = params.pop("partial_rotary_factor", None)
    scaling = config.get("rope_scaling")
    if scaling is None and kind_of(params) != "default":
        scaling = params
    if scaling is not None and kind_of(scaling) == "default":
        scaling = None
    return theta, scaling, partial


def _longrope(scaling: dict, config: dict, args: dict) -> dict:
    """Phi-3's LongRoPE as transformers computes it, with the attention factor written out, and
    the context capped at original_max_position_embeddings: homellm uses the short factors,
    which transformers switches away from past that length."""
    scaling = dict(scaling)
    original = scaling.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
    if not isinstance(original, int) or original < 2:
        raise ValueError(f"rope_scaling (longrope) needs original_max_position_embeddings, got {original!r}")
    scaling["original_max_position_embeddings"] = original
    if scaling.get("attention_factor") is None:
        factor = scaling.get("factor") or args["max_position_embeddings"] / original
        factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        # as the float32 it is multiplied in (and a GGUF stores): the shortest decimal of it
        scaling["attention_factor"] = float(str(np.float32(factor)))
    scaling["rope_type"] = "longrope"
    scaling.pop("type", None)
    args["max_position_embeddings"] = min(args["max_position_embeddings"], original)
    return scaling


def args_from_config(config: dict) -> ModelArgs:
    """ModelArgs from a config.json dict; KeyError for a missing required key, ValueError for
    a value or a family the network does not run."""
    model_type = config.get("model_type")
    if model_type == "gemma3" and isinstance(config.get("text_config"), dict):
        raise ValueError("model_type 'gemma3' is Gemma 3 with its vision tower; homellm runs the "
                         "text-only checkpoints (model_type 'gemma3_text', Gemma3ForCausalLM)")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(sorted(FAMILIES))})")
    args: dict = {k: config[k] for k in SHAPE if config.get(k) is not None}
    for k in ("num_attention_heads", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        config[k]  # KeyError names it
    args.setdefault("num_key_value_heads", config["num_attention_heads"])
    args.setdefault("max_position_embeddings", 2048)
    args["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", model_type in TIED_BY_DEFAULT))
    args["model_type"] = model_type
    eps = config.get("rms_norm_eps", config.get("layer_norm_eps"))
    if eps is not None:
        args["rms_norm_eps"] = eps
    theta, scaling, partial = _rope(config, config.get("rope_parameters")
                                    if model_type != "gemma3_text" else None)
    act = config.get("hidden_act", config.get("hidden_activation"))
    if act is not None:
        args["hidden_act"] = act

    if model_type in ("llama", "mistral", "qwen2", "qwen3"):
        bias = bool(config.get("attention_bias", False))
        args["attention_bias"] = True if model_type == "qwen2" else bias
        args["o_bias"] = bias and model_type in ("llama", "qwen3")
        args["mlp_bias"] = bool(config.get("mlp_bias", False)) and model_type == "llama"
        args["qk_norm"] = model_type == "qwen3"
        window = config.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
            window = None
        if window is not None:
            args["sliding_window"] = window
            types = config.get("layer_types")
            if model_type in ("qwen2", "qwen3") and types is None:
                first = config.get("max_window_layers", args["num_hidden_layers"])
                types = ["sliding_attention" if i >= first else "full_attention"
                         for i in range(args["num_hidden_layers"])]
            args["layer_types"] = types if model_type != "mistral" else None
    elif model_type == "gemma3_text":
        if config.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=true (an embedding model): homellm runs "
                             "causal language models")
        h = args["hidden_size"]
        args.update(norm_offset=1.0, qk_norm=True, sandwich_norms=True, embed_scale=float(h) ** 0.5,
                    attention_bias=bool(config.get("attention_bias", False)),
                    query_pre_attn_scalar=config.get("query_pre_attn_scalar", 256),
                    final_logit_softcapping=config.get("final_logit_softcapping"))
        # (attn_logit_softcapping: transformers' Gemma3Attention does not hand it to the
        # attention function, nor does llama.cpp read it for gemma3: it changes nothing)
        args["o_bias"] = args["attention_bias"]
        args.setdefault("head_dim", 256)
        args.setdefault("hidden_act", "gelu_pytorch_tanh")
        args.setdefault("rms_norm_eps", 1e-6)
        params = config.get("rope_parameters") or {}
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
        theta = full.pop("rope_theta", config.get("rope_theta", 1_000_000.0))
        args["rope_local_theta"] = local.get("rope_theta", config.get("rope_local_base_freq", 10_000.0))
        if kind_of(local) != "default":
            raise ValueError(f"rope_parameters.sliding_attention: rope_type {kind_of(local)!r} is not "
                             f"supported for the sliding layers (supported: 'default')")
        scaling = config.get("rope_scaling") or (full if kind_of(full) != "default" else None)
        window = config.get("sliding_window")
        if window is not None:
            pattern = config.get("sliding_window_pattern", 6)
            args["sliding_window"] = window
            args["layer_types"] = config.get("layer_types") or [
                "sliding_attention" if (i + 1) % pattern else "full_attention"
                for i in range(args["num_hidden_layers"])]
    elif model_type == "phi3":
        if config.get("sliding_window") is not None:
            args["sliding_window"] = config["sliding_window"]
        partial = config.get("partial_rotary_factor", partial)
        args["attention_bias"] = False
    elif model_type == "stablelm":
        if config.get("qk_layernorm"):
            raise ValueError("qk_layernorm=true (StableLM 2 12B's per-head q/k LayerNorm) is not supported")
        if config.get("use_parallel_residual"):
            raise ValueError("use_parallel_residual=true for StableLM (a shared input norm) is not supported")
        args.update(norm_type="layer", attention_bias=bool(config.get("use_qkv_bias", False)))
        partial = config.get("partial_rotary_factor", partial if partial is not None else 0.25)
        args.setdefault("rms_norm_eps", 1e-5)
    elif model_type == "gpt_neox":
        bias = bool(config.get("attention_bias", True))
        args.update(norm_type="layer", attention_bias=bias, o_bias=bias, mlp_bias=True, mlp_gated=False,
                    parallel_residual=bool(config.get("use_parallel_residual", True)))
        args.setdefault("hidden_act", "gelu")
        args["num_key_value_heads"] = args["num_attention_heads"]
        theta = config.get("rotary_emb_base", theta)
        partial = config.get("rotary_pct", partial if partial is not None else 0.25)
        args.setdefault("rms_norm_eps", 1e-5)

    theta = theta if theta is not None else config.get("rope_theta")
    if theta is not None:
        args["rope_theta"] = theta
    if partial is not None:
        args["partial_rotary_factor"] = partial
    if scaling is not None:
        if kind_of(scaling) == "longrope":
            scaling = _longrope(scaling, config, args)
        args["rope_scaling"] = scaling
    if config.get("head_dim") is None and model_type != "gemma3_text":
        args.pop("head_dim", None)
    known = {f.name for f in fields(ModelArgs)}
    return ModelArgs(**{k: v for k, v in args.items() if k in known})


def _unsupported(args: ModelArgs, family: str, allowed: set[str]) -> None:
    """ValueError if args use an option that `family`'s transformers class cannot express."""
    plain = ModelArgs(hidden_size=2, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                      intermediate_size=1, vocab_size=1)
    options = ("o_bias", "mlp_bias", "mlp_gated", "hidden_act", "norm_type", "norm_offset", "qk_norm",
               "sandwich_norms", "parallel_residual", "partial_rotary_factor", "embed_scale",
               "query_pre_attn_scalar", "final_logit_softcapping",
               "sliding_window", "layer_types", "rope_local_theta")
    bad = [name for name in options if name not in allowed and getattr(args, name) != getattr(plain, name)]
    if bad:
        raise ValueError(f"a {family} config cannot express {', '.join(bad)} of this network")


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def config_from_args(args: ModelArgs) -> dict:
    """The config.json dict with which the family's transformers class builds this network."""
    family = args.model_type if args.model_type in FAMILIES else "llama"
    if family in ("llama", "mistral", "qwen2") and args.qk_norm:
        family = "qwen3"
    base = {"architectures": [FAMILIES[family]], "model_type": family,
            "hidden_size": args.hidden_size, "num_hidden_layers": args.num_hidden_layers,
            "num_attention_heads": args.num_attention_heads, "intermediate_size": args.intermediate_size,
            "vocab_size": args.vocab_size, "max_position_embeddings": args.max_position_embeddings,
            "tie_word_embeddings": args.tie_word_embeddings, "rope_theta": args.rope_theta,
            "pad_token_id": None}  # (the tokenizer's files say; some classes' defaults lie past the vocabulary)
    scaling = dict(args.rope_scaling) if args.rope_scaling else None
    if scaling and kind_of(scaling) == "freq_factors":
        raise ValueError("rope_scaling freq_factors (a GGUF rope_freqs tensor) has no transformers "
                         "spelling; write the model to GGUF instead")
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        if family == "mistral" and args.attention_bias:
            family = base["model_type"] = "llama"
            base["architectures"] = [FAMILIES["llama"]]
        if family == "llama" and args.sliding_window is not None and not args.attention_bias \
                and not args.o_bias and not args.mlp_bias and args.layer_types is None:
            family = base["model_type"] = "mistral"
            base["architectures"] = [FAMILIES["mistral"]]
        if family == "llama" and args.attention_bias != args.o_bias and args.attention_bias:
            family = base["model_type"] = "qwen2"
            base["architectures"] = [FAMILIES["qwen2"]]
        allowed = {"o_bias", "mlp_bias", "qk_norm", "sliding_window", "layer_types"}
        if family == "qwen2" and args.o_bias:
            raise ValueError("a qwen2 config cannot express o_bias without q/k/v bias")
        _unsupported(args, family, allowed)
        base.update(num_key_value_heads=args.num_key_value_heads, head_dim=args.head_dim,
                    rms_norm_eps=args.rms_norm_eps, rope_scaling=scaling, hidden_act="silu",
                    attention_bias=args.attention_bias if family != "qwen2" else False,
                    mlp_bias=args.mlp_bias)
        if args.sliding_window is not None:
            base["sliding_window"] = args.sliding_window
            if family in ("qwen2", "qwen3"):
                base.update(use_sliding_window=True, layer_types=args.layer_types or
                            ["sliding_attention"] * args.num_hidden_layers)
            elif args.layer_types is not None and "full_attention" in args.layer_types:
                raise ValueError(f"a {family} config cannot mix sliding and full attention layers")
        elif family in ("qwen2", "qwen3"):
            base["use_sliding_window"] = False
        elif family == "mistral":
            base["sliding_window"] = None
        return base
    if family == "gemma3_text":
        _unsupported(args, family, {"o_bias", "hidden_act", "norm_offset", "qk_norm", "sandwich_norms",
                                     "embed_scale", "query_pre_attn_scalar",
                                     "final_logit_softcapping", "sliding_window", "layer_types",
                                     "rope_local_theta"})
        if not (args.qk_norm and args.sandwich_norms and args.norm_offset == 1
                and abs(args.embed_scale - args.hidden_size ** 0.5) < 1e-6 * args.embed_scale):
            raise ValueError("a gemma3_text config always has q/k norms, sandwich norms, (1 + w) norms "
                             "and sqrt(hidden_size) embedding scale")
        full = {"rope_type": "default", "rope_theta": args.rope_theta}
        if scaling:
            full = dict(scaling, rope_theta=args.rope_theta)
        base.update(num_key_value_heads=args.num_key_value_heads, head_dim=args.head_dim,
                    rms_norm_eps=args.rms_norm_eps, hidden_activation={"gelu_tanh": "gelu_pytorch_tanh"}
                    .get(args.hidden_act, args.hidden_act), attention_bias=args.attention_bias,
                    query_pre_attn_scalar=_int_if_whole(args.query_pre_attn_scalar or args.head_dim),
                    final_logit_softcapping=args.final_logit_softcapping,
                    sliding_window=args.sliding_window,
                    layer_types=[("sliding_attention" if args.window(i) else "full_attention")
                                 for i in range(args.num_hidden_layers)],
                    rope_parameters={"full_attention": full, "sliding_attention": {
                        "rope_type": "default", "rope_theta": args.rope_local_theta or args.rope_theta}})
        base.pop("rope_theta")
        return base
    if family == "phi3":
        _unsupported(args, family, {"partial_rotary_factor", "sliding_window"})
        if args.attention_bias:
            raise ValueError("a phi3 config cannot express q/k/v biases")
        if scaling and kind_of(scaling) == "longrope":
            base["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
        base.update(num_key_value_heads=args.num_key_value_heads, rms_norm_eps=args.rms_norm_eps,
                    partial_rotary_factor=args.partial_rotary_factor, rope_scaling=scaling,
                    sliding_window=args.sliding_window, hidden_act="silu")
        return base
    if family == "stablelm":
        _unsupported(args, family, {"norm_type", "partial_rotary_factor"})
        base.update(num_key_value_heads=args.num_key_value_heads, layer_norm_eps=args.rms_norm_eps,
                    partial_rotary_factor=args.partial_rotary_factor, use_qkv_bias=args.attention_bias,
                    qk_layernorm=False, use_parallel_residual=False, hidden_act="silu", rope_scaling=scaling)
        return base
    # gpt_neox
    _unsupported(args, family, {"o_bias", "mlp_bias", "mlp_gated", "hidden_act", "norm_type",
                                "parallel_residual", "partial_rotary_factor"})
    if args.num_key_value_heads != args.num_attention_heads or not args.mlp_bias \
            or args.attention_bias != args.o_bias:
        raise ValueError("a gpt_neox config needs as many kv heads as heads, MLP biases, and "
                         "attention biases on all of q, k, v and the output or on none")
    base.update(layer_norm_eps=args.rms_norm_eps, rotary_pct=args.partial_rotary_factor,
                rotary_emb_base=args.rope_theta, use_parallel_residual=args.parallel_residual,
                attention_bias=args.attention_bias, rope_scaling=scaling,
                hidden_act={"gelu_tanh": "gelu_new"}.get(args.hidden_act, args.hidden_act))
    return base
