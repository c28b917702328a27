"""Pretraining throughput: the `llmpipe pretrain` stage against a bare PyTorch loop, one run, same everything.

    python bench/pretrain.py [--steps 60] [--hidden 128 --layers 4 --heads 4 --seq-len 256 --micro-batch 16]
    python bench/pretrain.py --preset 124m --precision bf16     # on a GPU: GPT-2-small-sized Llama, MFU in bf16

Both sides train the same model (same init seed), on the same packed blocks, with the same batch, optimizer and
thread count; the stage is timed by its own per-step clock (data fetch, forward, backward, clipping, the finiteness
check, optimizer step, logging), evaluation and checkpoints excluded; the bare loop by the wall clock of its loop.
MFU = tokens/s x training FLOPs per token / peak, the peak being a matmul measured now (CPU, or a GPU not in
the data-sheet table) or the data-sheet bf16 peak. Sides alternate which goes first; best of --trials kept
(this 2-core VM varies by +-10% between runs of the same loop, so take one number with care).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.config import DataConfig  # noqa: E402
from pipeline.modeling import ModelConfig, build_model, peak_flops, training_flops_per_token  # noqa: E402
from pipeline.stages import pretrain, tokenizer  # noqa: E402

PRESETS = {
    "tiny": {"hidden": 128, "layers": 4, "heads": 4, "seq_len": 256, "micro_batch": 16},
    "124m": {"hidden": 768, "layers": 12, "heads": 12, "seq_len": 1024, "micro_batch": 16},
}


def bare_loop(model_cfg: ModelConfig, tok, blocks: torch.Tensor, steps: int, micro: int, lr: float, device, dtype):
    """The reference: what a minimal hand-written PyTorch training loop does per step. Returns seconds."""
    torch.manual_seed(0)
    model = build_model(model_cfg, tok).to(device)
    model.config.use_cache = False  # no KV cache while training, as the stage does
    model.train()
    optimizer = torch.optim.AdamW(pretrain.param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (micro,), generator=generator)].to(device, non_blocking=True)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()  # wait for the device to finish
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    size = PRESETS[args.preset]
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = DataConfig(path=str(REPO / "data/demo/corpus.jsonl"))
        tokenizer.run(tokenizer.TokenizerConfig(output_dir=str(tmp / "tok"), data=corpus, vocab_size=1024))
        model_cfg = ModelConfig(
            hidden_size=size["hidden"], num_layers=size["layers"], num_heads=size["heads"], max_seq_len=size["seq_len"]
        )
        cfg = pretrain.PretrainConfig(
            output_dir=str(tmp / "pt"), tokenizer=str(tmp / "tok"), data=corpus, model=model_cfg, num_proc=2,
            validation_fraction=0.1,  # the demo corpus is small: 1024-token blocks need a tenth for one batch
            precision=args.precision, resume="never", log_every=10, eval_every=10**6, eval_batches=1,
            checkpoint_every=10**6,
            train=pretrain.TrainConfig(micro_batch_size=size["micro_batch"], max_steps=args.steps, warmup_steps=5),
        )  # fmt: skip
        tok = pretrain.load_tokenizer(str(tmp / "tok"))
        stage_tps, bare_tps = [], []
        tokens = args.steps * size["micro_batch"] * size["seq_len"]
        from datasets import load_dataset

        from pipeline.artifacts import content_hash
        from pipeline.data import pack_dataset

        # the same packed blocks the stage trains on, as one tensor for the bare loop
        docs = load_dataset("json", data_files=corpus.path, split="train")
        packed = pack_dataset(docs, tok, size["seq_len"], content_hash(tmp / "tok"), 2)
        blocks = torch.as_tensor(packed.with_format("numpy")["input_ids"], dtype=torch.long)

        def bare() -> None:
            seconds = bare_loop(model_cfg, tok, blocks, args.steps, size["micro_batch"], 3e-3, device, dtype)
            bare_tps.append(tokens / seconds)

        def stage() -> None:
            stage_tps.append(pretrain.run(cfg)["tokens_per_second"])

        for trial in range(args.trials):  # alternate which side goes first: warm-up and drift hit both
            for side in (stage, bare) if trial % 2 == 0 else (bare, stage):
                side()
        flops_per_token = training_flops_per_token(build_model(model_cfg, tok), size["seq_len"])
        peak, source = peak_flops(device)

    stage, bare = max(stage_tps), max(bare_tps)
    print(
        f"model {args.preset}: {json.dumps(size)}, {flops_per_token / 1e6:.1f} MFLOPs/token, {args.precision}, "
        f"{args.steps} steps, best of {args.trials}, {args.threads} threads, device {device}; peak "
        f"{peak / 1e9:,.0f} GFLOP/s ({source})"
    )
    print("| loop | tokens/s | MFU | ratio vs bare |")
    print("|---|---|---|---|")
    print(f"| bare PyTorch | {bare:,.0f} | {bare * flops_per_token / peak:.1%} | 1.000 |")
    print(f"| llmpipe pretrain | {stage:,.0f} | {stage * flops_per_token / peak:.1%} | {stage / bare:.3f} |")
    print(
        "per trial (tokens/s), stage:",
        ", ".join(f"{t:,.0f}" for t in stage_tps),
        "| bare:",
        ", ".join(f"{t:,.0f}" for t in bare_tps),
    )


if __name__ == "__main__":
    main()
