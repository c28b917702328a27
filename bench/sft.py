"""SFT throughput: the `llmpipe sft` stage against a bare trl SFTTrainer script, one run, same everything.

    python bench/sft.py [--steps 60] [--hidden 128 --layers 4] [--trials 3]

Both sides fine-tune the same model (a Llama built from a config and saved once, with the demo tokenizer) on the
same rows of data/demo/sft.jsonl, with the same SFTConfig settings (batch, max length, lr, assistant-only loss,
fp32 on CPU). Each side is timed by the Trainer's own train_runtime; the stage runs with no held-out split and no
checkpoint inside the timed steps (its eval_on_start and checkpoint are fixed costs, excluded as in
bench/pretrain.py), so both sides time the same training loop; tokens/s = trained tokens (the same on both
sides) / train_runtime. Sides
alternate which goes first; the best of --trials is kept (this 2-core VM varies by +-10% between runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.config import DataConfig, load_config  # noqa: E402
from pipeline.stages import sft, tokenizer  # noqa: E402

SFT_DATA = REPO / "data/demo/sft.jsonl"


def make_model(folder: Path, hidden: int, layers: int) -> Path:
    """A tokenizer trained on the demo corpus and a fresh Llama of the given size, saved as an HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    corpus = DataConfig(path=str(REPO / "data/demo/corpus.jsonl"), max_examples=5000)
    tokenizer.run(tokenizer.Config(output_dir=str(folder / "tok"), data=corpus, vocab_size=1024))
    tok = AutoTokenizer.from_pretrained(folder / "tok" / "tokenizer")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 32 * 32 + 32,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32), max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return folder / "model"


def settings(args) -> dict:
    return {"max_length": 128, "micro_batch_size": args.micro_batch, "max_steps": args.steps, "lr": 1e-3}


def training_rows(folder: Path, n: int) -> Path:
    """The first n demo conversations, one file both sides read."""
    rows = SFT_DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
    (folder / "sft_rows.jsonl").write_text("".join(rows), encoding="utf-8")
    return folder / "sft_rows.jsonl"


def run_stage(model: Path, data: Path, out: Path, args) -> tuple[float, float]:
    s = settings(args)
    cfg = load_config(sft.Config, None, [
        f"output_dir={out}", f"init_from={model}", f"data.path={data}", "eval_fraction=0", "generation_eval=null",
        f"max_length={s['max_length']}", "assistant_only_loss=true",
        f"train.micro_batch_size={s['micro_batch_size']}", f"train.max_steps={s['max_steps']}", f"train.lr={s['lr']}",
        "train.logging_steps=10", f"train.save_steps={10 * s['max_steps']}", "resume=never",
    ])  # fmt: skip
    sft.run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    runtime = next(r["train_runtime"] for r in rows if "train_runtime" in r)
    tokens = max(r["num_tokens"] for r in rows if "num_tokens" in r)
    return tokens, runtime


def run_bare(model_path: Path, data: Path, out: Path, args) -> tuple[float, float]:
    """What a user would write with trl alone: load, split, SFTConfig, SFTTrainer, train."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    s = settings(args)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ds = load_dataset("json", data_files=str(data), split="train")
    config = SFTConfig(
        output_dir=str(out), max_length=s["max_length"], per_device_train_batch_size=s["micro_batch_size"],
        max_steps=s["max_steps"], learning_rate=s["lr"], assistant_only_loss=True, use_cpu=True, bf16=False,
        gradient_checkpointing=False, logging_steps=10, save_strategy="no", report_to="none", seed=0,
        warmup_steps=0.05, lr_scheduler_type="cosine", dataloader_num_workers=0,
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tok)
    result = trainer.train()
    tokens = max(r["num_tokens"] for r in trainer.state.log_history if "num_tokens" in r)
    return tokens, result.metrics["train_runtime"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp), args.hidden, args.layers)
        data = training_rows(Path(tmp), args.rows)
        results: dict[str, list[tuple[float, float]]] = {"llmpipe sft": [], "bare SFTTrainer": []}
        for trial in range(args.trials):
            order = ["llmpipe sft", "bare SFTTrainer"] if trial % 2 == 0 else ["bare SFTTrainer", "llmpipe sft"]
            for side in order:
                out = Path(tmp) / f"{side.split()[0]}_{trial}"
                run = run_stage if side == "llmpipe sft" else run_bare
                results[side].append(run(model, data, out, args))
                tokens, seconds = results[side][-1]
                print(f"trial {trial}: {side}: {tokens / seconds:,.0f} tokens/s", file=sys.stderr)

    best = {side: max(t / s for t, s in runs) for side, runs in results.items()}
    tokens = {side: runs[0][0] for side, runs in results.items()}
    print(f"\nSFT throughput, {args.steps} steps x {args.micro_batch} rows, hidden {args.hidden} x {args.layers} "
          f"layers, {args.threads} threads, best of {args.trials}")  # fmt: skip
    print("| side | tokens trained | best tokens/s | all trials |\n|---|---|---|---|")
    for side, runs in results.items():
        trials = ", ".join(f"{t / s:,.0f}" for t, s in runs)
        print(f"| {side} | {tokens[side]:,.0f} | {best[side]:,.0f} | {trials} |")
    print(f"\nratio llmpipe / bare = {best['llmpipe sft'] / best['bare SFTTrainer']:.3f}")


if __name__ == "__main__":
    main()
