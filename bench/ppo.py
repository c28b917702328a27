"""PPO rollout throughput against bare `model.generate`, and where a PPO step's time goes, in one run.

    python bench/ppo.py [--model runs/tiny/sft --reward runs/tiny/reward] [--batch 32 --max-new-tokens 16]
    python bench/ppo.py --model runs/smollm2-135m/sft --prompts data/smollm2/train.jsonl --samples 4 \
        --batch 96 --max-new-tokens 8 --only-groups       # the smollm2 recipe's rollout: shared prompt encoding

Rollout: the stage's `rollout()` (left padding, generate with KV cache, cut after the stop token, the tensors the
scoring pass needs) against a bare `model.generate` call on the same left-padded batch with the same sampling
settings and seed, so both produce the same tokens. Sides alternate which goes first; best of --trials kept (this
2-core VM varies by +-10% between runs of the same loop). Step split: the real stage for --steps steps on the
same model and prompts (tiny preset config), its per-step rollout / scoring / update clocks from metrics.jsonl,
step 1 left out (warm-up). With --samples n: --batch / n prompts, n samples each, rollout(group=n) (each prompt
encoded once, its KV cache repeated) against rollout() encoding every copy; the same seed gives the same tokens.
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

from pipeline.config import DataConfig, load_config  # noqa: E402
from pipeline.formats import load_prompt_rows  # noqa: E402
from pipeline.generation import encode_prompts, generation_config, rollout  # noqa: E402
from pipeline.modeling import load_tokenizer, resolve_model_path  # noqa: E402
from pipeline.stages import ppo  # noqa: E402


def bare_generate(model, tokenizer, prompt_ids: list[list[int]], settings) -> int:
    """What a script calling generate directly does: left-pad, sample, count the new tokens that are not pad."""
    pad = tokenizer.pad_token_id
    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=settings.temperature,
                             top_p=settings.top_p, top_k=0, max_new_tokens=settings.max_new_tokens,
                             eos_token_id=generation_config(tokenizer).eos_token_id, pad_token_id=pad)  # fmt: skip
    return int((out[:, width:] != pad).sum())


def rollout_speed(args) -> dict:
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = load_tokenizer(path)
    prompts = [row["prompt"] for row in load_prompt_rows(DataConfig(path=args.prompts), None, False)][: args.batch]
    prompt_ids = encode_prompts(tokenizer, prompts)
    settings = ppo.RolloutSection(max_new_tokens=args.max_new_tokens)
    best = {"ours": 0.0, "generate": 0.0}
    tokens = {}
    for trial in range(args.trials + 1):  # trial 0 warms up
        order = ["ours", "generate"] if trial % 2 else ["generate", "ours"]
        for side in order:
            torch.manual_seed(trial)
            start = time.perf_counter()
            if side == "ours":
                batch = rollout(model, tokenizer, prompt_ids, settings.max_new_tokens, settings.temperature,
                                settings.top_p)  # fmt: skip
                n = batch["generated_tokens"]
            else:
                n = bare_generate(model, tokenizer, prompt_ids, settings)
            seconds = time.perf_counter() - start
            tokens.setdefault(trial, {})[side] = n
            if trial:
                best[side] = max(best[side], n / seconds)
    assert all(t["ours"] == t["generate"] for t in tokens.values()), f"the two sides sampled differently: {tokens}"
    return {"ours": best["ours"], "generate": best["generate"], "ratio": best["ours"] / best["generate"]}


def group_speed(args) -> dict:
    """rollout(group=n) against group=1 on batch / n prompts repeated n times: seconds per rollout, best of trials."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = load_tokenizer(path, pad_with_eos=True)
    rows = load_prompt_rows(DataConfig(path=args.prompts), None, False)[: args.batch // args.samples]
    prompts = [row["prompt"] for row in rows]
    prompt_ids = [ids for ids in encode_prompts(tokenizer, prompts) for _ in range(args.samples)]
    best = {1: float("inf"), args.samples: float("inf")}
    responses = {}
    for trial in range(args.trials + 1):  # trial 0 warms up
        for group in (1, args.samples) if trial % 2 else (args.samples, 1):
            torch.manual_seed(trial)
            start = time.perf_counter()
            batch = rollout(model, tokenizer, prompt_ids, args.max_new_tokens, 1.0, 1.0, group=group)
            seconds = time.perf_counter() - start
            responses.setdefault(trial, {})[group] = batch["responses"].tolist()
            if trial:
                best[group] = min(best[group], seconds)
    same = sum(r[1] == r[args.samples] for r in responses.values())
    return {"plain": best[1], "shared": best[args.samples], "ratio": best[1] / best[args.samples],
            "same_tokens": f"{same} of {len(responses)} rollouts"}  # fmt: skip


def step_split(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"output_dir={tmp}/ppo", f"init_from={args.model}", f"reward_model={args.reward}",
                     f"data.path={args.prompts}", "eval_data=null", f"train.steps={args.steps}",
                     f"train.rollout_batch_size={args.batch}", f"rollout.max_new_tokens={args.max_new_tokens}",
                     f"checkpoint_every={args.steps}"]  # fmt: skip
        ppo.run(load_config(ppo.Config, REPO / "configs/tiny/ppo.yaml", overrides))
        rows = [json.loads(line) for line in (Path(tmp) / "ppo" / "metrics.jsonl").read_text().splitlines()][1:]
    split = {k: sum(r[f"{k}_seconds"] for r in rows) / len(rows) for k in ("rollout", "scoring", "update")}
    split["tokens_per_second"] = sum(r["rollout_tokens_per_second"] for r in rows) / len(rows)
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/tiny/sft")
    parser.add_argument("--reward", default="runs/tiny/reward")
    parser.add_argument("--prompts", default=str(REPO / "data/demo/preference.jsonl"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=1, help="samples per prompt: time shared prompt encoding")
    parser.add_argument("--only-groups", action="store_true", help="with --samples: only that table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.samples > 1:
        groups = group_speed(args)
        print(f"| rollout of {args.batch // args.samples} prompts x {args.samples} samples | seconds |\n|---|---|")
        print(f"| every copy of a prompt encoded (group=1) | {groups['plain']:.3f} |")
        print(f"| each prompt encoded once (group={args.samples}) | {groups['shared']:.3f} |")
        print(
            f"speed-up (group=1 / group={args.samples}): {groups['ratio']:.2f}x; same tokens: {groups['same_tokens']}"
        )
        if args.only_groups:
            return

    speed = rollout_speed(args)
    print("| rollout | tokens/s |\n|---|---|")
    print(f"| bare model.generate | {speed['generate']:,.0f} |\n| llmpipe rollout() | {speed['ours']:,.0f} |")
    print(f"ratio (ours / generate): {speed['ratio']:.3f}")
    split = step_split(args)
    total = split["rollout"] + split["scoring"] + split["update"]
    print("\n| part of a PPO step | seconds | share |\n|---|---|---|")
    for key in ("rollout", "scoring", "update"):
        print(f"| {key} | {split[key]:.3f} | {split[key] / total:.1%} |")
    print(f"| total | {total:.3f} | 100% |\nrollout tokens/s inside the stage: {split['tokens_per_second']:,.0f}")


if __name__ == "__main__":
    main()
