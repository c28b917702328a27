"""Shared fixtures: small generated corpora and a helper that runs the real `llmpipe` entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A few scripts, combining marks, emoji with joiners, and whitespace runs: what a tokenizer must not mangle.
MIXED_SAMPLES = [
    "Plain ASCII, with punctuation: (a+b)*c = 42!",
    "日本語のテキストと中文字符，还有한국어 문장.",
    "Combining: e\u0301 a\u0308 n\u0303; precomposed: é ä ñ",
    "Emoji: 🎉 👩‍👩‍👧 🏳️‍🌈 👍🏽",
    "Runs   of    spaces\n\n\n\tand\ttabs  \r\n  trailing   ",
    "Arabic مرحبا بالعالم and Hebrew שלום עולם, Greek αβγ, Cyrillic Привет",
    "Zero width\u200bjoiner\u200d and BOM\ufeff inside",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """~300 KB of English-like text with digits and the mixed-script samples, as JSONL with a 'text' column."""
    import random

    rng = random.Random(0)
    words = (
        "the cat dog town river lives in near north south red blue green keeps a an of and "
        "Bramo Tillford Zarel Mossbay favourite colour pet heron fox"
    ).split()
    rows = []
    for i in range(2000):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(8, 25)))
        rows.append({"text": f"{sentence.capitalize()}. {rng.randint(0, 99)} + {rng.randint(0, 99)} = ?", "id": i})
    rows += [{"text": s, "id": -1} for s in MIXED_SAMPLES * 5]
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", rows)


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `llmpipe ARGS` as a user would, in a separate process, and capture its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def save_tiny_model(folder: Path, tokenizer_stage: Path, config_class, **sizes) -> Path:
    """A randomly initialised (seed 0) causal LM of `config_class` (e.g. LlamaConfig, Qwen2Config) with the chat
    tokenizer of a tokenizer stage folder, saved as an HF model folder: any family or size, built offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_stage / "tokenizer")
    config = config_class(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **sizes,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory, small_corpus) -> Path:
    """A tokenizer artifact trained by the real CLI on the small corpus (vocab 512)."""
    out = tmp_path_factory.mktemp("tok") / "tokenizer_stage"
    result = run_cli(
        "tokenizer",
        "--config",
        str(REPO / "configs/tiny/tokenizer.yaml"),
        f"output_dir={out}",
        f"data.path={small_corpus}",
        "vocab_size=512",
    )
    assert result.returncode == 0, result.stderr
    return out
