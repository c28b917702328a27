"""Generation for every command that makes a model write: stop tokens, prompts as token ids, batched sampling
(rollouts for ppo and pairs) cut at the stop token, and greedy answers with exact match for held-out questions."""

from __future__ import annotations

from contextlib import contextmanager

from pipeline.rewards import exact_match

END_OF_TURN_TOKENS = ("<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>")  # ours, Llama 3, ChatML, Gemma


def stop_tokens(tokenizer) -> dict[str, int]:
    """The tokens that end a reply, by text and id: EOS first, then each end-of-turn token the tokenizer has
    (ours, Llama 3, ChatML, Gemma). One lookup per token: get_vocab() copies the whole vocabulary, and calling it
    per row made answer-only loss on SmolLM2 cost 70 ms a row."""
    stops = {getattr(tokenizer, "eos_token", None) or "": tokenizer.eos_token_id}
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if (
            token_id is not None
            and token_id != getattr(tokenizer, "unk_token_id", None)
            and token_id not in stops.values()
        ):
            stops[token] = token_id
    return {text: token_id for text, token_id in stops.items() if token_id is not None}


def generation_config(tokenizer):
    """Greedy by default; stop at EOS and at any end-of-turn token the tokenizer has (stop_tokens)."""
    from transformers import GenerationConfig

    stops = list(stop_tokens(tokenizer).values())
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
        do_sample=False, max_new_tokens=64,
    )  # fmt: skip


def as_messages(question) -> list[dict]:
    """A question as a conversation: a message list as it is, a string as one user turn."""
    return question if isinstance(question, list) else [{"role": "user", "content": question}]


def encode_prompts(tokenizer, prompts: list) -> list[list[int]]:
    """Token ids of each prompt: message lists through the chat template with the generation prompt (which holds
    BOS where the model wants one), strings as the tokenizer encodes them."""
    ids = []
    for prompt in prompts:
        if isinstance(prompt, list):
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids.append(tokenizer(prompt)["input_ids"])
    return ids


@contextmanager
def only_these_settings(model):
    """generate() fills every setting its GenerationConfig leaves unset (None) from the model's own
    generation_config: a hub model's repetition_penalty, top_k, min_p, min_new_tokens or suppress_tokens would
    then change what is sampled, and log-probs and KL computed from softmax(logits / T) would describe another
    distribution. For the call, the model's own is an empty GenerationConfig: only transformers' neutral defaults
    fill the gaps (its top_k 50 is overridden by ours)."""
    from transformers import GenerationConfig

    owner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the HF model generates
    saved = owner.generation_config
    owner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        owner.generation_config = saved


def rollout(
    model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
    top_p: float = 1.0, greedy: bool = False, group: int = 1,
) -> dict:  # fmt: skip
    """Sample one response per prompt (left-padded batch, KV cache) and cut it after its first stop token. Exactly
    softmax(logits / temperature), nucleus-cut at top_p: nothing from the model's generation_config applies.
    `group` > 1: the prompts come in runs of `group` copies (several samples of one prompt); each run's prompt is
    encoded once and its KV cache repeated, instead of once per sample (on the smollm2 recipe the prompt pass is
    most of a rollout's cost).

    Returns ids = prompt + response (the response padded after its stop token), attention_mask, context_length,
    responses, mask (response tokens kept), has_stop, last_index, generated_tokens (as `generate` produced)."""
    import torch
    from transformers import GenerationConfig

    from pipeline.rl.core import truncate_after_stop

    device = next(model.parameters()).device
    width = max(len(p) for p in prompt_ids)
    pad = tokenizer.pad_token_id
    prompts = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    stops = generation_config(tokenizer).eos_token_id
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                                  bos_token_id=tokenizer.bos_token_id, use_cache=True, **sampling)  # fmt: skip
    shared = group > 1 and width > 1 and all(
        prompt_ids[i] == prompt_ids[i - i % group] for i in range(len(prompt_ids))
    ) and len(prompt_ids) % group == 0  # fmt: skip
    with torch.no_grad(), only_these_settings(model):
        cache = {cache_keyword(model): prompt_cache(model, prompts, prompt_mask, group)} if shared else {}
        output = model.generate(input_ids=prompts, attention_mask=prompt_mask, generation_config=gen_config, **cache)
    generated = output[:, width:]
    responses, mask, has_stop, last_index = truncate_after_stop(generated, stops, pad)
    # generate pads finished rows; with pad == EOS (Llama 3, SmolLM, Qwen bases) that pad looks like a stop token,
    # so the kept tokens are counted by position instead
    produced = int(mask.sum()) if pad in stops else int((generated != pad).sum())
    return {
        "ids": torch.cat([prompts, responses], 1), "attention_mask": torch.cat([prompt_mask, mask], 1),
        "context_length": width, "responses": responses, "mask": mask, "has_stop": has_stop,
        "last_index": last_index, "generated_tokens": produced,
    }  # fmt: skip


