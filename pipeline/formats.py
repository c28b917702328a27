"""Rows in trl's dataset formats, read and checked row by row before any compute: chat messages (the one
validator every command uses), preference pairs, prompts with their reference answers."""

from __future__ import annotations

import json

from pipeline.config import DataConfig, UserError
from pipeline.data import column_names, load_examples

# --- chat messages: one check for every command that reads them ------------------------------------------------

CHAT_ROLES = ("system", "user", "assistant")


def message_problem(
    value, key: str, roles: tuple[str, ...] = CHAT_ROLES, allow_text: bool = False, last_role: str | None = None
) -> str | None:
    """What is wrong with a message list (or, with `allow_text`, a string) in column `key`, or None: an empty
    value, an entry that is not {role, content: str}, a role outside `roles`, a last message not from `last_role`."""
    if isinstance(value, str) and allow_text:
        return None if value.strip() else f"{key!r} is empty"
    expected = "a string or a non-empty list of messages" if allow_text else "a non-empty list of messages"
    if not isinstance(value, list) or not value:
        return f"{key!r} must be {expected}, got {json.dumps(value)[:60]}"
    for position, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"{key!r} message {position} is not a message with text content: {json.dumps(message)[:60]}"
        if message.get("role") not in roles:
            return f"{key!r} message {position} has role {message.get('role')!r}; expected one of {', '.join(roles)}"
    if last_role is not None and value[-1]["role"] != last_role:
        return f"{key!r} ends with a {value[-1]['role']!r} message; the last message must be the {last_role}'s"
    return None


# --- documents for language modelling ----------------------------------------------------------------------------


def load_documents(cfg: DataConfig, tokenizer):
    """Documents with a 'text' column for pretraining. A source with chat 'messages' instead is rendered by the
    tokenizer's chat template, special tokens included, as sft will show it (mid-training: chat data in the
    pretraining mix, as nanochat's midtraining and Physics of LMs 3.1's mixed training do). A mixture (data.mix)
    may hold both kinds of sources; each is read, checked and rendered alone."""
    from pipeline.data import concatenate_sources, load_mixture

    if cfg.mix is None:
        return _as_documents(load_examples(cfg, []), str(cfg.path), tokenizer)
    return concatenate_sources([(path, _as_documents(ds, path, tokenizer)) for path, ds, _ in load_mixture(cfg, [])])


def _as_documents(ds, source: str, tokenizer):
    import hashlib

    columns = column_names(ds)
    if "text" in columns:
        return ds.select_columns(["text"]) if len(columns) > 1 else ds
    if "messages" not in columns:
        raise UserError(f"data: {source} has neither a 'text' column nor chat 'messages'; columns present: "
                        f"{columns}. Map one with data.columns.text=<column>")  # fmt: skip
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"data: {source} holds chats ('messages'), but the tokenizer has no chat template to "
                        "render them; give a tokenizer with one (the tokenizer stage writes one)")  # fmt: skip

    def render(row):
        return {"text": tokenizer.apply_chat_template(row["messages"], tokenize=False)}

    if not hasattr(ds, "_fingerprint"):  # streaming: rendered as it is read
        return ds.map(render, remove_columns=columns)
    for line, messages in enumerate(ds["messages"]):
        problem = message_problem(messages, "messages")
        if problem:
            raise UserError(f"{source}: row {line + 1}: {problem}")
    key = f"{ds._fingerprint}-{tokenizer.chat_template}-render-v1".encode()  # the same cache for the same inputs
    return ds.map(render, remove_columns=columns, new_fingerprint=hashlib.sha256(key).hexdigest()[:16])


# --- preference pairs -------------------------------------------------------------------------------------------


