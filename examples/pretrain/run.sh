#!/usr/bin/env bash
# Train your own model from public text, end to end, offline, in under an hour on a laptop CPU:
# openly licensed text -> corpus -> tokenizer -> a pretrained base -> a chat fine-tune -> GGUF
# -> chat. Run from the repository root:
#
#     apt-get install python3.11-doc            # Python's docs (once, as root)
#     bash examples/pretrain/run.sh             # WORK=/tmp/homellm-pretrain-example by default
#
# SMOKE=1 runs every step with tiny settings (a minute or two), to check the pipeline.
set -euo pipefail

WORK=${WORK:-/tmp/homellm-pretrain-example}
HOMELLM=${HOMELLM:-homellm}
PYTHON=${PYTHON:-python3}
export WORK
export HOMELLM_HOME=${HOMELLM_HOME:-$WORK/home}   # the catalog the example adds `mine` to
HERE=$(cd "$(dirname "$0")" && pwd)

if [[ -n "${SMOKE:-}" ]]; then
  VOCAB=2048 DEPTH=2 SEQ=128 TOKENS=2e5 BATCH=4096 SFT_STEPS=20 VAL_EVERY=10 VAL_TOKENS=4096
else
  # depth 4: width 256, 4 heads, ~5M parameters with an 8k vocabulary; 12M tokens
  # (below the 20 tokens/parameter budget, to fit the hour on a 2-core CPU)
  VOCAB=8192 DEPTH=4 SEQ=256 TOKENS=12e6 BATCH=16384 SFT_STEPS=300 VAL_EVERY=50 VAL_TOKENS=65536
fi

t0=$SECONDS
"$PYTHON" "$HERE/make_sources.py" "$WORK"

rm -rf "$WORK/corpus" "$WORK/base" "$WORK/sft"
"$HOMELLM" data prepare --recipe "$HERE/recipe.toml" --out "$WORK/corpus"
"$HOMELLM" tokenizer train "$WORK/corpus" --vocab-size "$VOCAB"
"$HOMELLM" pretrain --data "$WORK/corpus" --depth "$DEPTH" --seq-len "$SEQ" --tokens "$TOKENS" \
  --batch-tokens "$BATCH" --device-batch 8 --val-every "$VAL_EVERY" --val-tokens "$VAL_TOKENS" --save-every 100 --out "$WORK/base"

echo "--- a sample of the base model (raw text continuation)"
"$HOMELLM" run -m "$WORK/base" --raw --temperature 0.8 --seed 1 --max-tokens 80 \
  "The list type in Python"

# the base learns to chat: LoRA SFT on the other half of chitchat (assistant turns only)
"$HOMELLM" tune sft -m "$WORK/base" --data "$WORK/chitchat-sft.jsonl" --val "$WORK/chitchat-sft-val.jsonl" \
  --steps "$SFT_STEPS" --max-length "$SEQ" --rank 32 --alpha 64 --lr 2e-3 --out "$WORK/sft"

# one model: the adapter merged into the base, in the catalog as `mine`, and as GGUF
rm -f "$WORK/mine.gguf"
"$HOMELLM" merge -m "$WORK/base" --adapter "$WORK/sft" --name mine --gguf "$WORK/mine.gguf" --force
"$HOMELLM" eval ppl -m "$WORK/base",mine --data "$WORK/corpus/val.jsonl" --ctx "$SEQ"   # held-out text

echo "--- a chat with it"
printf 'Hi! How are you today?\n' | "$HOMELLM" chat -m mine --temperature 0.7 --seed 1 --max-tokens 60
echo "--- the GGUF on the C runtime (llama.cpp reads the same file)"
"$HOMELLM" run -m "$WORK/mine.gguf" --temperature 0.7 --seed 1 --max-tokens 60 "What do you like to do?"
echo "done in $(( (SECONDS - t0) / 60 )) min; the validation losses are in $WORK/base/history.json"
