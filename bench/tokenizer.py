"""Tokenizer throughput: the `llmpipe tokenizer` stage and our encode+pack against raw `tokenizers`, one run.

    python bench/tokenizer.py [--corpus data/demo/corpus.jsonl] [--repeat-corpus 4] [--vocab-size 8192]

1. Training, MB/s of corpus text: the whole stage (`pipeline.stages.tokenizer.run`: load the JSONL through
   `datasets`, train, measure held-out bytes/token, save, write the manifest) against a bare script that reads the
   same JSONL with `json.loads` and calls the same `tokenizers` BPE trainer. Ratio = stage / bare. Also shown:
   the first read (the stage converts the JSONL to Arrow once; pretrain reuses that cache) and the trainer alone
   on texts already in memory (no reading: a bound no real run reaches).
2. Encode+pack, tokens/s: `pipeline.data.encode_and_pack` (tokenize, EOS between documents, cut into blocks)
   against raw `Tokenizer.encode_batch` on the same batches, which only tokenizes. Ratio = ours / raw.

Each side runs `--trials` times, best time kept; sides alternate so that background load hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import DataConfig  # noqa: E402
from pipeline.data import encode_and_pack  # noqa: E402
from pipeline.stages.tokenizer import TokenizerConfig, build_trainer_and_model, run  # noqa: E402


def make_corpus(source: Path, repeat: int, folder: Path) -> tuple[Path, list[str], int]:
    """The bench corpus: `source` repeated `repeat` times with a copy number in front, so repeats differ."""
    texts = [json.loads(line)["text"] for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [f"({copy}) {t}" if copy else t for copy in range(repeat) for t in texts]
    path = folder / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path, texts, sum(len(t.encode("utf-8")) for t in texts)


def bare_training(path: Path, cfg: TokenizerConfig) -> float:
    """What a user would write by hand: read JSONL, train the same BPE pipeline. Seconds."""
    start = time.perf_counter()
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok, trainer = build_trainer_and_model(cfg)
    batches = (texts[i : i + cfg.batch_size] for i in range(0, len(texts), cfg.batch_size))
    tok.train_from_iterator(batches, trainer, length=-(-len(texts) // cfg.batch_size))
    return time.perf_counter() - start


def trainer_alone(texts: list[str], cfg: TokenizerConfig) -> float:
    """The `tokenizers` trainer on texts already in memory: no reading at all, a lower bound. Seconds."""
    tok, trainer = build_trainer_and_model(cfg)
    start = time.perf_counter()
    batches = (texts[i : i + cfg.batch_size] for i in range(0, len(texts), cfg.batch_size))
    tok.train_from_iterator(batches, trainer, length=-(-len(texts) // cfg.batch_size))
    return time.perf_counter() - start


def stage_training(cfg: TokenizerConfig) -> float:
    start = time.perf_counter()
    run(cfg)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(REPO / "data/demo/corpus.jsonl"))
    parser.add_argument("--repeat-corpus", type=int, default=4, help="repeat the corpus to reach a larger size")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "true"

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path, texts, n_bytes = make_corpus(Path(args.corpus), args.repeat_corpus, tmp)
        cfg = TokenizerConfig(output_dir=str(tmp / "out"), data=DataConfig(path=str(path)), vocab_size=args.vocab_size)
        cfg_bare = TokenizerConfig(**{**cfg.__dict__, "heldout_fraction": 0.0})
        # The stage's first read converts the JSONL to Arrow once (cached after); time that separately.
        cold = stage_training(cfg)
        bare_s, stage_s, alone_s = [], [], []
        for _ in range(args.trials):
            bare_s.append(bare_training(path, cfg_bare))
            stage_s.append(stage_training(cfg))
            alone_s.append(trainer_alone(texts, cfg_bare))
        bare_mb_s, stage_mb_s = n_bytes / 1e6 / min(bare_s), n_bytes / 1e6 / min(stage_s)
        alone_mb_s = n_bytes / 1e6 / min(alone_s)
        cold_mb_s = n_bytes / 1e6 / cold

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tmp / "out" / "tokenizer")
        batches = [texts[i : i + 1000] for i in range(0, len(texts), 1000)]
        raw_s, ours_s, n_tokens = [], [], 0
        for _ in range(args.trials):
            start = time.perf_counter()
            n_tokens = sum(len(e.ids) for b in batches for e in tokenizer.backend_tokenizer.encode_batch(b))
            raw_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            for b in batches:
                encode_and_pack(tokenizer, b, args.block_size, tokenizer.eos_token_id)
            ours_s.append(time.perf_counter() - start)
        raw_tok_s, ours_tok_s = n_tokens / min(raw_s), n_tokens / min(ours_s)

    rows = [
        ("BPE training, MB/s (warm cache)", f"{stage_mb_s:.2f}", f"{bare_mb_s:.2f}", stage_mb_s / bare_mb_s),
        ("BPE training, MB/s (first read)", f"{cold_mb_s:.2f}", f"{bare_mb_s:.2f}", cold_mb_s / bare_mb_s),
        (
            "BPE training vs trainer alone on texts in memory",
            f"{stage_mb_s:.2f}",
            f"{alone_mb_s:.2f}",
            stage_mb_s / alone_mb_s,
        ),
        ("encode+pack, tokens/s", f"{ours_tok_s:,.0f}", f"{raw_tok_s:,.0f}", ours_tok_s / raw_tok_s),
    ]
    print(
        f"corpus: {n_bytes / 1e6:.1f} MB, {len(texts):,} documents, {n_tokens:,} tokens; vocab {args.vocab_size}; "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); best of {args.trials}"
    )
    print("| measure | llmpipe | baseline (raw tokenizers) | ratio |")
    print("|---|---|---|---|")
    for name, ours, base, ratio in rows:
        print(f"| {name} | {ours} | {base} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
