#!/usr/bin/env bash
# Proves the CUDA path in one command (under 8 minutes on one GPU) and writes a table of what passed:
#
#   scripts/gpu_check.sh [--out DIR]        on a GPU: the CUDA cases of the device-parametrised tests, a bf16
#                                           pretraining of the `small` preset (tokens/s, MFU against the bf16
#                                           peak: PEAK_FLOPS, default 790e12 = H200), a one-process torchrun
#                                           over nccl (FSDP2), the engine's greedy decode against transformers'
#                                           `generate` on cuda, and a short GRPO run
#   scripts/gpu_check.sh --cpu-dry-run      the same on the CPU at tiny sizes (gloo, no tests): CI runs it
#
# Each check runs on its own (a timeout, its log in DIR/<check>.log); a failing check is reported in the
# table, DIR/gpu_check.md, and the others still run. The exit status is the number of failed checks.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

DRY=0
OUT=runs/gpu_check
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n 2,13p "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; PRESET=tiny; DOCS=40; STEPS=3; BATCH=2; SEQ=64; TORCHRUN_STEPS=2; NEW_TOKENS=8
  RL_ARGS=(--steps 2 --prompts-per-step 2 --group-size 2 --max-new-tokens 8); LIMIT=120
  export OMP_NUM_THREADS=1
else
  DEVICE=cuda; PRESET=small; DOCS=3000; STEPS=300; BATCH=32; SEQ=512; TORCHRUN_STEPS=20; NEW_TOKENS=64
  RL_ARGS=(--steps 5 --prompts-per-step 16 --group-size 8 --max-new-tokens 64); LIMIT=300
fi
PEAK=${PEAK_FLOPS:-790e12}
TABLE="$OUT/gpu_check.md"
FAILED=0
ROWS=()

# check NAME COMMAND...: run it with a timeout, log it; then, if it passed, the command in $FIGURE (its
# output goes to the log too). The row's figure is the log's last `RESULT: ...` line.
check() {
  local name="$1"; shift
  local log="$OUT/$name.log" start=$SECONDS status result
  timeout "$LIMIT" "$@" >"$log" 2>&1
  status=$?
  if [ $status -eq 0 ] && [ -n "${FIGURE:-}" ]; then
    eval "$FIGURE" >>"$log" 2>&1
    status=$?
  fi
  result=$(grep '^RESULT: ' "$log" | tail -1 | cut -c9- | tr '|' '/')
  if [ $status -eq 0 ]; then
    ROWS+=("| $name | ok | ${result} | $((SECONDS - start)) |")
  else
    FAILED=$((FAILED + 1))
    if [ $status -eq 124 ]; then
      result="timed out after ${LIMIT}s"
    elif [ -z "$result" ]; then
      result="exit $status: $(grep -v '^\s*$' "$log" | tail -1 | cut -c1-160 | tr '|' '/')"
    fi
    ROWS+=("| $name | **FAIL** | $result | $((SECONDS - start)) |")
  fi
  echo "${ROWS[-1]}"
}

# figures from the runs' own logs
train_figure() {  # the last logged step of a metrics.jsonl ($1): tokens/s and MFU; the precision from the log ($2)
  "$PY" -c '
import json, sys
r = [r for r in map(json.loads, open(sys.argv[1])) if "tokens_per_s" in r][-1]
precision = "bf16" if "bf16)" in open(sys.argv[2]).read() else "fp32"
print("RESULT: %s, step %d, loss %.3f, %s tokens/s, MFU %.1f%%"
      % (precision, r["step"], r["loss"], format(round(r["tokens_per_s"]), ","), 100 * r["mfu"]))
' "$1" "$2"
}
rl_figure() {  # GRPO's rl_log.jsonl: speed of the last step
  "$PY" -c '
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
r = rows[-1]
print("RESULT: %d steps, %.0f rollouts/s, rollout %.1fs + update %.1fs a step"
      % (len(rows), r["rollouts_per_s"], r["t_rollout"], r["t_update"]))
' "$1"
}

W="$OUT/work"
rm -rf "$W"
mkdir -p "$W"

if [ "$DRY" = 1 ]; then
  ROWS+=("| tests (cuda cases) | skipped | dry run: CI runs the CPU cases | 0 |")
