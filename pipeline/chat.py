"""What a chat template does with a conversation: where each assistant turn lies in the rendered text, found for
any template (no {% generation %} markers needed), as the token mask answer-only loss trains on.

Almost no real chat template has trl's generation markers (ChatML/SmolLM2, Llama 3, Qwen, Mistral...), so the
spans are found the way that works for every template that renders a conversation's prefixes consistently: the
text of turn i is what rendering messages[:i + 1] adds to rendering messages[:i] with the generation prompt, cut
after the end-of-turn token that closes the reply (kept: the model must learn to stop), before the template's
trailing newline.
"""

from __future__ import annotations

from pipeline.config import UserError
from pipeline.generation import stop_tokens


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn: the reply and its
    end-of-turn token (EOS, <|im_end|>, <|eot_id|>, <|end|>, <end_of_turn>), not the header before it."""
    full = _render(tokenizer, messages)
    stops = [text for text in stop_tokens(tokenizer) if text]
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        except Exception:  # noqa: BLE001 - a template may refuse an empty or unusual prefix; then it has none
            before = ""
        through = _render(tokenizer, messages[: i + 1])
        if not through.startswith(before) or not full.startswith(through[: len(through.rstrip())]):
            raise UserError(
                "the chat template renders a conversation's turns differently depending on what follows them "
                f"(turn {i}), so the assistant's tokens cannot be found; give the template {{% generation %}} "
                "markers or set assistant_only_loss=false"
            )
        start, end = len(before), len(through)
        reply_at = through.find(message["content"], start) if message["content"] else -1
        search_from = reply_at + len(message["content"]) if reply_at >= 0 else start
        found = [(through.find(stop, search_from), stop) for stop in stops]
        found = [(at, stop) for at, stop in found if at >= 0]
        if found:  # the reply ends at its end-of-turn token; what the template adds after it is not the answer
            at, stop = min(found)
            end = at + len(stop)
        spans.append((start, end))
    return full, spans


def assistant_token_mask(tokenizer, messages: list[dict]) -> dict[str, list[int]]:
    """`input_ids` of the rendered conversation (what apply_chat_template(tokenize=True) gives) and
    `assistant_masks`: 1 on every token that overlaps an assistant span, the column trl's SFTTrainer builds labels
    from."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("assistant-only loss without {% generation %} markers needs a fast tokenizer (offsets)")
    full, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s < span_end and e > span_start for span_start, span_end in spans))
            for s, e in encoded["offset_mapping"]]  # fmt: skip
    return {"input_ids": encoded["input_ids"], "assistant_masks": mask}


def reply_ids(tokenizer, prompt: str | list[dict], reply: str) -> list[int]:
    """The token ids a model emits for `reply` to `prompt`: under the chat template, the assistant turn as the
    template writes it after the generation prompt, through its end-of-turn token; for a plain-text prompt, the
    reply and EOS."""
    if not isinstance(prompt, list):
        return tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    full, spans = assistant_spans(tokenizer, prompt + [{"role": "assistant", "content": reply}])
    start, end = spans[-1]
    return tokenizer(full[start:end], add_special_tokens=False)["input_ids"]


def reply_prefix(tokenizer) -> str:
    """The whitespace the chat template writes between its generation prompt and a reply: "" for most templates
    (ChatML, Llama 3: the prompt ends in a newline), " " where a space separates the header from the answer (Llama
    2's `[/INST] answer`, llmpipe's tokenizer). Byte-level BPE joins that space to the answer's first word, so a
    continuation scored after a generation prompt (a multiple-choice option) must start with it to be tokenized
    as the model writes it. Anything but whitespace (a template that writes an empty think block) is not the
    reply's: then ""."""
    marker = "\x00reply\x00"
    user = [{"role": "user", "content": "?"}]
    try:
        prompt = _render(tokenizer, user, generation_prompt=True)
        full = _render(tokenizer, user + [{"role": "assistant", "content": marker}])
    except Exception:  # noqa: BLE001 - a template that refuses this conversation has no prefix to tell
        return ""
    at = full.find(marker, len(prompt))
    between = full[len(prompt) : at] if full.startswith(prompt) and at >= 0 else ""
    return between if not between.strip() else ""
