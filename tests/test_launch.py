"""launch/: accelerate configs, DeepSpeed JSONs, run.sh and the SLURM script.

Fast checks load every file with the library that reads it (Accelerate's config loader and launch-argument
validation, DeepSpeed's config class). One real launch starts `launch/accelerate/cpu_2proc.yaml` the way
`launch/run.sh` does and checks that two connected gloo ranks come up (~10 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
RUN_SH = LAUNCH / "run.sh"
SBATCH = LAUNCH / "slurm" / "multi_node.sbatch"

# name -> (distributed_type, num_processes, mixed_precision in the YAML, DeepSpeed JSON or None)
EXPECTED_YAML = {
    "cpu_1proc": ("NO", 1, "no", None),
    "cpu_2proc": ("MULTI_GPU", 2, "no", None),  # MULTI_GPU on purpose: see the file's header
    "cpu_2proc_zero2": ("DEEPSPEED", 2, None, "zero2_cpu.json"),
    "cpu_2proc_zero3": ("DEEPSPEED", 2, None, "zero3_cpu.json"),
    "single_gpu": ("NO", 1, "bf16", None),
    "multi_gpu": ("MULTI_GPU", 8, "bf16", None),
    "zero1": ("DEEPSPEED", 8, None, "zero1.json"),
    "zero2": ("DEEPSPEED", 8, None, "zero2.json"),
    "zero3": ("DEEPSPEED", 8, None, "zero3.json"),
    "zero2_offload": ("DEEPSPEED", 8, None, "zero2_offload.json"),
    "zero3_offload": ("DEEPSPEED", 8, None, "zero3_offload.json"),
    "fsdp2": ("FSDP", 8, "bf16", None),
    "multi_node": ("DEEPSPEED", 16, None, "zero3.json"),
}
EXPECTED_JSON = ["zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "zero2_cpu", "zero3_cpu"]
ENV_LINE = re.compile(r"^#\s*env:\s*(\S+)\s*$")


def yaml_files() -> list[Path]:
    return sorted((LAUNCH / "accelerate").glob("*.yaml"))


def json_files() -> list[Path]:
    return sorted((LAUNCH / "deepspeed").glob("*.json"))


def header_env(path: Path) -> dict[str, str]:
    """The `# env: KEY=VALUE` lines that launch/run.sh exports for this launch config."""
    pairs = [m.group(1) for line in path.read_text().splitlines() if (m := ENV_LINE.match(line))]
    return dict(pair.split("=", 1) for pair in pairs)


def test_every_expected_file_is_there():
    assert {p.stem for p in yaml_files()} == set(EXPECTED_YAML)
    assert {p.stem for p in json_files()} == set(EXPECTED_JSON)
    assert RUN_SH.is_file() and os.access(RUN_SH, os.X_OK), "launch/run.sh must be executable"
    assert SBATCH.is_file()
    assert (LAUNCH / "README.md").is_file()


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.name)
def test_accelerate_config_loads_and_resolves(path, monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    monkeypatch.chdir(REPO)
    rel = path.relative_to(REPO).as_posix()
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#") and f"accelerate launch --config_file {rel}" in lines[0], (
        f"{path.name} must begin with a comment showing the command that uses it"
    )

    config = load_config_from_file(str(path))  # unknown top-level keys raise here
    assert isinstance(config, ClusterConfig)
    dist_type, num_processes, mixed_precision, ds_json = EXPECTED_YAML[path.stem]
    assert config.distributed_type.value == dist_type
    assert config.num_processes == num_processes
    assert config.mixed_precision == mixed_precision

    # Nested sections are copied onto `accelerate launch` arguments without any check: a misspelt key there
    # would be dropped silently, so every nested key must be an argument the launcher knows.
    parser = launch_command_parser()
    known = {action.dest for action in parser._actions}
    for key in config.deepspeed_config:
        assert key in known, f"{path.name}: unknown deepspeed_config key {key!r}"
    for key in config.fsdp_config:
        assert (key if key.startswith("fsdp") else f"fsdp_{key}") in known, f"{path.name}: unknown fsdp key {key!r}"

    # The launcher's own validation (what `accelerate launch --config_file` does before starting anything).
    args, _, mp_from_config = _validate_launch_command(parser.parse_args(["--config_file", rel, "probe.py"]))
    assert args.num_processes == num_processes
    if ds_json is None:
        assert not config.deepspeed_config
    else:
        assert args.use_deepspeed
        assert config.deepspeed_config["deepspeed_config_file"] == f"launch/deepspeed/{ds_json}"
        assert (REPO / config.deepspeed_config["deepspeed_config_file"]).is_file()
        # Accelerate raises at Accelerator() when a YAML with deepspeed_config_file also sets mixed_precision.
        assert not mp_from_config, f"{path.name}: put precision in the DeepSpeed JSON, not the YAML"
        if ds_json in ("zero3.json", "zero3_offload.json"):  # GPU ZeRO-3: build big models already partitioned
            assert config.deepspeed_config.get("zero3_init_flag") is True
    if dist_type == "FSDP":
        assert args.fsdp_version == 2 and args.fsdp_state_dict_type == "SHARDED_STATE_DICT"
        assert args.fsdp_auto_wrap_policy == "TRANSFORMER_BASED_WRAP"
        assert args.fsdp_reshard_after_forward is True
    if path.stem == "multi_node":
        assert args.num_machines == 2 and args.deepspeed_multinode_launcher == "standard"
        assert config.main_process_ip is None, "main_process_ip comes from the sbatch script"

    env = header_env(path)
    if path.stem == "cpu_2proc":
        assert env == {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    if ds_json is not None:
        # ACCELERATE_USE_CPU makes Accelerate silently drop DeepSpeed.
        assert "ACCELERATE_USE_CPU" not in env


@pytest.fixture(scope="module")
def deepspeed_verdicts() -> dict:
    """Every JSON through DeepSpeed's own config class and Accelerate's HfDeepSpeedConfig, in a separate process
    (importing deepspeed here would change global state for the rest of the suite)."""
    script = textwrap.dedent(
        """
        import json, sys
        from accelerate.utils.deepspeed import HfDeepSpeedConfig
        from deepspeed.runtime.config import DeepSpeedConfig

        # What Accelerate fills in for "auto" at prepare() (batch 2 per device, 1 process).
        AUTO = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                "gradient_clipping": 1.0, "reduce_bucket_size": 4096, "stage3_prefetch_bucket_size": 3686,
                "stage3_param_persistence_threshold": 640, "enabled": False}

        def fill(node):
            if isinstance(node, dict):
                return {k: AUTO[k] if v == "auto" else fill(v) for k, v in node.items()}
            return node

        out = {}
        for path in sys.argv[1:]:
            try:
                raw = json.load(open(path))
                ds = DeepSpeedConfig(fill(raw))
                hf = HfDeepSpeedConfig(path)
                out[path] = {"stage": ds.zero_optimization_stage, "bf16": ds.bfloat16_config.enabled,
                             "gather": ds.zero_config.gather_16bit_weights_on_model_save,
                             "fp16": ds.float16_config.enabled, "hf_zero3": hf.is_zero3(),
                             "hf_offload": hf.is_offload()}
            except Exception as exc:
                out[path] = {"error": f"{type(exc).__name__}: {exc}"}
        print("VERDICTS " + json.dumps(out))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, json_files())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("VERDICTS ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[-1][len("VERDICTS ") :])


@pytest.mark.parametrize("path", json_files(), ids=lambda p: p.name)
def test_deepspeed_json(path, deepspeed_verdicts):
    raw = json.loads(path.read_text())
    stage = int(re.match(r"zero(\d)", path.stem).group(1))
    zero = raw["zero_optimization"]
    assert zero["stage"] == stage
    assert raw["zero_allow_untested_optimizer"] is True
    assert "optimizer" not in raw and "scheduler" not in raw, "the stage code brings its optimizer and schedule"
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert raw[key] == "auto", key
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    offload = "offload" in path.stem
    assert (zero.get("offload_optimizer", {}).get("device") == "cpu") == offload
    assert (zero.get("offload_param", {}).get("device") == "cpu") == (offload and stage == 3)
    # "auto" bf16 would resolve to fp32 under these launch configs (see README): precision is explicit.
    cpu = path.stem.endswith("_cpu")
    assert raw["bf16"] == {"enabled": not cpu}
    assert raw.get("fp16", {}).get("enabled", False) is False

    verdict = deepspeed_verdicts[str(path)]
    assert "error" not in verdict, verdict.get("error")
    assert verdict["stage"] == stage and verdict["hf_zero3"] == (stage == 3)
    assert verdict["bf16"] is (not cpu) and verdict["fp16"] is False
    assert verdict["hf_offload"] == offload
    if stage == 3:
        assert verdict["gather"] is True


@pytest.mark.parametrize("script", [RUN_SH, SBATCH], ids=lambda p: p.name)
def test_shell_scripts_parse_and_print_usage(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    result = subprocess.run(["bash", str(script)], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "usage:" in result.stderr


def run_sh_dry(*args: str) -> tuple[dict[str, str], list[str]]:
    """launch/run.sh with LLMPIPE_DRY_RUN=1: the environment it adds and the command it would run."""
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "OMP_NUM_THREADS")}
    env.update(LLMPIPE_DRY_RUN="1", PYTHON=sys.executable)
    result = subprocess.run([str(RUN_SH), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stderr.strip().splitlines()[-1].removeprefix("+ "))
    added = {}
    if words[0] == "env":
        words = words[1:]
        while "=" in words[0] and not words[0].startswith("-"):
            key, value = words.pop(0).split("=", 1)
            added[key] = value
    return added, words


def test_run_sh_commands():
    added, cmd = run_sh_dry("pretrain", "configs/tiny/tokenizer.yaml", "a=1", "b=x y")
    assert added == {} and cmd == [
        sys.executable,
        "-m",
        "pipeline.cli",
        "pretrain",
        "--config",
        "configs/tiny/tokenizer.yaml",
        "a=1",
        "b=x y",
    ]

    added, cmd = run_sh_dry("pretrain", "configs/tiny/tokenizer.yaml", "launch/accelerate/cpu_2proc.yaml", "a=1")
    assert added["ACCELERATE_USE_CPU"] == "1" and added["OMP_NUM_THREADS"] == "1"
    assert added["TORCH_EXTENSIONS_DIR"].endswith("llmpipe/torch_extensions")
    assert cmd == [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "launch/accelerate/cpu_2proc.yaml",
        "-m",
        "pipeline.cli",
        "pretrain",
        "--config",
        "configs/tiny/tokenizer.yaml",
        "a=1",
    ]

    added, _ = run_sh_dry("pretrain", "configs/tiny/tokenizer.yaml", "launch/accelerate/cpu_2proc_zero3.yaml")
    assert "ACCELERATE_USE_CPU" not in added and added["OMP_NUM_THREADS"] == "1"


PROBE = """
import os, torch
import accelerate

state = accelerate.Accelerator().state      # what the stages create; honours ACCELERATE_USE_CPU
assert accelerate.PartialState().process_index == state.process_index
dist = torch.distributed
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)                        # proves the two processes are really connected
print(f"PROBE pid={os.getpid()} rank={dist.get_rank()} world={dist.get_world_size()} backend={dist.get_backend()} "
      f"accelerate={state.distributed_type.value}/{state.num_processes} sum={total.item():g} "
      f"threads={torch.get_num_threads()}", flush=True)
dist.destroy_process_group()                  # a clean exit: gloo can abort in teardown otherwise
"""


def test_cpu_2proc_really_starts_two_gloo_ranks(tmp_path):
    """`accelerate launch --cpu --num_processes 2` would start ONE process; cpu_2proc.yaml must start two."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    added, cmd = run_sh_dry("pretrain", "configs/tiny/tokenizer.yaml", "launch/accelerate/cpu_2proc.yaml")
    launcher = cmd[: cmd.index("-m", 3)]  # run.sh's launcher command, with the probe in place of the stage
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "OMP_NUM_THREADS")}
    env.update(added, PYTHONUNBUFFERED="1")
    result = subprocess.run([*launcher, str(probe)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    found = re.findall(
        r"PROBE pid=(\d+) rank=(\d+) world=(\d+) backend=(\w+) accelerate=(\w+)/(\d+) sum=(\S+) threads=(\d+)",
        result.stdout,
    )
    assert len(found) == 2, result.stdout + result.stderr[-2000:]
    assert len({pid for pid, *_ in found}) == 2
    assert sorted(int(rank) for _, rank, *_ in found) == [0, 1]
    for _, _, world, backend, acc_type, acc_n, total, threads in found:
        assert (world, backend, acc_type, acc_n, total, threads) == ("2", "gloo", "MULTI_CPU", "2", "3", "1")
