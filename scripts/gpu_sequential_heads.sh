#!/usr/bin/env bash
# Medusa heads against sequential (Hydra-style) heads on the same self-distilled data (issue 27), one phase per
# device call:
#
#   scripts/gpu_sequential_heads.sh data    # distil answers from the default model for DISTILL_SECONDS, on top of
#                                           # $KEEP/.data/distilled.jsonl.gz (made by the same command elsewhere)
#                                           # where there is one; hold some out
#   scripts/gpu_sequential_heads.sh train   # train both head types the same way; profile each; a 64-node tree each
#   scripts/gpu_sequential_heads.sh tune    # each head type's step-cost curve, and the trees tuned on it per batch
#   scripts/gpu_sequential_heads.sh bench   # Spec-Bench: autoregressive, and each head type alone and with lookup
#   scripts/gpu_sequential_heads.sh throughput  # the batch engine with each variant's heads, batch sizes 1-64
#
# A variant named `shipped` is the heads shipped with the package (already trained): `bench` and `throughput` take
# it beside the trained ones, and `tune` tunes it for this device into the user's copy, which the later phases
# read. `autoregressive` in BENCH runs the plain path alone, where the list puts it (without it, it runs with the
# first variant).
#
# A device call returns a bounded number of files (8, 16 MiB each) and nothing at all when it is killed at its
# limit, so every phase packs what it has made into $OUT/PHASE.tar.gz after each step (session 14 lost a call's
# results to that); `data` also returns the distilled rows and `train` each variant's bf16 weights in a file of
# their own (heads-VARIANT.tar.gz), so that a later session (a new machine) can carry them back in .heads/ instead
# of distilling and training again.
# Expects the default model's GGUF at /root/stage/model.gguf (`tune` with CURVE_SHAPE does not), wheels for
# gguf/fastapi/uvicorn in $KEEP/.whl and the prompts (topics.jsonl from `medusa prompts --tasks
# ask,instruct,article`, the shared pool files, from which `data` also makes the shipped recipe's context prompts;
# CONTEXT_PROMPTS=0 leaves them out) and the Spec-Bench questions in $KEEP/.data. Works in $WORK (kept between
# calls on one machine); writes under $OUT.
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
PROFILE_ROWS=${PROFILE_ROWS:-150}  # held-out rows the tree profile reads (300 took two minutes a variant)
EPOCHS=${EPOCHS:-3}
# Head type and layers per head of each variant trained, "-prefix" for Hydra++'s prefix layer (--prefix-layer;
# not "+prefix": a device call returns only files named in letters, digits, '.', '_' and '-');
# BENCH: the variants benchmarked on Spec-Bench (pick the sequential one by the held-out accuracies of `train`).
VARIANTS=${VARIANTS:-medusa-2 sequential-2 sequential-2-prefix}
BENCH=${BENCH:-medusa-2 sequential-2}
LIMIT=${LIMIT:-}  # Spec-Bench questions per category (empty: all 480)
BENCH_SECONDS=${BENCH_SECONDS:-}  # end the bench phase after this long, packed, within the call (empty: no limit)
RESULTS=$WORK/results  # what comes back, packed
mkdir -p "$WORK" "$OUT" "$RESULTS"
pack() { tar -czf "$OUT/$phase.tar.gz" --exclude='*.safetensors' -C "$RESULTS" . ; }
# Heads trained on an earlier machine come back as heads-VARIANT.tar.gz (`train` below); carried in $KEEP/.heads,
# they are put where `train` would have left them, so that `train` skips them and `tune` and `bench` find them.
for archive in "$KEEP"/.heads/heads-*.tar.gz; do
    [ -f "$archive" ] || continue
    variant=$(basename "$archive" .tar.gz) && variant=${variant#heads-}
    [ -f "$WORK/$variant/heads/medusa_heads.safetensors" ] && continue
    mkdir -p "$WORK/$variant" && tar -xzf "$archive" -C "$WORK/$variant"
    mv "$WORK/$variant/medusa_heads.bf16.safetensors" "$WORK/$variant/heads/medusa_heads.safetensors"
    echo "heads of $variant restored from $archive"
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
heads_of() {  # a variant's heads directory
    case $1 in
        shipped|autoregressive) echo src/medusa/assets/heads/smollm2-135m-instruct ;;
        *) echo "$WORK/$1/heads" ;;
    esac
}

