#!/usr/bin/env bash
# The batch-first engine's GPU runs (docs/benchmarks/h200-batch-engine/README.md), one phase per device call:
#
#   scripts/gpu_batch_engine.sh tests     # the CUDA-only tests, where a step's time goes (kernels, then host)
#   scripts/gpu_batch_engine.sh tune      # the step cost per batch size, and a tree per batch bucket from it
#   scripts/gpu_batch_engine.sh curve7b   # the step cost of a Llama-2-7B-shaped model (random weights)
#   scripts/gpu_batch_engine.sh bench     # throughput against batch size, and batch 1 against the previous code
#   scripts/gpu_batch_engine.sh serve     # medusa serve under 1, 8 and 32 clients, greedy and sampled mixed
#   scripts/gpu_batch_engine.sh adaptive  # the batch engine with and without its adaptive switch, greedy and mixed
#
# Expects the default model's GGUF at /root/stage/model.gguf for bench and serve (staged in parts: the device
# call carries at most 64 MiB), wheels for gguf/fastapi/uvicorn in $KEEP/.whl (with what the device lacks of theirs:
# starlette, pydantic, pydantic-core, annotated-types, typing-inspection and, for fastapi 0.165,
# opentelemetry-api, without which the server does not start), the Spec-Bench questions in
# $KEEP/.data/question.jsonl and, for the baseline, the previous engine's source (without its assets) in
# $KEEP/.old/src ($KEEP: the repository root, or where an earlier call on the same machine copied them).
# Writes under $OUT.
set -uo pipefail
phase=$1
KEEP=${KEEP:-.}
[ -d /tmp/site/fastapi ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$KEEP"/.whl/*.whl
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1 MEDUSA_CACHE_DIR=/root/medusa-cache
HEADS=${HEADS:-src/medusa/assets/heads/smollm2-135m-instruct}  # tune writes a copy at /root/heads
MODEL=/root/stage/model.gguf
QUESTIONS=$KEEP/.data/question.jsonl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

case $phase in
tests)
    python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_attention.py 2>&1 | tail -15
    python3 scripts/step_profile.py --shape smollm2-135m --nodes 1,64 --lookup 24 --batch 1,32 --compile off \
        --context 512 --cache-length 1024 --repeats 10 --top 12 --out "$OUT/step_profile.json" 2>&1 | tail -64
    python3 scripts/engine_timeline.py --batches 1,4,8,32,64 --out "$OUT/timeline.json" 2>&1 | grep -v Warn | tail -16
    ;;
tune)
    mkdir -p "$OUT/tune" && rm -rf /root/heads && cp -r src/medusa/assets/heads/smollm2-135m-instruct /root/heads
    python3 -m medusa.cli bench --cost-curve --shape smollm2-135m --sizes "${SIZES:-1,2,4,8,12,16,24,32,48,64}" \
        --batch-sizes "${BATCHES:-1,2,4,8,16,32,64}" --repeats "${REPEATS:-10}" --step-warmup 3 \
        --output-dir "$OUT/tune" 2>&1 | tail -3
    python3 -m medusa.cli tree tune --heads /root/heads --cost-curve "$OUT/tune/cost_curve.json" \
        --batch-sizes "${BATCHES:-1,2,4,8,16,32,64}" --max-nodes 64 2>&1 | tail -4
    cp /root/heads/tuned_trees.json "$OUT/tune/"
    ;;
curve7b)
    python3 -m medusa.cli bench --cost-curve --shape llama2-7b --sizes "${SIZES:-1,2,4,8,16,32,64}" \
        --batch-sizes "${BATCHES:-1,2,4,8,16,32,64}" --repeats "${REPEATS:-5}" --step-warmup 2 \
        --output-dir "$OUT/curve7b" 2>&1 | tail -3
    ;;
