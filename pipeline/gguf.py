"""GGUF model files in (llama.cpp's format, e.g. SmolLM2-135M-Instruct.Q4_1.gguf): converted once, by transformers'
GGUF loader, to a plain fp32 safetensors folder cached by the file's content, which every stage then loads like
any model folder. What a stage writes is always a safetensors folder, never GGUF.

Conversion dequantizes (~40 s for 135M parameters on 2 cores, ~540 MB written). transformers refuses to save a
model it loaded from GGUF ("quantized with gguf and is not serializable"), so the weights move into a plain model
of the same config first. Concurrent processes (a multi-process launch) convert once: a file lock serialises them.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pipeline.config import UserError

SUFFIX = ".gguf"


def is_gguf(path: str) -> bool:
    return str(path).lower().endswith(SUFFIX) and Path(path).expanduser().is_file()


def missing_file_problem(key: str, path: str) -> str | None:
    """What is wrong with a model key that names a .gguf file which is not there (None: nothing)."""
    if not str(path).lower().endswith(SUFFIX) or is_gguf(path):
        return None
    return (
        f"{key}: no such GGUF file: {path!r} (SmolLM2-135M-Instruct: `make smollm2` or "
        "`python -m tools.fetch_smollm2` fetches it into ~/.cache/llmpipe/models/)"
    )


def cache_root() -> Path:
    """$LLMPIPE_CACHE, else $XDG_CACHE_HOME/llmpipe, else ~/.cache/llmpipe."""
    if os.environ.get("LLMPIPE_CACHE"):
        return Path(os.environ["LLMPIPE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmpipe"


def model_folder(path: str) -> str:
    """The safetensors folder (model, tokenizer, generation config) converted from a .gguf file, made on first use."""
    from pipeline.artifacts import atomic_dir, file_sha256

    source = Path(path).expanduser().resolve()
    target = cache_root() / "gguf" / f"{source.stem}-{file_sha256(source)[:16]}"
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting the same file: wait for it
        if not (target / "config.json").is_file():
            with atomic_dir(target) as tmp:
                _convert(source, tmp)
    return str(target)


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"{source}: cannot load the GGUF file: {' '.join(str(exc).split())[:300]}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
