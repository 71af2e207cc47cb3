#!/usr/bin/env bash
# One script for the day a GPU or TPU is lent: native kernel checks, engine tokens, attention bandwidth,
# and 1B-model throughput, ending with one JSON summary line.  Each step has a time cap (560 s in all,
# plus making the two random checkpoints), so it fits one 10-minute call on an H100/H200 or a TPU VM.
# Run from the repository root:
#
#     bash bench/device_check.sh [OUT_DIR]        # default OUT_DIR: ${OUT:-/tmp/device_check}
#
# Needs jax with the accelerator's plugin, flax, transformers, safetensors, tokenizers, tqdm (the device
# image has them); the rest of jaxserve's dependencies are only imported when used.  Every step writes
# its JSON lines to OUT_DIR/<step>.jsonl and its log to OUT_DIR/<step>.log; a failed step is recorded
# and the script goes on.  The last line printed is {"device_check": {...}}: paste it into the note.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-/tmp/device_check}}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset JAX_PLATFORMS  # use the accelerator (the test suite defaults to the CPU)
MODELS="${MODELS_DIR:-/tmp/jaxserve_models}"
mkdir -p "$MODELS"

step() {  # step NAME TIMEOUT_S CMD...: run, keep JSON lines and the log, record the exit code
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*" >&2
  timeout "$limit" "$@" > "$OUT_DIR/$name.out" 2> "$OUT_DIR/$name.log"
  local rc=$?
  grep '^{' "$OUT_DIR/$name.out" > "$OUT_DIR/$name.jsonl" || true
  tail -n 3 "$OUT_DIR/$name.out" >&2
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$OUT_DIR/steps.jsonl"
}

: > "$OUT_DIR/steps.jsonl"
python3 -c "import jax; print(jax.__version__, jax.devices())" >&2
# 1. The kernel of this backend, compiled natively, against the reference over a covering grid.
step kernel_check 150 python3 bench/kernel_check.py
# 2. Greedy engine tokens, kernel vs reference, float32 and bfloat16 (random 56M Llama, GQA group 2).
[ -f "$MODELS/56m/config.json" ] || python3 -m jaxserve.cli make-model "$MODELS/56m" --size 56m >&2
step engine_check 120 python3 bench/engine_check.py --model "$MODELS/56m"
# 3. Decode attention bandwidth at batch 64, contexts 1k / 4k / 16k (32 q / 8 kv heads, d=128, bf16).
step attention 90 python3 bench/attention.py --cases decode --batch 64 --context 1024,4096,16384 --iters 10
# 4. Throughput of a 1.1B random Llama on a longtail workload (64 requests, as ../shared's longtail-64).
[ -f "$MODELS/1b/config.json" ] || python3 -m jaxserve.cli make-model "$MODELS/1b" --size 1b >&2
python3 - "$MODELS/longtail-64.json" <<'PY'
import json, sys
import numpy as np
rng = np.random.default_rng(64)  # prompts 16-256 tokens, outputs lognormal(4.0, 0.9) clipped to 8-512
reqs = [{"prompt_token_ids": rng.integers(3, 32000, size=int(rng.integers(16, 257))).tolist(),
         "max_tokens": int(np.clip(rng.lognormal(4.0, 0.9), 8, 512))} for _ in range(64)]
json.dump({"name": "longtail-64-synthetic", "vocab_size": 32000, "requests": reqs}, open(sys.argv[1], "w"))
PY
step throughput 200 python3 bench/throughput.py --model "$MODELS/1b" --workload "$MODELS/longtail-64.json" \
  --max-num-seqs 64 --no-progress

python3 - "$OUT_DIR" <<'PY'
import json, os, sys
out = sys.argv[1]
def rows(name):
    path = os.path.join(out, name + ".jsonl")
    return [json.loads(l) for l in open(path)] if os.path.exists(path) else []
summary = {"steps": rows("steps")}
kc = [r["kernel_check"] for r in rows("kernel_check") if "kernel_check" in r]
summary["kernel_check"] = kc[-1] if kc else None
summary["engine_check"] = [r["engine_check"] for r in rows("engine_check") if "engine_check" in r]
summary["attention"] = [{k: r.get(k) for k in ("impl", "case", "max_context", "ms", "gb_s", "hbm_fraction", "roofline_fraction", "error")}
                        for r in rows("attention")]
summary["throughput"] = rows("throughput")[-1:] or None
try:
    import jax
    summary["device"] = jax.devices()[0].device_kind
    summary["jax"] = jax.__version__
except Exception as e:  # noqa: BLE001
    summary["device"] = f"unknown ({e})"
print(json.dumps({"device_check": summary}))
PY