def load_preference_pairs(cfg: DataConfig):
    """Pairs in trl's preference formats (explicit or implicit prompt, strings or message lists), checked row by
    row before any training: returns (dataset with prompt?/chosen/rejected, is_conversational)."""
    ds = load_examples(cfg, required=["chosen", "rejected"])
    ds = ds.select_columns([c for c in ("prompt", "chosen", "rejected") if c in ds.column_names])
    source = str(cfg.path)
    if "prompt" in ds.column_names and isinstance(ds[0]["prompt"], str) != isinstance(ds[0]["chosen"], str):
        ds = _as_explicit_conversations(ds, source)
    conversational = isinstance(ds[0]["chosen"], list)
    keys = ("prompt", "chosen", "rejected") if "prompt" in ds.column_names else ("chosen", "rejected")
    for i, row in enumerate(ds):
        for key in keys:
            value = row.get(key)
            if value is None or (isinstance(value, (str, list)) and len(value) == 0):
                raise UserError(f"{source}: row {i}: {key!r} is missing or empty")
            if conversational != isinstance(value, list):
                raise UserError(f"{source}: row {i}: {key!r} mixes message lists and plain strings")
            problem = message_problem(value, key) if conversational else None
            if problem:
                raise UserError(f"{source}: row {i}: {problem}")
        if row["chosen"] == row["rejected"]:
            raise UserError(f"{source}: row {i}: chosen and rejected are identical")
    return ds, conversational


