#!/usr/bin/env bash
# How the heads shipped for SmolLM2-135M-Instruct were made: self-distillation on the prompt pool and on
# context-grounded prompts made from the pool's answers; then topic prompts (questions, writing tasks, articles
# over a list of everyday subjects) and document prompts over those answers, distilled too; Medusa-1 training
# with a KL loss on all of it; a tree fitted to the heads (profile, build) and to the device (tune); and an
# evaluation of the trees on Spec-Bench. Run from the checkout's root on a GPU machine:
#
#   MODEL=path/to/SmolLM2-135M-Instruct.Q4_1.gguf DATA=../shared/data WORK=runs/default-heads \
#       scripts/train_default_heads.sh
#
# Every step writes into $WORK and a rerun skips what is done (distillation resumes where it stopped).
# The knobs below are the shipped run's (session 7, docs/benchmarks/h100-heads-v3/); shrink them for a dry run on
# the CPU. The shipped data was made in four rounds: session 3 answered a 6,000-prompt sample of the pool
# (first round below), session 4 the rest of the pool and the context prompts until its time limit (6,144 rows),
# session 7 the topic prompts (3,072 rows in 220 s) and the document prompts over them (1,920 rows in 200 s).
set -euo pipefail

MODEL=${MODEL:?set MODEL to the base model (.gguf file or directory)}
DATA=${DATA:-../shared/data}
WORK=${WORK:-runs/default-heads}
MEDUSA=${MEDUSA:-python3 -m medusa.cli}
CONTEXT_PROMPTS=${CONTEXT_PROMPTS:-6000}      # summarise / key points / rewrite / documents-QA prompts
DISTILL_TOKENS=${DISTILL_TOKENS:-384}         # new tokens per answer
DISTILL_BATCH=${DISTILL_BATCH:-384}
DISTILL_SECONDS=${DISTILL_SECONDS:-450}       # distillation stops here; the rows written are a fair sample
TOPIC_PROMPTS=${TOPIC_PROMPTS:-3600}          # ask / instruct / article prompts over the packaged topic list
TOPIC_SECONDS=${TOPIC_SECONDS:-220}
DOCUMENT_PROMPTS=${DOCUMENT_PROMPTS:-2400}    # summarise / key points / documents-QA over the topic answers
DOCUMENT_SECONDS=${DOCUMENT_SECONDS:-200}
HELDOUT=${HELDOUT:-400}                        # distilled conversations kept out of training, for the profile
LAYERS=${LAYERS:-2}
EPOCHS=${EPOCHS:-3}
TRAIN_BATCH=${TRAIN_BATCH:-32}
SPEC_LIMIT=${SPEC_LIMIT:-4}                   # Spec-Bench questions per category for the tree evaluation
EVAL_TOKENS=${EVAL_TOKENS:-128}

mkdir -p "$WORK"
prompts="$DATA/prompts/gsm8k_train.jsonl,$DATA/prompts/gpteacher_codegen.json,$DATA/prompts/gpteacher_roleplay.json"

echo "== context prompts $(date +%T)"
[ -f "$WORK/context_prompts.jsonl" ] || $MEDUSA prompts --data "$prompts" --output "$WORK/context_prompts.jsonl" \
    --count "$CONTEXT_PROMPTS" --documents 4 --max-prompt-chars 3500

echo "== distill, first round: a sample of the pool $(date +%T)"
if [ ! -s "$WORK/distilled.jsonl" ]; then
    timeout 420 $MEDUSA distill --model "$MODEL" --data "$prompts" --output "$WORK/distilled.jsonl" \
        --max-new-tokens "$DISTILL_TOKENS" --batch-size 256 --limit 6000 || echo "first round stopped after 420s"
fi

echo "== distill, second round: the rest of the pool and the context prompts $(date +%T)"
timeout "$DISTILL_SECONDS" $MEDUSA distill --model "$MODEL" --data "$prompts,$WORK/context_prompts.jsonl" \
    --output "$WORK/distilled.jsonl" --max-new-tokens "$DISTILL_TOKENS" --batch-size "$DISTILL_BATCH" --max-prompt-tokens 1400 \
    || echo "distillation stopped after ${DISTILL_SECONDS}s with $(wc -l < "$WORK/distilled.jsonl") rows"

