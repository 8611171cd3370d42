"""Fine-tuning: LoRA adapters over a frozen (float or int8/int4) base, SFT and DPO loops.

    from homellm.train import TuneConfig, sft, dpo
    result = sft.train(TuneConfig(model="smollm2", data="chats.jsonl", out="my-adapter"))

Modules: config (typed run config), lora (LoRALinear, merge), frozen (int8/int4 and bfloat16
frozen base layers), base (the trainable model from a checkpoint), fused (SwiGLU keeping fewer
activations), batches (tokenize, mask, micro-batches), loss (masked cross-entropy on labelled
positions only, sequence log-probs, DPO), schedule (warmup + cosine), checkpoint (exact
resume), adapter (PEFT layout), session (what both loops share: data, model, optimizer,
processes), sft and dpo (the loops), merge (adapter -> full model).
"""
from homellm.train.config import LoraConfig, TuneConfig  # noqa: F401