def _as_explicit_conversations(ds, source: str):
    """Public layouts that mix a string prompt with conversations, as trl's explicit conversational form
    (prompt messages; chosen/rejected = the replies after them).

    - HuggingFaceH4/ultrafeedback_binarized: `prompt` a string, `chosen`/`rejected` whole conversations that
      repeat the user turn. The prompt becomes the messages the two conversations share (ending with a user
      turn); the string must be that user turn's text, or the row is refused as disagreeing with itself.
    - `prompt` messages with string replies: each reply becomes one assistant message."""
    from datasets import Dataset

    rows = []
    for i, row in enumerate(ds):
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        if isinstance(prompt, list) and isinstance(chosen, str) and isinstance(rejected, str):
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})  # fmt: skip
            continue
        if not (isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list)):
            raise UserError(f"{source}: row {i}: 'prompt', 'chosen' and 'rejected' mix message lists and plain "
                            "strings in a way no known layout does")  # fmt: skip
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        last_user = next((m for m in reversed(chosen[:shared]) if isinstance(m, dict) and m.get("role") == "user"),
                         None)  # fmt: skip
        if not shared or chosen[shared - 1].get("role") != "user" or last_user is None:
            raise UserError(f"{source}: row {i}: 'chosen' and 'rejected' share no opening turns ending with the "
                            "user's, so the prompt cannot be found in them")  # fmt: skip
        if str(last_user.get("content", "")).strip() != prompt.strip():
            raise UserError(f"{source}: row {i}: 'prompt' is not the text of the conversations' last user turn "
                            f"({prompt[:40]!r} vs {str(last_user.get('content'))[:40]!r}); the row disagrees with "
                            "itself")  # fmt: skip
        rows.append({"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]})
    return Dataset.from_list(rows)


def prompt_key(prompt: str | list) -> str:
    """One string per distinct prompt (text or message list), to keep each prompt once."""
    return json.dumps(prompt, sort_keys=True)


def load_reference_answers(cfg: DataConfig, limit: int) -> list[dict]:
    """Rows with a reference answer for greedy exact match: `question`/`answer` rows, or preference pairs with an
    explicit prompt (`prompt` + `chosen`: the chosen reply is the reference), as trl writes them. Returns at most
    `limit` rows `{"question": str or message list, "answer": str}`, one per distinct question, in file order."""
    ds = load_examples(cfg, required=[])
    columns = ds.column_names
    if {"question", "answer"} <= set(columns):
        pairs = ((row["question"], row["answer"]) for row in ds.select_columns(["question", "answer"]))
    elif {"prompt", "chosen"} <= set(columns):
        pairs = ((row["prompt"], _final_reply(row["chosen"])) for row in ds.select_columns(["prompt", "chosen"]))
    else:
        raise UserError(f"data: {cfg.path} needs `question` and `answer` columns, or `prompt` and `chosen` "
                        f"(a preference file); it has {columns}")  # fmt: skip
    rows, seen = [], set()
    for index, (question, answer) in enumerate(pairs):
        if not question or not isinstance(question, (str, list)) or not isinstance(answer, str) or not answer:
            raise UserError(f"data: {cfg.path}: row {index}: empty or non-text question or reference answer")
        key = prompt_key(question)
        if key not in seen:
            seen.add(key)
            rows.append({"question": question, "answer": answer})
        if len(rows) == limit:
            break
    return rows


REFERENCE_COLUMNS = ("chosen", "answer", "reference", "solution", "ground_truth")  # the last: open-instruct RLVR
PROMPT_COLUMNS = ("prompt", "messages", "question", "problem")  # the first present is read


def load_prompt_rows(
    cfg: DataConfig,
    reference_key: str | None = None,
    rewards: list[str] = (),
    chat: bool = False,
    source_rewards: list[list[str]] | None = None,
) -> list[dict]:
    """Each distinct prompt once, in file order, with its reference answer if the rows have one and the index of
    the data.path entry it came from (its first, where two files ask it):
    `[{"prompt": str or message list, "reference": str or None, "source": int}]`.

    Prompts: a `prompt` column, or `messages` without its final assistant turn (which is then the reference), or
    else a `question` or `problem` column (the GSM8K and MATH layouts; any other: map it with data.columns).
    Reference: the `reference_key` column (a string, or a message list whose last assistant message counts), or
    with None the first of REFERENCE_COLUMNS present (`chosen` of a preference file: its first row per prompt).
    `rewards` (the reward entries or judge that will score answers to these prompts): a rule or task among them
    makes a missing reference an error naming the columns present, and references it cannot score (worked
    solutions under exact_match) an error saying what to use; `source_rewards` says it per data.path entry instead
    (a source scored by a reward model alone needs no reference). With `chat` (the model has a chat template) a
    `question` or `problem` is asked as one user turn, as a chat model is asked: those columns hold the bare
    problem, where a `prompt` string is the text the model continues, as trl reads it."""
    from pipeline.rewards import needs_reference, worked_solutions_problem

    loaded = _prompt_sources(cfg)  # fewer than data.path's entries where max_examples ran out
    per_source = source_rewards[: len(loaded)] if source_rewards is not None else [list(rewards)] * len(loaded)
    rows: dict[str, dict] = {}
    for number, ((where, ds), scorers) in enumerate(zip(loaded, per_source, strict=True)):
        want_reference = any(needs_reference(r) for r in scorers)
        prompts, references, key = _prompts_and_references(ds, where, reference_key, chat, want_reference)
        for index, prompt in enumerate(prompts):
            if not prompt or not isinstance(prompt, (str, list)):
                raise UserError(f"data: {where}: row {index} has an empty prompt or one that is not text/messages")
            reference = references[index] if references is not None else None
            if want_reference and not reference:
                raise UserError(f"data: {where}: row {index} has no reference answer"
                                + (f" in column {key!r}" if key else ""))  # fmt: skip
            rows.setdefault(prompt_key(prompt), {"prompt": prompt, "reference": reference or None, "source": number})
        for reward in scorers:
            if problem := worked_solutions_problem(reward, references or [], f"data: {where}"):
                raise UserError(problem)
    return list(rows.values())


def _prompt_sources(cfg: DataConfig) -> list[tuple[str, object]]:
    """The prompt data as (source, dataset) pairs. Each entry of a list of paths is read in its own layout, so RL
    prompts can mix a chat file (`messages`) with a preference file (`prompt` + `chosen`) or a GSM8K file; a
    mixture's sources are cut or repeated to their weights first. One path: one source."""
    import dataclasses

    from pipeline.data import load_mixture

    if cfg.mix is not None:
        return [(name, ds) for name, ds, _ in load_mixture(cfg, required=[])]
    if not isinstance(cfg.path, list) or len(cfg.path) == 1 or cfg.streaming:
        return [(str(cfg.path), load_examples(cfg, required=[]))]
    sources, left = [], cfg.max_examples  # max_examples counts the rows of all the files, in order
    for path in cfg.path:
        if left == 0:
            break
        ds = load_examples(dataclasses.replace(cfg, path=path, max_examples=None), required=[])
        if left is not None:
            ds = ds.select(range(min(left, len(ds))))
            left -= len(ds)
        sources.append((path, ds))
    return sources


def _prompts_and_references(ds, where: str, reference_key: str | None, chat: bool, want_reference: bool):
    """One source's prompts, its reference answers (None: it has none) and the column they came from."""
    columns = column_names(ds)
    asked = next((c for c in PROMPT_COLUMNS if c in columns), None)
    if asked is None:
        raise UserError(f"data: {where} has no `prompt`, `messages`, `question` or `problem` column (columns: "
                        f"{columns}); map yours with data.columns, e.g. {{prompt: query}}")  # fmt: skip
    references = None
    if asked == "messages":
        chats = list(ds["messages"])
        prompts = [m[:-1] if m and m[-1].get("role") == "assistant" else m for m in chats]
        references = [_final_reply(m) if m and m[-1].get("role") == "assistant" else None for m in chats]
    else:
        prompts = list(ds[asked])
        if chat and asked in ("question", "problem"):
            prompts = [[{"role": "user", "content": p}] if isinstance(p, str) and p else p for p in prompts]
    if reference_key is not None and reference_key not in columns:
        raise UserError(f"reference_key: column {reference_key!r} is not in {where} (columns: {columns})")
    key = reference_key or next((c for c in REFERENCE_COLUMNS if c in columns), None)
    if key is not None:
        references = [_final_reply(v) if isinstance(v, (str, list)) else None for v in ds[key]]
    if want_reference and references is None:
        raise UserError(f"data: {where} has no reference answers: no `messages` and none of the columns "
                        f"{list(REFERENCE_COLUMNS)} (columns: {columns}); set reference_key")  # fmt: skip
    return prompts, references, key


def last_text(value) -> str:
    """The text of a prompt, reply or completion: a string as it is, or the content of its last message."""
    return value[-1]["content"] if isinstance(value, list) else value


def _final_reply(chosen) -> str:
    """The text of a chosen reply: a string, or the last assistant message of a message list."""
    if isinstance(chosen, str):
        return chosen
    replies = [m.get("content") for m in chosen if isinstance(m, dict) and m.get("role") == "assistant"]
    return replies[-1] if replies and isinstance(replies[-1], str) else ""


def _normalised(prompt) -> str:
    """A prompt as comparable text: a message list's last user turn (or a string), case and spacing folded."""
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        prompt = users[-1] if users else ""
    return " ".join(str(prompt).split()).casefold()


def overlap_problem(where: str, prompts: list, questions: list[dict], data_path) -> str | None:
    """The refusal when held-out questions (strings or message lists) are also training prompts, compared by their
    last user turn, case- and whitespace-insensitively, and by a task document's fields the question embeds
    (`asked_fields`: a training prompt that is a gsm8k question without "Question: ...\nAnswer:"): RL on them
    would make the held-out number a training number. None when no question is a training prompt."""
    seen = {_normalised(p) for p in prompts}
    shared = [q["question"] for q in questions
              if any(_normalised(text) in seen for text in (q["question"], *q.get("asked_fields", ())))]  # fmt: skip
    if not shared:
        return None
    return (f"{where}: {len(shared)} of its {len(questions)} held-out questions are training prompts in {data_path} "
            f"(e.g. {shared[0]!r}); a held-out number must not be measured on what RL trained on: remove them from "
            "the training data or the held-out set")  # fmt: skip
