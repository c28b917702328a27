"""The fused LM head + cross-entropy (train.fused_loss) against transformers' own head and loss: peak memory and
time of one training step (forward, backward), same model, same batch, each measured in a fresh process.

    python bench/fused_loss.py [--vocab 32768 --hidden 128 --layers 4 --micro-batch 16 --seq-len 256 --chunk 1024]
    python bench/fused_loss.py --vocab 32768 --hidden 768 --layers 12 --seq-len 1024 --micro-batch 32   # on a GPU

Peak memory is the CUDA allocator's peak on a GPU, the process's peak resident set on a CPU (so it includes
Python and the libraries: compare the two rows, not the absolute numbers). The step time is the best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def one_side(args) -> dict:
    """Runs in its own process: build the model, then time forward + backward with or without the fused loss."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.fastpath import fuse_lm_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         max_position_embeddings=args.seq_len, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config).to(device)
    model.config.use_cache = False
    if args.fused:
        fuse_lm_loss(model, args.chunk)
    batch = torch.randint(args.vocab, (args.micro_batch, args.seq_len), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    best, loss = float("inf"), None
    for _ in range(args.repeats + 1):  # the first one warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"seconds": best, "peak_bytes": peak, "loss": loss.item(), "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("vocab", 32768), ("hidden", 128), ("layers", 4), ("micro-batch", 16), ("seq-len", 256),
                          ("chunk", 1024), ("repeats", 3)):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--fused", action="store_true", help=argparse.SUPPRESS)  # one side, in a child process
    parser.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(one_side(args)))
        return
    rows = {}
    for fused in (False, True):
        cmd = [sys.executable, __file__, "--side", *(["--fused"] if fused else [])]
        cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("fused", "side")]
        rows[fused] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    base = rows[False]
    tokens = args.micro_batch * args.seq_len
    print(f"vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, {args.micro_batch} x {args.seq_len} "
          f"tokens, chunk {args.chunk}, device {base['device']}; logits of one micro-batch in fp32: "
          f"{tokens * args.vocab * 4 / 2**20:,.0f} MiB")  # fmt: skip
    print("| loss | step seconds | peak memory (MiB) | ratio of memory | ratio of time | loss value |")
    print("|---|---|---|---|---|---|")
    for fused, row in rows.items():
        print(f"| {'fused (chunked)' if fused else 'transformers'} | {row['seconds']:.3f} | "
              f"{row['peak_bytes'] / 2**20:,.0f} | {row['peak_bytes'] / base['peak_bytes']:.2f} | "
              f"{row['seconds'] / base['seconds']:.2f} | {row['loss']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
