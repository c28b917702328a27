"""The recipes in configs/ besides tiny (real-scale ones need a GPU and a network; smollm2-135m needs `make
smollm2` and 20 minutes): check what can be checked without running them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from pipeline.cli import STAGES
from pipeline.config import load_config

PRESETS = sorted(p for p in (REPO / "configs").iterdir() if p.is_dir() and p.name != "tiny")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def test_there_is_a_real_scale_preset():
    assert PRESETS, "configs/ should hold at least one recipe for real models besides tiny/"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_chains_stages_and_names_real_launch_configs(preset: Path):
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in preset.glob("*.yaml") if p.stem in STAGES}
    assert configs, f"{preset}: no stage configs"
    outputs = {c["output_dir"]: stage for stage, c in configs.items()}
    for stage, raw in configs.items():
        path = preset / f"{stage}.yaml"
        cfg = load_config(__import__(STAGES[stage][0], fromlist=["Config"]).Config, str(path))
        # A stage reads an earlier stage of the same recipe, or a hub model.
        source = getattr(cfg, "init_from", None)
        if source is not None and source.startswith("runs/"):
            assert source in outputs and outputs[source] != stage, f"{path}: init_from {source} is no stage here"
        elif source is not None and not source.endswith(".gguf"):  # a GGUF file: tools/fetch_smollm2.py's
            assert HUB_ID.match(source), f"{path}: init_from {source!r} is neither a stage folder nor a hub id"
        for key in ("data", "eval_data"):
            data = getattr(cfg, key, None)
            if data is None or Path(REPO / str(data.path)).exists():
                continue
            if any(str(data.path).startswith(f"{out}/") for out, other in outputs.items() if other != stage):
                continue  # a file an earlier stage of the recipe writes
            assert HUB_ID.match(str(data.path)), f"{path}: {key}.path {data.path!r} is not a hub dataset id"
        # Every launch config the comments tell people to use exists.
        for launch in re.findall(r"launch/accelerate/[\w.-]+\.yaml", path.read_text()):
            assert (REPO / launch).is_file(), f"{path} names {launch}, which does not exist"
        assert raw.get("precision", "auto") == "auto", f"{path}: leave precision to the launch (bf16 on GPUs)"