else
  FIGURE="tail -1 $OUT/tests.log | sed 's/^/RESULT: /'" \
    check tests "$PY" -m pytest -q -p no:cacheprovider -k cuda tests/test_trainer.py tests/test_grpo.py tests/test_distill.py
fi

check data "$PY" - "$W" "$DOCS" <<'EOF'
import sys
from pathlib import Path
from seekling.data import write_shards
from seekling.speedrun import pretrain_documents
from seekling.tokenizer import train_tokenizer
work, n = Path(sys.argv[1]), int(sys.argv[2])
docs = pretrain_documents(n)
tok = train_tokenizer(docs, 1024)
tok.save_pretrained(work / "tok")
index = write_shards((tok.encode(d) for d in docs), work / "shards", eos_id=tok.eos_token_id, vocab_size=tok.vocab_size)
print(f"RESULT: {index['num_tokens']:,} tokens of task transcripts")
EOF

PRETRAIN=(-m seekling.cli pretrain --data "$W/shards" --tokenizer "$W/tok" --preset "$PRESET" --batch-size "$BATCH"
          --seq-len "$SEQ" --device "$DEVICE" --peak-flops "$PEAK" --checkpoint-every 0 --no-resume --warmup 10)
FIGURE="train_figure $W/train_state/model/metrics.jsonl $OUT/pretrain.log" \
  check pretrain "$PY" "${PRETRAIN[@]}" --steps "$STEPS" --out "$W/model"
FIGURE="grep -o 'x1 ([^)]*)' $OUT/torchrun_1proc.log | head -1 | sed 's/^/RESULT: /'" \
  check torchrun_1proc "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 "${PRETRAIN[@]}" \
  --steps "$TORCHRUN_STEPS" --parallel fsdp --out "$W/torchrun"

check engine_vs_hf "$PY" - "$W/model" "$DEVICE" "$NEW_TOKENS" <<'EOF'
# seekling's engine (public API) against transformers' generate, greedy, on the same device and weights
import sys, time
import torch
import transformers
import seekling
path, device, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = seekling.load_tokenizer(path)
prompts = [tok.encode(q) for q in ("What is 12 + 35?", "Count from 3:", "The answer is")]
hf = transformers.AutoModelForCausalLM.from_pretrained(path).to(device).eval()
t0 = time.perf_counter()
want = []
with torch.no_grad():
    for p in prompts:
        out = hf.generate(torch.tensor([p], device=device), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        want.append(out[0, len(p):].tolist())
hf_tps = len(prompts) * n / (time.perf_counter() - t0)
try:
    engine = seekling.Engine(seekling.load_pretrained(path, device=device), tok)  # fp32 weights, as transformers'
    params = seekling.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    engine.generate(prompts[:1], seekling.SamplingParams(temperature=0, max_tokens=2))  # warm-up
    t0 = time.perf_counter()
    got = [o.token_ids for o in engine.generate(prompts, params)]
    tps = len(prompts) * n / (time.perf_counter() - t0)
except Exception as e:  # the table says what broke; the other checks still run
    print(f"RESULT: engine failed on {device}: {type(e).__name__}: {str(e)[:120]}")
    raise SystemExit(1)
same = sum(g == w for g, w in zip(got, want))
agree = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), len(w)) for g, w in zip(got, want)]
# a differing token is reported, not failed: near-tied logits may flip under another kernel or dtype
print(f"RESULT: greedy tokens identical on {same}/{len(prompts)} prompts (first {min(agree)}/{n} agree); engine "
      f"{tps:,.0f} tok/s (3 prompts batched), transformers {hf_tps:,.0f} tok/s (one by one)")
EOF

FIGURE="rl_figure $W/train_state/rl/rl_log.jsonl" \
  check grpo "$PY" -m seekling.cli rl --policy "$W/model" --out "$W/rl" --tasks addition --difficulty 1 \
  --recipe r1-zero --device "$DEVICE" "${RL_ARGS[@]}"

{
  echo "# scripts/gpu_check.sh$([ "$DRY" = 1 ] && echo ' --cpu-dry-run')"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), $(hostname), $("$PY" -c 'import torch; print(f"torch {torch.__version__}, " + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"))' 2>&1), load: $(uptime | sed 's/.*load average: //')"
  echo
  echo "| check | result | figure | seconds |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} >"$TABLE"
cat "$TABLE"
exit $FAILED
