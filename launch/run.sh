#!/usr/bin/env bash
# Run one llmpipe stage, on the hardware chosen by a launch config (stage code never chooses hardware).
#
#   launch/run.sh STAGE CONFIG [LAUNCH_CONFIG] [key=value ...]
#
# Examples (from the repository root):
#   launch/run.sh tokenizer configs/tiny/tokenizer.yaml                        # plain single process
#   launch/run.sh pretrain configs/tiny/pretrain.yaml launch/accelerate/cpu_2proc.yaml train.max_steps=50
#   launch/run.sh pretrain configs/tiny/pretrain.yaml launch/accelerate/cpu_2proc_zero3.yaml
#   launch/run.sh sft configs/tiny/sft.yaml launch/accelerate/zero2.yaml output_dir=runs/big/sft
#   LLMPIPE_DRY_RUN=1 launch/run.sh pretrain configs/tiny/pretrain.yaml launch/accelerate/cpu_2proc.yaml
#
# Without LAUNCH_CONFIG:  $PYTHON -m pipeline.cli STAGE --config CONFIG [key=value ...]
# With LAUNCH_CONFIG:     $PYTHON -m accelerate.commands.launch --config_file LAUNCH_CONFIG \
#                             -m pipeline.cli STAGE --config CONFIG [key=value ...]
#                         (that module is `accelerate launch`, run by the same interpreter as the stage)
#
# Environment set for a launch (a variable already set in your environment always wins):
#   * every `# env: KEY=VALUE` line in LAUNCH_CONFIG's header, e.g. ACCELERATE_USE_CPU=1 and OMP_NUM_THREADS=1
#     for launch/accelerate/cpu_2proc.yaml: a config file cannot carry them (see launch/README.md);
#   * TORCH_EXTENSIONS_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/llmpipe/torch_extensions, where DeepSpeed caches the
#     C++ ops it JIT-builds on first use (CPU Adam ~90 s, shm comm ~60 s), instead of rebuilding them.
# Other knobs: PYTHON (default: python), LLMPIPE_DRY_RUN=1 (print the environment and command, run nothing).
# Paths inside launch configs (deepspeed_config_file) are relative: run this from the repository root.
set -euo pipefail

show() { # print a command line the way a shell would read it back
    local out="+" word
    for word in "$@"; do
        out+=" $(printf '%q' "$word")"
    done
    echo "$out" >&2
}

usage() {
    cat >&2 <<'EOF'
usage: launch/run.sh STAGE CONFIG [LAUNCH_CONFIG] [key=value ...]
  STAGE          tokenizer | pretrain | sft | pairs | reward | dpo | ppo | grpo | eval
  CONFIG         the stage's YAML config, e.g. configs/tiny/pretrain.yaml
  LAUNCH_CONFIG  optional accelerate config from launch/accelerate/ (e.g. launch/accelerate/cpu_2proc.yaml);
                 without it the stage runs as one plain process
  key=value      config overrides passed on to the stage, e.g. train.max_steps=100
environment: PYTHON (interpreter, default python), LLMPIPE_DRY_RUN=1 (print, do not run),
             TORCH_EXTENSIONS_DIR (DeepSpeed op cache, default ${XDG_CACHE_HOME:-$HOME/.cache}/llmpipe/torch_extensions)
EOF
    exit 2
}

if [[ $# -lt 2 ]]; then
    usage
fi
case "$1" in
    -h | --help) usage ;;
    -*) echo "run.sh: unknown option $1" >&2; usage ;;
esac

STAGE=$1
CONFIG=$2
shift 2
LAUNCH_CONFIG=""
# The optional third argument is a launch config when it is not a key=value override.
if [[ $# -gt 0 && "$1" != *=* ]]; then
    LAUNCH_CONFIG=$1
    shift
fi
PYTHON=${PYTHON:-python}

if [[ ! -f "$CONFIG" ]]; then
    echo "run.sh: stage config not found: $CONFIG" >&2
    exit 2
fi

# Plain single process: no launcher, no extra environment.
if [[ -z "$LAUNCH_CONFIG" ]]; then
    cmd=("$PYTHON" -m pipeline.cli "$STAGE" --config "$CONFIG" "$@")
    show "${cmd[@]}"
    if [[ "${LLMPIPE_DRY_RUN:-0}" == 1 ]]; then
        exit 0
    fi
    exec "${cmd[@]}"
fi

if [[ ! -f "$LAUNCH_CONFIG" ]]; then
    echo "run.sh: launch config not found: $LAUNCH_CONFIG (see launch/accelerate/)" >&2
    exit 2
fi
ds_file=$(sed -n 's/^[[:space:]]*deepspeed_config_file:[[:space:]]*//p' "$LAUNCH_CONFIG" | tr -d "\"'" | head -n 1)
if [[ -n "$ds_file" && ! -f "$ds_file" ]]; then
    echo "run.sh: $LAUNCH_CONFIG names deepspeed_config_file $ds_file, which is not there from $(pwd);" \
        "run from the repository root" >&2
    exit 2
fi

# Environment the launch config asks for in its header (`# env: KEY=VALUE`); values are taken literally.
env_shown=()
while IFS= read -r line; do
    [[ -z "$line" ]] && continue
    key=${line%%=*}
    value=${line#*=}
    if [[ ! "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
        echo "run.sh: bad '# env:' line in $LAUNCH_CONFIG: $line" >&2
        exit 2
    fi
    if [[ -z "${!key+x}" ]]; then
        export "$key=$value"
    fi
    env_shown+=("$key=${!key}")
done < <(sed -n 's/^#[[:space:]]*env:[[:space:]]*\([^[:space:]]*\)[[:space:]]*$/\1/p' "$LAUNCH_CONFIG")

export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llmpipe/torch_extensions}"
env_shown+=("TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR")

cmd=("$PYTHON" -m accelerate.commands.launch --config_file "$LAUNCH_CONFIG"
    -m pipeline.cli "$STAGE" --config "$CONFIG" "$@")
show env "${env_shown[@]}" "${cmd[@]}"
if [[ "${LLMPIPE_DRY_RUN:-0}" == 1 ]]; then
    exit 0
fi
mkdir -p "$TORCH_EXTENSIONS_DIR"
exec "${cmd[@]}"
