#!/usr/bin/env bash
# How the heads shipped for SmolLM2-135M-Instruct were made (session 21, docs/benchmarks/h100-sequential-heads-shipped/):
# self-distillation on topic prompts (questions, writing tasks, articles over a list of everyday subjects), the
# shared prompt pool and context prompts made from the pool (summarise, key points, rewrite, questions over
# documents); sequential (Hydra-style) heads, 4 x 2 layers, trained with a KL loss on a frozen base (Medusa-1); the
# weights kept in bf16; a tree fitted to the heads (profile, build) and to the device at every batch bucket (cost
# curve, tune). Run from the checkout's root on a GPU machine:
#
#   MODEL=path/to/SmolLM2-135M-Instruct.Q4_1.gguf DATA=../shared/data WORK=runs/default-heads \
#       scripts/train_default_heads.sh
#
# Every step writes into $WORK and a rerun skips what is done (distillation and training resume where they stopped).
# The shipped rows were answered on two machines, in the same stable random order of the same prompts: 8,895 on a
# CPU in float32 (over sessions 19-20), then 8,832 on an H100 in bf16 (240 s), so a rerun makes rows like them, not
# the same ones. `scripts/gpu_sequential_heads.sh` ran it as device calls of at most ten minutes each.
set -euo pipefail

MODEL=${MODEL:?set MODEL to the base model (.gguf file or directory)}
DATA=${DATA:-../shared/data}
WORK=${WORK:-runs/default-heads}
MEDUSA=${MEDUSA:-python3 -m medusa.cli}
TOPIC_PROMPTS=${TOPIC_PROMPTS:-3600}          # ask / instruct / article prompts over the packaged topic list
CONTEXT_PROMPTS=${CONTEXT_PROMPTS:-6000}      # summarise / key points / rewrite / documents-QA prompts
ROWS=${ROWS:-17727}                           # answers distilled (the shipped heads': 17,727)
DISTILL_TOKENS=${DISTILL_TOKENS:-384}         # new tokens per answer
DISTILL_BATCH=${DISTILL_BATCH:-384}
HELDOUT=${HELDOUT:-300}                       # distilled conversations kept out of training, for the profile
PROFILE_ROWS=${PROFILE_ROWS:-150}
EPOCHS=${EPOCHS:-3}
BATCHES=${BATCHES:-1,2,4,8,16,32,64}          # batch buckets the trees are tuned for

mkdir -p "$WORK"
pool="$DATA/prompts/gsm8k_train.jsonl,$DATA/prompts/gpteacher_codegen.json,$DATA/prompts/gpteacher_roleplay.json"

echo "== prompts $(date +%T)"
[ -f "$WORK/topics.jsonl" ] || $MEDUSA prompts --tasks ask,instruct,article --count "$TOPIC_PROMPTS" \
    --output "$WORK/topics.jsonl"
[ -f "$WORK/context_prompts.jsonl" ] || $MEDUSA prompts --data "$pool" --output "$WORK/context_prompts.jsonl" \
    --count "$CONTEXT_PROMPTS" --documents 4 --max-prompt-chars 3500

echo "== distill $(date +%T)"
$MEDUSA distill --model "$MODEL" --data "$WORK/topics.jsonl,$pool,$WORK/context_prompts.jsonl" \
    --output "$WORK/distilled.jsonl" --limit "$ROWS" --max-new-tokens "$DISTILL_TOKENS" \
    --batch-size "$DISTILL_BATCH" --max-prompt-tokens 1400

echo "== split: $HELDOUT random rows held out $(date +%T)"
python3 - "$WORK" "$HELDOUT" <<'PY'
import random, sys
from pathlib import Path
work, held = Path(sys.argv[1]), int(sys.argv[2])
rows = [line + "\n" for line in (work / "distilled.jsonl").read_text(encoding="utf-8").split("\n") if line.strip()]
random.Random(0).shuffle(rows)
(work / "heldout.jsonl").write_text("".join(rows[:held]), encoding="utf-8")
(work / "train.jsonl").write_text("".join(rows[held:]), encoding="utf-8")
print(f"{len(rows)} rows: {len(rows) - held} to train on, {held} held out")
PY

echo "== train $(date +%T)"
heads="$WORK/run/heads"
if [ ! -f "$heads/medusa_heads.safetensors" ]; then
    $MEDUSA train --model "$MODEL" --data "$WORK/train.jsonl" --output "$WORK/run" --stage 1 --loss kl \
        --head-type sequential --num-heads 4 --num-layers 2 --share-lm-head --epochs "$EPOCHS" --batch-size 32 \
        --max-tokens 40000 --max-length 1900 --lr 1e-3 --checkpoint-every 100 --resume
    # Shipped in bf16 (14.6 MB), before the profile fingerprints them.
    python3 -c "
import sys; from safetensors.torch import load_file, save_file
state = load_file(sys.argv[1]); save_file({k: v.bfloat16() for k, v in state.items()}, sys.argv[1])" \
        "$heads/medusa_heads.safetensors"
fi
cp "$WORK/run/head_accuracy.json" "$heads/"

echo "== tree profile/build, cost curve, tune $(date +%T)"
[ -f "$heads/tree_profile.json" ] || $MEDUSA tree profile --model "$MODEL" --heads "$heads" \
    --data "$WORK/heldout.jsonl" --limit "$PROFILE_ROWS"
$MEDUSA tree build --heads "$heads" --nodes 64
[ -f "$WORK/curve/cost_curve.json" ] || $MEDUSA bench --cost-curve --model "$MODEL" --heads "$heads" \
    --sizes 1,2,4,8,16,32,48,64 --batch-sizes "$BATCHES" --repeats 5 --step-warmup 2 --output-dir "$WORK/curve"
$MEDUSA tree tune --heads "$heads" --cost-curve "$WORK/curve/cost_curve.json" --batch-sizes "$BATCHES" --max-nodes 64
echo "== done $(date +%T): $heads (on a CPU, \`medusa tree tune --heads $heads --device cpu --lookup 0\` adds its entry)"
