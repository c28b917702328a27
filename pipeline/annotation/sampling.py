"""Pairs to label sampled from a model: two different responses per prompt, written as a pairs file before any
labelling starts, so an annotator never waits on the model."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.annotation.log import raise_problems
from pipeline.config import UserError
from pipeline.data import jsonl_objects


def _read_prompts(path: str) -> list:
    if not Path(path).is_file():
        raise UserError(f"prompts: file not found: {path}")
    prompts, problems = [], []
    for lineno, row in jsonl_objects(path, problems):
        if row.get("prompt"):
            prompts.append(row["prompt"])
        else:
            problems.append(f"{path}:{lineno}: no 'prompt' (a string or a message list); it has {sorted(row)}")
    raise_problems(problems or ([] if prompts else [f"{path}: holds no prompts"]))
    return prompts


def sample_pairs(
    prompts_path: str, model_name: str, pairs_path: str, *, tokenizer_name: str | None, seed: int,
    temperature: float, top_p: float, max_new_tokens: int, sample_tries: int, sample_batch_size: int,
    trust_remote_code: bool,
) -> None:  # fmt: skip
    """Write `pairs_path` from the prompts JSONL `prompts_path`: two different responses per prompt sampled from
    `model_name` (a stage folder or HF path; chat prompts through the chat template), `sample_batch_size` prompts
    per generate call, up to `sample_tries` draws per prompt (one that never gives two different non-empty
    responses is left out). Written atomically: a half-sampled file never exists."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from pipeline.artifacts import atomic_write_text
    from pipeline.generation import generation_config, only_these_settings
    from pipeline.modeling import load_tokenizer, resolve_model_path

    prompts = _read_prompts(prompts_path)
    model_path = resolve_model_path(model_name)
    tokenizer = load_tokenizer(tokenizer_name or model_path, trust_remote_code, pad_with_eos=True)
    if any(isinstance(p, list) for p in prompts) and not tokenizer.chat_template:
        raise UserError(f"tokenizer of {model_name} has no chat template, but {prompts_path} holds chat prompts")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True).eval()  # fmt: skip
    except (OSError, ValueError) as exc:
        raise UserError(f"model: cannot load {model_path!r}: {' '.join(str(exc).split())[:300]}") from None
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer.padding_side = "left"  # sampled tokens must follow each prompt directly
    stops = generation_config(tokenizer).eos_token_id  # EOS and end-of-turn tokens
    # A chat template already holds BOS where the model wants one; a plain prompt gets the tokenizer's specials.
    encoded = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
               if isinstance(p, list) else tokenizer(p) for p in prompts]  # fmt: skip
    responses: list[list[str]] = [[] for _ in prompts]
    torch.manual_seed(seed)
    for _ in range(sample_tries):  # a prompt whose two samples came out equal (or empty) is drawn again
        todo = [i for i, found in enumerate(responses) if len(found) < 2]
        batches = [todo[start : start + sample_batch_size] for start in range(0, len(todo), sample_batch_size)]
        for batch_ids in tqdm(batches, desc=f"sampling 2 responses for {len(todo)} prompts", disable=not todo):
            batch = tokenizer.pad([{"input_ids": encoded[i]["input_ids"]} for i in batch_ids], return_tensors="pt")
            with torch.no_grad(), only_these_settings(model):  # the configured sampling, no model defaults
                out = model.generate(**batch.to(model.device), do_sample=True, temperature=temperature,
                                     top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, num_return_sequences=2,
                                     eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for k, text in enumerate(texts):  # rows come as prompt 0 twice, prompt 1 twice, ...
                found = responses[batch_ids[k // 2]]
                if text.strip() and text not in found and len(found) < 2:
                    found.append(text)
    rows = []
    for prompt, found in zip(prompts, responses, strict=True):
        if len(found) == 2:
            a, b = ([{"role": "assistant", "content": r}] if isinstance(prompt, list) else r for r in found)
            rows.append({"prompt": prompt, "response_a": a, "response_b": b})
    if not rows:
        raise UserError(f"{model_name}: no prompt of {prompts_path} gave two different non-empty responses")
    atomic_write_text(pairs_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"sampled {len(rows)} pairs from {model_name} -> {pairs_path} "
          f"({len(prompts) - len(rows)} prompts without two different responses, left out)")  # fmt: skip
