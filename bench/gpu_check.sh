#!/usr/bin/env bash
# GPU check: pretraining MFU at 124M and 350M (eager, the default fast path, the fused loss with a larger
# micro-batch) against a bare PyTorch loop with the same settings, then the whole tiny chain on one GPU in bf16, the
# trl stages under DeepSpeed ZeRO-2 and ZeRO-3, PPO and eval. One short script, for a GPU lent for a few minutes.
#
#   bash bench/gpu_check.sh [OUT_DIR]          # from the repository root; OUT_DIR default runs/gpu_check
#
# Each step runs under `timeout` and goes on when one fails, so a single run reports everything; the end prints a
# table (step, exit code, seconds, headline metrics from each manifest) and writes OUT_DIR/summary.json.
# PYTHON (default python3) must have llmpipe's dependencies; PYTHONPATH may point at wheels installed elsewhere.
# GPU_CHECK_SKIP: step names to leave out (space-separated), e.g. "bench_pretrain_350m bench_ppo" for a short lease.
set -uo pipefail
OUT_DIR=${1:-runs/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
RUNS="$OUT_DIR/runs"
STEPS_FILE="$OUT_DIR/steps.tsv"
: >"$STEPS_FILE"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$OUT_DIR/torch_extensions} PYTHONUNBUFFERED=1
export TQDM_MININTERVAL=5  # progress bars once every few seconds in a log

step() { # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    case " ${GPU_CHECK_SKIP:-} " in *" $name "*) echo "=== $name: skipped (GPU_CHECK_SKIP)"; return 0 ;; esac
    echo "=== $name: $*"
    start=$(date +%s%N)
    timeout "$limit" "$@"
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - start) / 1000000000 ))" >>"$STEPS_FILE"
    echo "=== $name: exit $rc"
}
stage() { # stage NAME TIMEOUT_S LAUNCH_YAML STAGE CONFIG key=value... (training stages start afresh)
    local name=$1 limit=$2 launch=$3 what=$4 config=$5
    shift 5
    step "$name" "$limit" "$PY" -m accelerate.commands.launch --config_file "$launch" --num_processes 1 \
        -m pipeline.cli "$what" --config "$config" "$@"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'EOF'
import importlib
for name in ["torch", "transformers", "accelerate", "deepspeed", "trl", "peft", "datasets", "tokenizers"]:
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # report, go on: the steps that need it will fail and say so
        print(name, "MISSING", exc)
import time, torch
if torch.cuda.is_available():  # what this card's bf16 matmul reaches, beside the data-sheet peak MFU uses
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for i in range(13):
        if i == 3:
            torch.cuda.synchronize(); start = time.perf_counter()
        a @ a
    torch.cuda.synchronize()
    print(f"bf16 matmul 8192^3: {2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12:.0f} TFLOP/s measured")
EOF

# Pretraining speed (issue 21), bf16, a 32k vocabulary, steady state (warm-up and compile left out): the stage
# against a bare loop with the same fast path, in one process. Eager first (the 2026-11-26 baseline's setting), then
# the default fast path (compile, fused AdamW), then the fused loss at larger micro-batches, then 350M.
B="$PY bench/pretrain.py --precision bf16 --vocab 32768 --trials 1"
step bench_pretrain_124m_eager 150 $B --preset 124m --steps 60 --compile false --fused-adamw false
step bench_pretrain_124m 240 $B --preset 124m --steps 80 --warmup-steps 10
step bench_pretrain_124m_mb32_fused_loss 240 $B --preset 124m --steps 80 --warmup-steps 10 --micro-batch 32 \
    --fused-loss true
step bench_pretrain_350m 300 $B --preset 350m --steps 60 --warmup-steps 10

# The tiny chain, bf16 on one GPU; trl stages under ZeRO-2 and ZeRO-3 (one process each)
G=launch/accelerate/single_gpu.yaml
step tokenizer 120 "$PY" -m pipeline.cli tokenizer --config configs/tiny/tokenizer.yaml output_dir="$RUNS/tokenizer"
stage pretrain 240 $G pretrain configs/tiny/pretrain.yaml resume=never output_dir="$RUNS/pretrain" tokenizer="$RUNS/tokenizer"
stage sft_zero2 240 launch/accelerate/zero2.yaml sft configs/tiny/sft.yaml resume=never output_dir="$RUNS/sft" \
    init_from="$RUNS/pretrain"
stage pairs 180 $G pairs configs/tiny/pairs.yaml output_dir="$RUNS/pairs" model="$RUNS/sft"
stage reward_zero3 240 launch/accelerate/zero3.yaml reward configs/tiny/reward.yaml resume=never output_dir="$RUNS/reward" \
    init_from="$RUNS/sft" "data.path=[data/demo/preference.jsonl,$RUNS/pairs/pairs.jsonl]"
stage dpo_zero3 240 launch/accelerate/zero3.yaml dpo configs/tiny/dpo.yaml resume=never output_dir="$RUNS/dpo" \
    init_from="$RUNS/sft"
stage ppo 300 $G ppo configs/tiny/ppo.yaml resume=never output_dir="$RUNS/ppo" init_from="$RUNS/sft" \
    reward_model="$RUNS/reward"
stage eval_sft 180 $G eval configs/tiny/eval.yaml output_dir="$RUNS/eval_sft" model="$RUNS/sft"
step bench_ppo 180 "$PY" bench/ppo.py --model "$RUNS/sft" --reward "$RUNS/reward" --trials 3 --steps 4

"$PY" - "$OUT_DIR" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
keys = ["loss", "val_loss", "tokens_per_second", "mfu", "exact_match", "exact_match_before", "heldout_pair_accuracy",
        "heldout_pair_accuracy_before", "heldout_logp_margin", "heldout_logp_margin_before", "mixed_precision",
        "distributed_type", "precision", "steps", "wall_time_s"]
summary = {"steps": [], "manifests": {}}
print("| step | exit | seconds |")
print("|---|---|---|")
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    summary["steps"].append({"name": name, "rc": int(rc), "seconds": float(seconds)})
    print(f"| {name} | {rc} | {seconds} |")
for manifest in sorted((out / "runs").glob("*/manifest.json")):
    data = json.loads(manifest.read_text())
    metrics = data.get("metrics", {})
    summary["manifests"][manifest.parent.name] = data
    shown = {k: v for k, v in metrics.items() if any(k.startswith(p) for p in keys) and not isinstance(v, (list, dict))}
    print(manifest.parent.name, json.dumps(shown, default=str)[:900])
(out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
EOF
