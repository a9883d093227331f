#!/usr/bin/env bash
# Medusa heads against sequential (Hydra-style) heads on the same self-distilled data (issue 27), one phase per
# device call:
#
#   scripts/gpu_sequential_heads.sh data    # distil answers from the default model; hold some out
#   scripts/gpu_sequential_heads.sh train   # train both head types the same way; profile each; a 64-node tree each
#   scripts/gpu_sequential_heads.sh bench   # Spec-Bench: autoregressive, and each head type alone and with lookup
#
# Expects the default model's GGUF at /root/stage/model.gguf, wheels for gguf/fastapi/uvicorn in $KEEP/.whl and
# the prompts (topics.jsonl from `medusa prompts --tasks ask,instruct,article`, the shared pool files) and the
# Spec-Bench questions in $KEEP/.data. Works in $WORK (kept between calls on one machine); writes under $OUT.
# Every step skips what is done, and the bench resumes, so a phase cut by its time limit can be run again.
set -uo pipefail
phase=$1
KEEP=${KEEP:-.}
WORK=${WORK:-/root/seq}
MEDUSA="python3 -m medusa.cli"
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$KEEP"/.whl/*.whl
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1 MEDUSA_CACHE_DIR=/root/medusa-cache
MODEL=${MODEL:-/root/stage/model.gguf}
DATA=$KEEP/.data
DISTILL_SECONDS=${DISTILL_SECONDS:-240}
HELDOUT=${HELDOUT:-300}
LAYERS=${LAYERS:-1}
EPOCHS=${EPOCHS:-3}
TYPES=${TYPES:-medusa sequential}
LIMIT=${LIMIT:-}  # Spec-Bench questions per category (empty: all 480)
mkdir -p "$WORK" "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null

case $phase in
data)
    timeout "$DISTILL_SECONDS" $MEDUSA distill --model "$MODEL" \
        --data "$DATA/topics.jsonl,$DATA/gsm8k_train.jsonl,$DATA/gpteacher_codegen.json,$DATA/gpteacher_roleplay.json" \
        --output "$WORK/distilled.jsonl" --max-new-tokens "${DISTILL_TOKENS:-384}" --batch-size "${DISTILL_BATCH:-384}" \
        --limit "${DISTILL_LIMIT:-8000}" --max-prompt-tokens 1400 2>&1 | tail -3 \
        || echo "distillation stopped after ${DISTILL_SECONDS}s"
    python3 - "$WORK" "$HELDOUT" <<'PY'
import random, sys
from pathlib import Path
work, held = Path(sys.argv[1]), int(sys.argv[2])
rows = [line + "\n" for line in (work / "distilled.jsonl").read_text(encoding="utf-8").split("\n") if line.strip()]
rows = [row for row in rows if row.rstrip().endswith("}")]  # a line cut by the time limit
random.Random(0).shuffle(rows)
(work / "heldout.jsonl").write_text("".join(rows[:held]), encoding="utf-8")
(work / "train.jsonl").write_text("".join(rows[held:]), encoding="utf-8")
print(f"{len(rows)} rows: {len(rows) - held} to train on, {held} held out")
PY
    cp "$WORK/distilled.jsonl.settings.json" "$OUT/" 2>/dev/null
    wc -l "$WORK"/*.jsonl
    ;;
train)
    for type in $TYPES; do
        run=$WORK/$type
        if [ ! -f "$run/heads/medusa_heads.safetensors" ]; then
            echo "== train $type $(date +%T)"
            $MEDUSA train --model "$MODEL" --data "$WORK/train.jsonl" --output "$run" --stage 1 --loss kl --head-type "$type" --num-heads 4 --num-layers "$LAYERS" \
                --share-lm-head --epochs "$EPOCHS" --batch-size 32 --max-tokens 40000 --max-length 1900 --lr 1e-3 \
                2>&1 | tail -4
        fi
        echo "== profile and build $type $(date +%T)"
        [ -f "$run/heads/tree_profile.json" ] || $MEDUSA tree profile --model "$MODEL" --heads "$run/heads" \
            --data "$WORK/heldout.jsonl" --limit "$HELDOUT" 2>&1 | tail -2
        $MEDUSA tree build --heads "$run/heads" --nodes 64 2>&1 | tail -2
        mkdir -p "$OUT/$type"
        cp "$run"/train_config.json "$run"/train_log.jsonl "$run"/head_accuracy.json "$OUT/$type/" 2>/dev/null
        cp "$run"/heads/config.json "$run"/heads/tree.json "$run"/heads/tree_profile.json "$OUT/$type/" 2>/dev/null
        [ "$type" = sequential ] && cp -r "$run/heads" "$OUT/$type/heads"  # the weights come back to be shipped
    done
    ;;
bench)
    for type in $TYPES; do
        methods=medusa,medusa-lookup
        [ "$type" = medusa ] && methods=autoregressive,$methods
        echo "== bench $type: $methods $(date +%T)"
        $MEDUSA bench --model "$MODEL" --heads "$WORK/$type/heads" --questions "$DATA/question.jsonl" \
            --methods "$methods" ${LIMIT:+--limit "$LIMIT"} --max-new-tokens 128 --warmup 2 \
            --lookup-nodes "${LOOKUP_NODES:-10}" --output-dir "$WORK/bench-$type" --resume 2>&1 | tail -14
        mkdir -p "$OUT/bench-$type" && cp "$WORK/bench-$type"/*.json* "$WORK/bench-$type"/*.md "$OUT/bench-$type/" 2>/dev/null
    done
    ;;
esac