echo "== topic prompts, distilled (third round) $(date +%T)"
[ -f "$WORK/topics.jsonl" ] || $MEDUSA prompts --tasks ask,instruct,article --count "$TOPIC_PROMPTS" --output "$WORK/topics.jsonl"
timeout "$TOPIC_SECONDS" $MEDUSA distill --model "$MODEL" --data "$WORK/topics.jsonl" --output "$WORK/round_a.jsonl" \
    --max-new-tokens "$DISTILL_TOKENS" --batch-size "$DISTILL_BATCH" || echo "topic round stopped after ${TOPIC_SECONDS}s"

echo "== document prompts over the topic answers, distilled (fourth round) $(date +%T)"
[ -f "$WORK/documents.jsonl" ] || $MEDUSA prompts --data "$WORK/round_a.jsonl" --tasks summarize,key-points,context-qa \
    --count "$DOCUMENT_PROMPTS" --documents 4 --max-prompt-chars 3500 --output "$WORK/documents.jsonl"
timeout "$DOCUMENT_SECONDS" $MEDUSA distill --model "$MODEL" --data "$WORK/documents.jsonl" --output "$WORK/round_b.jsonl" \
    --max-new-tokens "$DISTILL_TOKENS" --batch-size "$DISTILL_BATCH" --max-prompt-tokens 1400 \
    || echo "document round stopped after ${DOCUMENT_SECONDS}s"

echo "== split: $HELDOUT random rows of all rounds held out $(date +%T)"
python3 - "$WORK" "$HELDOUT" <<'PY'
import random, sys
from pathlib import Path
work, held = Path(sys.argv[1]), int(sys.argv[2])
rows = [line + "\n" for name in ("distilled.jsonl", "round_a.jsonl", "round_b.jsonl")
        for line in (work / name).read_text(encoding="utf-8").split("\n") if line.strip()]
random.Random(0).shuffle(rows)
(work / "heldout.jsonl").write_text("".join(rows[:held]), encoding="utf-8")
(work / "train.jsonl").write_text("".join(rows[held:]), encoding="utf-8")
print(f"{len(rows)} rows: {len(rows) - held} to train on, {held} held out")
PY

echo "== train $(date +%T)"
if [ ! -f "$WORK/m1/heads/medusa_heads.safetensors" ]; then
    $MEDUSA train --model "$MODEL" --data "$WORK/train.jsonl" --output "$WORK/m1" --stage 1 --loss kl \
        --num-heads 4 --num-layers "$LAYERS" --share-lm-head --epochs "$EPOCHS" --batch-size "$TRAIN_BATCH" \
        --max-tokens 40000 --max-length 1900 --lr 1e-3
fi
heads="$WORK/m1/heads"
cp "$WORK/m1/head_accuracy.json" "$heads/" 2>/dev/null || true

echo "== tree profile/build/tune $(date +%T)"
$MEDUSA tree profile --model "$MODEL" --heads "$heads" --data "$WORK/heldout.jsonl" --limit "$HELDOUT"
$MEDUSA tree build --heads "$heads" --nodes 64 --plot-dir "$WORK/plots"
$MEDUSA tree tune --model "$MODEL" --heads "$heads" --plot-dir "$WORK/plots" --save-cost-curve "$WORK/tune_cost_curve.json"

echo "== tree evaluate $(date +%T)"
$MEDUSA tree evaluate --model "$MODEL" --heads "$heads" --data "$DATA/spec_bench/question.jsonl" \
    --limit "$SPEC_LIMIT" --sizes 16,32,64 --default-trees --tuned --max-new-tokens "$EVAL_TOKENS" \
    --output "$WORK/tree_evaluate.json" --plot-dir "$WORK/plots"
echo "== done $(date +%T)"
