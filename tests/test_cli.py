"""The CLI as a user meets it: real processes, exit codes, one readable line per problem, nothing half-written."""

from __future__ import annotations

import glob

import pytest
import yaml
from conftest import REPO, run_cli, write_jsonl

from pipeline.cli import STAGES
from pipeline.config import all_keys, load_config

TOKENIZER_YAML = str(REPO / "configs/tiny/tokenizer.yaml")


def test_misspelled_key_is_one_line_with_the_right_key_no_traceback_no_manifest(tmp_path):
    out = tmp_path / "out"
    result = run_cli("tokenizer", "--config", TOKENIZER_YAML, f"output_dir={out}", "vocab_szie=512")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'vocab_szie'" in lines[0] and "'vocab_size'" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()


def test_misspelled_key_inside_the_yaml_file(tmp_path):
    config = yaml.safe_load(open(TOKENIZER_YAML))
    config["vocab_size_"] = config.pop("vocab_size")
    path = tmp_path / "tok.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_cli("tokenizer", "--config", str(path), f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"llmpipe tokenizer: error: {path}: unknown key 'vocab_size_' (did you mean 'vocab_size'?)"
    )


def test_every_problem_is_reported_at_once(tmp_path):
    result = run_cli(
        "tokenizer",
        "--config",
        TOKENIZER_YAML,
        f"output_dir={tmp_path}",
        "vocab_size=many",
        "min_frequencey=2",
        "data.max_examples=-1",
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, result.stderr
    assert any("vocab_size: got 'many', expected int" in line for line in lines)
    assert any("did you mean 'min_frequency'" in line for line in lines)
    assert any("data.max_examples: got -1" in line for line in lines)


def test_bad_data_fails_before_the_output_folder_is_touched(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": oops}\n')
    out = tmp_path / "out"
    result = run_cli("tokenizer", "--config", TOKENIZER_YAML, f"output_dir={out}", f"data.path={bad}")
    assert result.returncode == 2
    assert f"{bad}:2: malformed JSON line" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
    wrong_column = write_jsonl(tmp_path / "c.jsonl", [{"body": "x"}])
    result = run_cli("tokenizer", "--config", TOKENIZER_YAML, f"output_dir={out}", f"data.path={wrong_column}")
    assert result.returncode == 2 and "columns present: ['body']" in result.stderr


def test_rerun_on_bad_input_keeps_the_previous_artifact(tmp_path, trained_tokenizer):
    manifest = (trained_tokenizer / "manifest.json").read_text()
    result = run_cli(
        "tokenizer",
        "--config",
        TOKENIZER_YAML,
        f"output_dir={trained_tokenizer}",
        f"data.path={tmp_path / 'missing.jsonl'}",
    )
    assert result.returncode == 2 and "file not found" in result.stderr
    assert (trained_tokenizer / "manifest.json").read_text() == manifest


def test_validate_checks_without_running(tmp_path):
    out = tmp_path / "out"
    ok = run_cli("validate", "tokenizer", "--config", TOKENIZER_YAML, f"output_dir={out}")
    assert ok.returncode == 0 and "valid tokenizer config" in ok.stdout
    assert not out.exists()
    bad = run_cli("validate", "tokenizer", "--config", TOKENIZER_YAML, "data.path=nowhere/corpus.jsonl")
    assert bad.returncode == 2 and "file not found: 'nowhere/corpus.jsonl'" in bad.stderr


def test_help_lists_every_config_key():
    for stage, (module_name, _) in STAGES.items():
        result = run_cli(stage, "--help")
        assert result.returncode == 0
        module = __import__(module_name, fromlist=["Config"])
        for key in all_keys(module.Config):
            assert f"  {key}" in result.stdout, f"{stage} --help does not list {key}"
    top = run_cli("--help")
    assert top.returncode == 0 and all(stage in top.stdout for stage in STAGES)


def test_unknown_stage_suggests_the_closest():
    result = run_cli("tokeniser", "--config", TOKENIZER_YAML)
    assert result.returncode == 2 and "did you mean 'tokenizer'?" in result.stderr


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "configs/**/*.yaml"), recursive=True)))
def test_every_shipped_config_validates(path):
    if path.endswith("/pipeline.yaml"):  # a pipeline file (llmpipe run), not a stage config
        from pipeline.orchestrate import load_pipeline

        load_pipeline(path)  # loads and checks every stage config it names
        return
    stage = yaml.safe_load(open(path)).get("stage") or path.rsplit("/", 1)[-1].removesuffix(".yaml")
    if stage not in STAGES:
        pytest.fail(f"{path}: no stage named {stage!r}; every config in configs/ must load")
    module = __import__(STAGES[stage][0], fromlist=["Config"])
    load_config(module.Config, path)


def test_console_script_is_installed():
    import shutil
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "llmpipe"
    assert script.exists() or shutil.which("llmpipe"), "pip install -e . should put `llmpipe` on PATH"
