"""The config contract: typed fields, dotted overrides, every problem at once with a suggestion, exit code 2."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, DataConfig, all_keys, config, describe_fields, field, load_config


@config
class Train:
    lr: float = field(3e-4, "Peak learning rate.", gt=0)
    steps: int = field(10, "Optimizer steps.", ge=1)


@config
class Example:
    output_dir: str = field(help="Where outputs go.")
    data: DataConfig = field(help="Examples.")
    vocab_size: int = field(1000, "Vocabulary size.", ge=1)
    train: Train = field(factory=Train, help="Training.")
    name: str = field("run", "A name.")

    def check(self) -> list[str]:
        return [f"vocab_size: got {self.vocab_size}, must be even"] if self.vocab_size % 2 else []


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def problems_of(path, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(Example, path, list(overrides))
    return info.value.problems


def test_file_and_dotted_overrides_reach_nested_fields(tmp_path):
    path = write(tmp_path, "output_dir: out\nname: ${output_dir}/name\ndata: {path: a.jsonl}\ntrain: {steps: 5}\n")
    cfg = load_config(Example, path, ["train.lr=1e-3", "data.columns.text=content", "vocab_size=64"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 5
    assert cfg.data.columns == {"text": "content"}
    assert cfg.vocab_size == 64
    assert cfg.name == "out/name"  # ${...} interpolation resolved


def test_unknown_keys_are_named_with_a_suggestion(tmp_path):
    path = write(tmp_path, "output_dir: out\ndata: {path: a.jsonl}\nvocab_szie: 5\ntrain: {stpes: 3}\n")
    problems = problems_of(path, ["lr=0.1"])
    assert f"{path}: unknown key 'vocab_szie' (did you mean 'vocab_size'?)" in problems
    assert f"{path}: unknown key 'train.stpes' (did you mean 'train.steps'?)" in problems
    # a leaf name at the wrong level points to where it lives
    assert "command line: unknown key 'lr' (did you mean 'train.lr'?)" in problems
    assert len(problems) == 3


def test_wrong_types_name_key_value_and_expected_type_all_at_once(tmp_path):
    path = write(tmp_path, "output_dir: out\ndata: {path: a.jsonl, max_examples: 0}\ntrain: {lr: fast}\n")
    problems = problems_of(path, ["vocab_size=abc"])
    assert len(problems) == 3, problems
    assert any("train.lr: got 'fast', expected float" in p for p in problems)
    assert any("vocab_size: got 'abc', expected int" in p and p.startswith("command line") for p in problems)
    assert any("data.max_examples: got 0" in p and "greater than or equal to 1" in p for p in problems)


def test_missing_required_and_cross_field_checks(tmp_path):
    problems = problems_of(None)
    assert any("output_dir: required" in p for p in problems) and any("data: required" in p for p in problems)
    path = write(tmp_path, "output_dir: out\ndata: {path: a.jsonl, format: xml}\nvocab_size: 7\n")
    problems = problems_of(path)
    assert any("vocab_size: got 7, must be even" in p for p in problems)
    assert any("data.format: got 'xml'" in p for p in problems)


def test_bad_yaml_and_bad_override_syntax(tmp_path):
    path = write(tmp_path, "output_dir: [unclosed\n")
    (problem,) = problems_of(path)
    assert str(path) in problem and "not valid YAML" in problem and "line" in problem
    path = write(tmp_path, "output_dir: out\ndata: {path: a.jsonl}\n")
    (problem,) = problems_of(path, ["vocab_size"])
    assert "expected key=value" in problem
    assert "config file not found" in problems_of(tmp_path / "missing.yaml")[0]


def test_help_describes_every_key():
    rows = {key: (type_name, default, help_text) for key, type_name, default, help_text in describe_fields(Example)}
    assert set(rows) == set(all_keys(Example))
    assert rows["train.lr"] == ("float", "0.0003", "Peak learning rate.")
    assert rows["output_dir"][1] == "required"
    assert all(help_text for _, _, help_text in rows.values())


def test_a_key_added_later_at_its_default_is_not_a_change(tmp_path):
    """A stage folder written before a key existed (its config.yaml lacks it) is unchanged while the key keeps its
    default, and changed once it does not: upgrading llmpipe re-runs no finished stage by itself."""
    import yaml

    from pipeline.artifacts import config_changes
    from pipeline.stages.ppo import PPOConfig

    overrides = ["output_dir=out", "init_from=m", "reward_function=exact_match", f"data.path={tmp_path}"]
    cfg = load_config(PPOConfig, None, overrides)
    saved = yaml.safe_load(yaml.safe_dump(__import__("dataclasses").asdict(cfg)))
    del saved["data"]["mix"], saved["data"]["mix_seed"], saved["rollout"]["oversample"], saved["ptx"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert config_changes(tmp_path, cfg) == []
    changed = load_config(
        PPOConfig, None, [*overrides, "rollout.oversample=2", "rollout.samples_per_prompt=2", "data.mix_seed=3"]
    )
    assert [c[0] for c in config_changes(tmp_path, changed)] == [
        "data.mix_seed",
        "rollout.oversample",
        "rollout.samples_per_prompt",
    ]