case $phase in
data)
    # The prompt pool may come packed (the device call carries 64 MiB with the model's parts).
    [ -f "$DATA/pool.tar.gz" ] && [ ! -f "$DATA/gsm8k_train.jsonl" ] && tar -xzf "$DATA/pool.tar.gz" -C "$DATA"
    prompts="$DATA/topics.jsonl,$DATA/gsm8k_train.jsonl,$DATA/gpteacher_codegen.json,$DATA/gpteacher_roleplay.json"
    # The shipped recipe's context prompts (summarise, key points, rewrite, questions over documents), made from the
    # pool the same way each time (the seed fixes them), so rows answered elsewhere keep their ids.
    if [ "${CONTEXT_PROMPTS:-6000}" -gt 0 ]; then
        [ -f "$WORK/context_prompts.jsonl" ] || $MEDUSA prompts --data "${prompts#*,}" \
            --output "$WORK/context_prompts.jsonl" --count "${CONTEXT_PROMPTS:-6000}" --documents 4 \
            --max-prompt-chars 3500 | tail -1
        prompts="$prompts,$WORK/context_prompts.jsonl"
    fi
    # Rows distilled elsewhere (the same command on a CPU, or an earlier machine) come as $DATA/distilled.jsonl.gz
    # (gzipped: a call carries 64 MiB, the model's part nearly 47); this machine then answers more of the same
    # prompts for DISTILL_SECONDS, in the same stable random order, skipping those answered.
    distilled=$DATA/distilled.jsonl.gz
    if [ -f "$distilled" ] && [ ! -f "$WORK/distilled.jsonl" ]; then
        gunzip -c "$distilled" > "$WORK/distilled.jsonl"
        # Made from the same GGUF (the package's, staged here as $MODEL): its settings name that machine's path.
        python3 - "$DATA/distilled.jsonl.settings.json" "$WORK/distilled.jsonl.settings.json" "$MODEL" <<'PY'
