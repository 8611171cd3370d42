"""Export a model to the standard formats: GGUF (for llama.cpp and Ollama) or a Hugging Face
safetensors folder (for transformers and vLLM), with its tokenizer and chat template."""
from __future__ import annotations

from pathlib import Path

FORMATS = ("gguf", "hf")
HF_DTYPES = ("bfloat16", "float16", "float32")
DESCRIPTIVE = ("name", "license", "organization", "basename", "finetune", "size_label",
               "description", "author", "url")


def export(source, out: Path, fmt: str, out_type: str | None = None, progress=None) -> Path:
    """Write the model `source` (catalog name or path) to `out` as GGUF or a HF folder.

    out_type: for GGUF one of f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 (default f16);
    for HF one of bfloat16, float16, float32 (default bfloat16). Quantized GGUF blocks of the
    requested type are copied as they are; anything else is dequantized then converted.
    """
    import torch

    from homellm.catalog.library import resolve
    from homellm.errors import HomellmError
    from homellm.model.formats import open_checkpoint
    from homellm.model.formats.gguf import OUT_TYPES, write_gguf
    from homellm.model.formats.hf import write_hf
    from homellm.tokenizer import Tokenizer

    if fmt not in FORMATS:
        raise HomellmError(f"export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    ckpt = open_checkpoint(resolve(source))
    tokenizer = Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template)
    out = Path(out)
    if fmt == "gguf":
        out_type = out_type or "f16"
        if out_type not in OUT_TYPES:
            raise HomellmError(f"GGUF type {out_type!r}: expected one of {', '.join(OUT_TYPES)}")
        metadata = {k: v for k, v in ckpt.metadata.items()  # descriptive keys; the writer
                    if k in DESCRIPTIVE and isinstance(v, str)}  # sets file_type itself
        return write_gguf(out, ckpt.args, ckpt.tensors, out_type=out_type,
                          tokenizer_fields=tokenizer.to_gguf_fields(),
                          chat_template=ckpt.chat_template, metadata=metadata, progress=progress)
    out_type = out_type or "bfloat16"
    if out_type not in HF_DTYPES:
        raise HomellmError(f"HF dtype {out_type!r}: expected one of {', '.join(HF_DTYPES)}")
    tokenizer_json, tokenizer_config = tokenizer.to_hf_files()
    return write_hf(out, ckpt.args, ckpt.tensors, dtype=getattr(torch, out_type),
                    tokenizer_json=tokenizer_json, tokenizer_config=tokenizer_config,
                    chat_template=ckpt.chat_template, progress=progress)