bench)
    mkdir -p "$OUT/bench"
    python3 scripts/batch_throughput.py --model "$MODEL" --heads "$HEADS" --questions "$QUESTIONS" \
        --max-new-tokens 128 --batch-sizes "${BATCHES:-1,2,4,8,16,32,64}" --prompts "${PROMPTS:-128}" \
        --ragged "${RAGGED:-off}" --overlap "${OVERLAP:-auto}" \
        --out "$OUT/bench/batch_throughput.json"
    # Batch 1 against the previous engine (the single-sequence decoder of commit b566998), same questions and
    # heads (the shipped ones: their tuned trees are what both engines choose for this device)
    SINGLE_HEADS=${SINGLE_HEADS:-src/medusa/assets/heads/smollm2-135m-instruct}
    [ "${SINGLE:-1}" = 0 ] && exit 0
    for code in new ${OLD:+old}; do
        src=src; [ "$code" = old ] && src=$KEEP/.old/src
        PYTHONPATH=$src:/tmp/site python3 -m medusa.cli bench --model "$MODEL" --heads "$SINGLE_HEADS" --questions "$QUESTIONS" \
            --methods autoregressive,medusa,medusa-lookup --limit "${LIMIT:-4}" --max-new-tokens 128 --warmup 2 \
            --output-dir "$OUT/bench/single-$code" 2>&1 | tail -12
    done
    ;;
serve)
    # JOIN_WAITS: the --join-wait values to run (empty: the default, measured prefill time x3); CLIENTS likewise.
    # SERVERS: heads (every step its tree), heads-adaptive (--adaptive: plain steps where the tree does not pay),
    # no-heads.
    mkdir -p "$OUT/serve"
    for heads in ${SERVERS:-heads no-heads}; do
        for wait in ${JOIN_WAITS:-default}; do
            flag=""; [ "$heads" = no-heads ] && flag=--no-heads; [ "$heads" = heads-adaptive ] && flag=--adaptive
            [ "$wait" != default ] && flag="$flag --join-wait $wait"
            name=$heads; [ "$wait" != default ] && name=$heads-wait$wait
            batch=${MAX_BATCH-32}  # MAX_BATCH unset: 32 (the runs so far); set empty: the server's own default
            python3 -m medusa.cli serve --model "$MODEL" --heads "$HEADS" --port 8011 ${batch:+--max-batch $batch} $flag \
                > "$OUT/serve/server-$name.log" 2>&1 &
            server=$!
            for _ in $(seq 180); do
                python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8011/health')" 2>/dev/null && break
                sleep 1
            done
            for clients in ${CLIENTS:-1 8 32}; do
                requests=$(( clients * ${PER_CLIENT:-8} )); [ "$clients" = 1 ] && requests=8
                python3 -m medusa.serve.loadtest --url http://127.0.0.1:8011 --clients "$clients" --requests "$requests" \
                    --max-tokens 128 --mixed-temperature 0.7 --prompts "$QUESTIONS" --label "$name, $clients clients" \
                    --output "$OUT/serve/load-$name-$clients.json" 2>&1 | tail -3
            done
            python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8011/metrics').read().decode())" \
                | grep -E "^medusa_((batch_size|accepted_tokens_per_step|prefill_batch_size|request_queue_seconds)_(sum|count)|worker_seconds_total|plain_steps_total)" \
                > "$OUT/serve/metrics-$name.txt"
            grep "captured" "$OUT/serve/server-$name.log"
            kill "$server"; wait "$server"
        done
    done
    python3 -m medusa.serve.loadtest --report "$OUT"/serve/load-*.json
    ;;
adaptive)
    # TEMPERATURES: "0" greedy, "0.7" every other prompt sampled at 0.7 (seeded rejection sampling), as in serve.
    mkdir -p "$OUT/adaptive"
    for temperature in ${TEMPERATURES:-0.7 0}; do
        sampling=""; [ "$temperature" != 0 ] && sampling="--temperature $temperature --mixed"
        python3 scripts/batch_throughput.py --model "$MODEL" --heads "$HEADS" --questions "$QUESTIONS" \
            --max-new-tokens 128 --batch-sizes "${BATCHES:-32,64,8}" --prompts "${PROMPTS:-128}" $sampling --adaptive \
            --out "$OUT/adaptive/batch_throughput-t$temperature.json" 2>&1 | grep "^batch\|^wrote\|Error"
    done
    ;;
esac
