"""Pretraining throughput: the `llmpipe pretrain` stage against a bare PyTorch loop, one run, same everything.

    python bench/pretrain.py [--steps 60] [--preset tiny]             # CPU: the tiny preset, fp32
    python bench/pretrain.py --preset 124m --precision bf16 --vocab 32768   # GPU: GPT-2-small-sized, fast path on
    python bench/pretrain.py --preset 350m --precision bf16 --vocab 32768   # GPU: GPT-2-medium-sized
    python bench/pretrain.py --compile false --fused-adamw false     # eager baseline (switches: auto|true|false)

Both sides train the same model (same init seed), on the same packed blocks, with the same batch, optimizer and
thread count, and the same fast-path switches (torch.compile in place, fused AdamW, the fused LM head + loss;
`auto` = on a GPU, off on a CPU, as the stage's defaults). Both are timed in steady state: the first
--warmup-steps steps (compilation, warm-up) are left out of tokens/s and reported apart. The stage is timed by its
own per-step clock (data fetch, forward, backward, clipping, the finiteness check, optimizer step, logging),
evaluation and checkpoints excluded; the bare loop by the wall clock of its loop. MFU = tokens/s x training FLOPs
per token / peak, the peak being a matmul measured now (CPU, or a GPU not in the data-sheet table) or the
data-sheet bf16 peak. --vocab pads the demo tokenizer with unused tokens to a real model's vocabulary size (the LM
head and the loss cost what they cost there). Sides alternate which goes first; best of --trials kept (this 2-core
VM varies by +-10% between runs of the same loop, so take one number with care).
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
from pipeline.fastpath import adamw, fuse_lm_loss, where_it_pays  # noqa: E402
from pipeline.modeling import ModelConfig, build_model, peak_flops, training_flops_per_token  # noqa: E402
from pipeline.stages import pretrain, tokenizer  # noqa: E402

PRESETS = {
    "tiny": {"hidden": 128, "layers": 4, "heads": 4, "seq_len": 256, "micro_batch": 16},
    "124m": {"hidden": 768, "layers": 12, "heads": 12, "seq_len": 1024, "micro_batch": 16},
    "350m": {"hidden": 1024, "layers": 24, "heads": 16, "seq_len": 1024, "micro_batch": 16},
}
SWITCH = {"auto": None, "true": True, "false": False}


def bare_loop(model_cfg: ModelConfig, tok, blocks: torch.Tensor, args, fast: dict, device, dtype) -> tuple:
    """The reference: what a minimal hand-written PyTorch training loop does per step, with the same fast-path
    switches. Returns (steady-state seconds of the steps after the warm-up, warm-up seconds)."""
    torch.manual_seed(0)
    model = build_model(model_cfg, tok).to(device)
    model.config.use_cache = False  # no KV cache while training, as the stage does
    model.train()
    optimizer = adamw(pretrain.param_groups(model, 0.1), 3e-3, (0.9, 0.95), 1e-8, fast["fused_adamw"])
    if fast["fused_loss"]:
        fuse_lm_loss(model, 4096)
    if fast["compile"]:
        model.compile()
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    marks, loss = [], None
    for step in range(args.steps):
        if step in (0, args.warmup_steps):
            if loss is not None:
                loss.item()  # wait for the device before reading the clock
            marks.append(time.perf_counter())
        batch = blocks[torch.randint(len(blocks), (args.micro_batch,), generator=generator)].to(device)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()  # wait for the device to finish
    end = time.perf_counter()
    return end - marks[-1], marks[-1] - marks[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default: the preset's)")
    parser.add_argument("--vocab", type=int, default=None, help="pad the tokenizer to this many tokens")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of tokens/s on both sides")
    for switch in ("compile", "fused-adamw", "fused-loss"):
        default = "false" if switch == "fused-loss" else "auto"  # the stage's defaults
        parser.add_argument(f"--{switch}", choices=sorted(SWITCH), default=default)
    args = parser.parse_args()
    if args.steps <= args.warmup_steps:
        parser.error(f"--steps {args.steps} must be above --warmup-steps {args.warmup_steps}")
    size = dict(PRESETS[args.preset])
    size["micro_batch"] = args.micro_batch = args.micro_batch or size["micro_batch"]
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    fast = {k: where_it_pays(SWITCH[getattr(args, k)], device) for k in ("compile", "fused_adamw", "fused_loss")}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = DataConfig(path=str(REPO / "data/demo/corpus.jsonl"))
        tokenizer.run(tokenizer.TokenizerConfig(output_dir=str(tmp / "tok"), data=corpus, vocab_size=1024))
        if args.vocab:  # unused tokens up to a real vocabulary: the LM head and the softmax at their real size
            padded = pretrain.load_tokenizer(str(tmp / "tok"))
            padded.add_tokens([f"<unused_{i}>" for i in range(max(0, args.vocab - len(padded)))])
            padded.save_pretrained(tmp / "tok" / "tokenizer")
        model_cfg = ModelConfig(
            hidden_size=size["hidden"], num_layers=size["layers"], num_heads=size["heads"], max_seq_len=size["seq_len"]
        )
        cfg = pretrain.PretrainConfig(
            output_dir=str(tmp / "pt"), tokenizer=str(tmp / "tok"), data=corpus, model=model_cfg, num_proc=2,
            validation_fraction=0.1,  # the demo corpus is small: 1024-token blocks need a tenth for one batch
            precision=args.precision, resume="never", log_every=10, eval_every=10**6, eval_batches=1,
            checkpoint_every=10**6, timing_warmup_steps=args.warmup_steps,
            train=pretrain.TrainConfig(micro_batch_size=size["micro_batch"], max_steps=args.steps, warmup_steps=5,
                                       **fast),
        )  # fmt: skip
        tok = pretrain.load_tokenizer(str(tmp / "tok"))
        stage_tps, bare_tps, warmups = [], [], {"stage": [], "bare": []}
        tokens = (args.steps - args.warmup_steps) * size["micro_batch"] * size["seq_len"]
        from datasets import load_dataset

        from pipeline.artifacts import content_hash
        from pipeline.data import pack_dataset

        # the same packed blocks the stage trains on, as one tensor for the bare loop
        docs = load_dataset("json", data_files=corpus.path, split="train")
        packed = pack_dataset(docs, tok, size["seq_len"], content_hash(tmp / "tok"), 2)
        blocks = torch.as_tensor(packed.with_format("numpy")["input_ids"], dtype=torch.long)

        def bare() -> None:
            seconds, warmup = bare_loop(model_cfg, tok, blocks, args, fast, device, dtype)
            bare_tps.append(tokens / seconds)
            warmups["bare"].append(warmup)

        def stage() -> None:
            metrics = pretrain.run(cfg)
            stage_tps.append(metrics["tokens_per_second"])
            warmups["stage"].append(metrics["warmup_seconds"])

        for trial in range(args.trials):  # alternate which side goes first: warm-up and drift hit both
            for side in (stage, bare) if trial % 2 == 0 else (bare, stage):
                side()
        flops_per_token = training_flops_per_token(build_model(model_cfg, tok), size["seq_len"])
        peak, source = peak_flops(device)

    stage, bare = max(stage_tps), max(bare_tps)
    print(
        f"model {args.preset}: {json.dumps(size)}, {flops_per_token / 1e6:.1f} MFLOPs/token, {args.precision}, "
        f"{args.steps} steps ({args.warmup_steps} of warm-up left out), best of {args.trials}, {args.threads} "
        f"threads, device {device}; vocabulary {len(tok)}; fast path {json.dumps(fast)}; peak "
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
    print("warm-up seconds (left out), stage:", ", ".join(f"{s:.1f}" for s in warmups["stage"]),
          "| bare:", ", ".join(f"{s:.1f}" for s in warmups["bare"]))  # fmt: skip


if __name__ == "__main__":
    main()
