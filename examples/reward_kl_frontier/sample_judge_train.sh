#!/usr/bin/env bash
# The unattended preference-data loop with the command line, on stories260K:
#   story openings -> preftune sample (4 continuations each) -> preftune judge (sentiment words, best vs worst)
#   -> preftune train (DPO on the pairs).
# Settings through the environment: MODEL, OUT, PROMPTS, NUM_SAMPLES, MAX_NEW_TOKENS, TRAIN_OVERRIDES (key=value ...),
# PREFTUNE (the command, default `preftune`), PYTHON.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL=${MODEL:-$HERE/../../../shared/assets/stories260K-hf}
OUT=${OUT:-$HERE/work/loop}
PROMPTS=${PROMPTS:-400}
NUM_SAMPLES=${NUM_SAMPLES:-4}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-48}
PREFTUNE=${PREFTUNE:-preftune}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"

"$PYTHON" "$HERE/openings.py" "$OUT/prompts.jsonl" "$PROMPTS"
$PREFTUNE sample --model "$MODEL" --prompts "$OUT/prompts.jsonl" --out "$OUT/candidates.jsonl" \
    --num-samples "$NUM_SAMPLES" --max-new-tokens "$MAX_NEW_TOKENS" --temperature 1.0 --seed 0 --batch-size 256
$PREFTUNE judge --candidates "$OUT/candidates.jsonl" --judge preftune.judges:sentiment_word_score \
    --out "$OUT/pairs.jsonl" --mode best_vs_worst
cat > "$OUT/train.yaml" <<YAML
model_name_or_path: $MODEL
dataset: $OUT/pairs.jsonl
output_dir: $OUT/dpo
beta: 0.1
learning_rate: 5.0e-4
num_train_epochs: 2
per_device_train_batch_size: 8
max_length: 128
save_strategy: "no"
logging_steps: 10
YAML
# shellcheck disable=SC2086
$PREFTUNE train "$OUT/train.yaml" ${TRAIN_OVERRIDES:-}