import json, sys
from pathlib import Path
settings = json.loads(Path(sys.argv[1]).read_text())
settings["model"] = str(Path(sys.argv[3]).resolve())
Path(sys.argv[2]).write_text(json.dumps(settings, indent=1))
PY
    fi
    [ "$DISTILL_SECONDS" -gt 0 ] && { timeout "$DISTILL_SECONDS" $MEDUSA distill --model "$MODEL" --data "$prompts" \
        --output "$WORK/distilled.jsonl" --max-new-tokens "${DISTILL_TOKENS:-384}" --batch-size "${DISTILL_BATCH:-384}" \
        --max-prompt-tokens 1400 2>&1 | tail -3 || echo "distillation stopped after ${DISTILL_SECONDS}s"; }
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
    cp "$WORK/distilled.jsonl.settings.json" "$RESULTS/" 2>/dev/null
    wc -l "$WORK"/*.jsonl
    tar -czf "$OUT/distilled.tar.gz" -C "$WORK" train.jsonl heldout.jsonl
    pack
    ;;
train)
    for variant in $VARIANTS; do
        plain=${variant%-prefix} prefix=
        [ "$plain" != "$variant" ] && prefix=--prefix-layer
        type=${plain%-*} layers=${plain##*-} run=$WORK/$variant
        if [ ! -f "$run/heads/medusa_heads.safetensors" ]; then
            echo "== train $variant $(date +%T)"
            # TRAIN_SECONDS ends it in time to return within the call; run again, it resumes from its checkpoint.
            ${TRAIN_SECONDS:+timeout "$TRAIN_SECONDS"} $MEDUSA train --model "$MODEL" --data "$WORK/train.jsonl" \
                --output "$run" --stage 1 --loss kl --head-type "$type" $prefix --num-heads 4 --num-layers "$layers" \
                --share-lm-head --epochs "$EPOCHS" --batch-size 32 --max-tokens 40000 --max-length 1900 --lr 1e-3 \
                --checkpoint-every 100 --resume 2>&1 | tail -4
            [ -f "$run/heads/medusa_heads.safetensors" ] || { echo "== $variant not finished: run train again"; break; }
        fi
        # The weights are kept in bf16 (half the size; the GPU runs in bf16 anyway) before anything is measured on
        # them: the tree profile fingerprints the weights, and heads restored from their bf16 copy on a later
        # machine must match their profile, or `tune` refuses them (session 20 lost its per-bucket tuning to that).
        python3 -c "
import sys; from safetensors.torch import load_file, save_file
state = load_file(sys.argv[1]); save_file({k: v.bfloat16() for k, v in state.items()}, sys.argv[1])" \
            "$run/heads/medusa_heads.safetensors"
        echo "== profile and build $variant $(date +%T)"
        [ -f "$run/heads/tree_profile.json" ] || $MEDUSA tree profile --model "$MODEL" --heads "$run/heads" \
            --data "$WORK/heldout.jsonl" --limit "$PROFILE_ROWS" 2>&1 | tail -2
        $MEDUSA tree build --heads "$run/heads" --nodes 64 2>&1 | tail -2
        mkdir -p "$RESULTS/$variant"
        cp "$run"/train_config.json "$run"/train_log.jsonl "$run"/head_accuracy.json "$RESULTS/$variant/" 2>/dev/null
        cp "$run"/heads/*.json "$RESULTS/$variant/" 2>/dev/null
        # The (bf16) weights come back with the heads' config, profile and tree, one file per variant: to be
        # shipped if they win, or tuned and benchmarked from a later machine.
        cp "$run/heads/medusa_heads.safetensors" "$RESULTS/$variant/medusa_heads.bf16.safetensors"
        tar -czf "$OUT/heads-$variant.tar.gz" --exclude=medusa_heads.safetensors -C "$run" heads \
            -C "$RESULTS/$variant" medusa_heads.bf16.safetensors
        pack
    done
    ;;
tune)
    for variant in $BENCH; do
        [ "$variant" = autoregressive ] && continue  # no heads
        # shipped: tuned for this device into the user's copy (MEDUSA_CACHE_DIR), which `bench` and `throughput`
        # then read, and which comes back to be merged into the shipped file (the H200's entry, session 22).
        heads=$(heads_of "$variant")
        tuned=$(python3 -c 'import sys; from medusa.paths import user_heads_directory as user
print(user(sys.argv[1]) / "tuned_trees.json")' "$heads")  # where `tree tune` writes for these heads
        # Timed with the variant's own trained heads (their layers and prefix layer), not random ones of a shape;
        # CURVE_SHAPE=smollm2-135m puts them on a random base of the model's shape instead: the same shapes and
        # kernels (not yet compared with the real model's curve on a GPU), and no staged model, so a device's trees
        # for the shipped heads take one call.
        base=(--model "$MODEL")
        [ -n "${CURVE_SHAPE:-}" ] && base=(--shape "$CURVE_SHAPE")
        curve=$WORK/curve-$variant
        if [ ! -f "$curve/cost_curve.json" ]; then
            echo "== cost curve, $variant heads $(date +%T)"
            $MEDUSA bench --cost-curve "${base[@]}" --heads "$heads" --sizes "${SIZES:-1,2,4,8,16,32,48,64}" \
                --batch-sizes "${BATCHES:-1,2,4,8,16,32,64}" --repeats "${REPEATS:-5}" --step-warmup 2 \
                --output-dir "$curve" 2>&1 | tail -2
        fi
        echo "== tune $variant $(date +%T)"
        mkdir -p "$RESULTS/$variant" && cp "$curve/cost_curve.json" "$RESULTS/$variant/cost_curve.json"
        # A failed tune must not pass the heads' older tuned_trees.json off as its result.
        if $MEDUSA tree tune --heads "$heads" --cost-curve "$curve/cost_curve.json" \
            --batch-sizes "${BATCHES:-1,2,4,8,16,32,64}" --max-nodes 64 > "$RESULTS/$variant/tune.txt" 2>&1; then
            tail -4 "$RESULTS/$variant/tune.txt"
            cp "$tuned" "$RESULTS/$variant/"
        else
            echo "tune of $variant failed:" && tail -4 "$RESULTS/$variant/tune.txt"
        fi
        pack
    done
    ;;
bench)
    # BENCH_SECONDS stops the phase (SIGTERM: a bench writes what it measured, and --resume goes on from there) in
    # time to pack it before the device call's own limit, which returns nothing of a variant cut mid-run (session
    # 20 lost most of the shipped heads' 480 questions that way).
    deadline=$(( $(date +%s) + ${BENCH_SECONDS:-100000000} ))
    for variant in $BENCH; do
        left=$(( deadline - $(date +%s) ))
        [ "$left" -gt 30 ] || { echo "== bench $variant: no time left in BENCH_SECONDS"; continue; }
        # `autoregressive` in BENCH runs it alone (in its own folder, at the point in the list it has: last when the
        # heads matter more than its ratio); otherwise it goes with the first variant, in the same report.
        methods=medusa,medusa-lookup
        if [ "$variant" = autoregressive ]; then methods=autoregressive
        elif [ "$variant" = "${BENCH%% *}" ] && [[ " $BENCH " != *" autoregressive "* ]]; then
            methods=autoregressive,$methods
        fi
        echo "== bench $variant: $methods $(date +%T)"
        timeout "$left" $MEDUSA bench --model "$MODEL" --heads "$(heads_of "$variant")" \
            --questions "$DATA/question.jsonl" --methods "$methods" ${LIMIT:+--limit "$LIMIT"} --max-new-tokens 128 \
            --warmup 2 ${LOOKUP_NODES:+--lookup-nodes "$LOOKUP_NODES"} --output-dir "$WORK/bench-$variant" --resume \
            2>&1 | tail -14
        mkdir -p "$RESULTS/bench-$variant"
        cp "$WORK/bench-$variant"/*.json* "$WORK/bench-$variant"/*.md "$RESULTS/bench-$variant/" 2>/dev/null
        pack
    done
    ;;
throughput)
    for variant in $BENCH; do
        echo "== throughput $variant $(date +%T)"
        # The batch engine's own benchmark (h100-batch-engine-v4's command), with this variant's heads.
        HEADS=$(heads_of "$variant") SINGLE=0 BATCHES=${BATCHES:-32,64,16,8,4,2,1} OUT=$RESULTS/throughput-$variant \
            bash scripts/gpu_batch_engine.sh bench 2>&1 | grep "^batch\|^wrote"
        pack
    done
    ;;
*)
    echo "unknown phase '$phase': data, train, tune, bench or throughput" >&2
    exit 2
    ;;
esac