def prompt_cache(model, prompts, prompt_mask, group: int):
    """The KV cache of every prompt but its last token, computed once per run of `group` equal prompts and repeated
    for each: generate then feeds the last prompt token and goes on as if it had encoded the whole batch. Positions
    as generate counts them in a left-padded batch (pipeline.rl.core.position_ids_from_mask)."""
    from pipeline.rl.core import position_ids_from_mask

    unique, mask = prompts[::group, :-1], prompt_mask[::group, :-1]
    out = model(input_ids=unique, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    cache.batch_repeat_interleave(group)
    return cache


def cache_keyword(model) -> str:
    """What generate calls a prefilled KV cache: `cache` from transformers 5.2x, `past_key_values` before."""
    import inspect

    owner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(owner.forward).parameters else "past_key_values"


def take_rows(batch: dict, rows: list[int]) -> dict:
    """The rollout batch of `rows` only (in that order), its left padding trimmed to the longest kept prompt.
    generated_tokens keeps the count of the whole draw: it measures sampling throughput."""
    import torch

    index = torch.tensor(rows, device=batch["ids"].device)
    kept = {key: batch[key][index] for key in ("ids", "attention_mask", "responses", "mask", "has_stop", "last_index")}
    prompt_mask = kept["attention_mask"][:, : batch["context_length"]]
    cut = int((prompt_mask.cumsum(1) == 0).sum(1).min()) if len(rows) else 0  # columns of padding every row has
    kept["ids"], kept["attention_mask"] = kept["ids"][:, cut:], kept["attention_mask"][:, cut:]
    return {**kept, "context_length": batch["context_length"] - cut, "generated_tokens": batch["generated_tokens"]}


def greedy_answers(model, tokenizer, questions: list, max_new_tokens: int, batch_size: int = 32) -> dict:
    """The model's greedy answer to each question (a string is one user turn; chat template, generation prompt),
    `batch_size` questions per generate call, in eval mode. Returns texts (special tokens dropped, not stripped)
    and stopped (a stop token came before max_new_tokens)."""
    was_training = model.training
    model.eval()
    ids = encode_prompts(tokenizer, [as_messages(q) for q in questions])
    texts, stopped = [], []
    try:
        for start in range(0, len(ids), batch_size):
            batch = rollout(model, tokenizer, ids[start : start + batch_size], max_new_tokens, greedy=True)
            texts += tokenizer.batch_decode(batch["responses"], skip_special_tokens=True)
            stopped += batch["has_stop"].tolist()
    finally:
        model.train(was_training)
    return {"texts": texts, "stopped": stopped}


def greedy_exact_match(rows: list[dict], texts: list[str]) -> tuple[float, list[dict]]:
    """Share of rows (`question`, `answer`) whose greedy answer equals `answer` under rewards.exact_match, and the
    first three answers as examples."""
    hits = exact_match([r["question"] for r in rows], texts, [str(r["answer"]) for r in rows])
    examples = [{"question": r["question"], "answer": r["answer"], "generated": t.strip()}
                for r, t in zip(rows[:3], texts[:3], strict=True)]  # fmt: skip
    return sum(hits) / len(hits), examples


def heldout_metrics(model, tokenizer, rows: list[dict], scorers: dict, max_new_tokens: int, accelerator) -> dict:
    """One greedy answer per held-out question (`question`, `answer` rows): its exact match (greedy_exact_match),
    the mean of each `scorers[name](prompts, texts, references)` under its name (e.g. "reward"), and the share of
    answers without a stop token. Every process answers its share (distributed.on_every_rank: no process waits at
    a collective while another evaluates) and all get the same numbers."""
    from pipeline.distributed import on_every_rank

    def answer(share: list[dict]) -> list[tuple]:
        answers = greedy_answers(model, tokenizer, [r["question"] for r in share], max_new_tokens)
        questions, references = [as_messages(r["question"]) for r in share], [r["answer"] for r in share]
        scores = [scorer(questions, answers["texts"], references) for scorer in scorers.values()]
        per_row = list(zip(*scores, strict=True)) if scores else [()] * len(share)
        return list(zip(answers["texts"], answers["stopped"], per_row, strict=True))

    answered = on_every_rank(rows, answer, accelerator)
    texts, stopped = [a[0] for a in answered], [a[1] for a in answered]
    match, examples = greedy_exact_match(rows, texts)
    means = {name: sum(a[2][k] for a in answered) / len(rows) for k, name in enumerate(scorers)}
    return {"exact_match": match, **means, "no_eos_share": stopped.count(False) / len(rows), "examples": examples,
            "processes": accelerator.num_processes}  # fmt: skip
