"""Public data layouts that trl does not read (ShareGPT, Alpaca), turned into trl's own as files are loaded: the
data layer calls public_layouts on every source, so every stage and mixture takes them as published."""

from __future__ import annotations

import json

from pipeline.config import UserError

# ShareGPT speakers and the chat roles they are (LLaMA-Factory and axolotl read the same names); tool turns
# (function_call, observation) have no place in a plain chat and are refused by name.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}  # fmt: skip


def public_layouts(ds, source: str, columns: list[str]):
    """Rows in the two public layouts trl does not read, as trl's `messages` / preference form, so every stage
    and mixture takes them as they are published (after any data.columns renaming; a column mapped by hand wins):

    - ShareGPT: `conversations` (or `messages`) of {from, value} turns, from human / gpt / system (also user,
      assistant, chatgpt), an optional `system` string column -> `messages`. With `chosen` / `rejected` single
      {from, value} turns (LLaMA-Factory's preference layout) -> `prompt` messages plus one-message replies.
    - Alpaca: `instruction`, optional `input` (joined to it by a blank line), optional `system` and `history`
      ([[question, answer], ...] turns before it) -> `messages` ending with `output` as the assistant's turn; with
      `chosen` / `rejected` strings instead of `output` -> `prompt` messages with those replies. A `text` column
      beside them (tatsu-lab/alpaca's prompt rendered in Alpaca's own template) is dropped: the model's chat
      template renders the turns instead.
    Anything else is returned untouched. A ShareGPT turn from another speaker is an error naming row and speaker.
    `columns`: the dataset's columns (a streaming dataset does not know them before its first row)."""
    chat_column = next((c for c in ("messages", "conversations") if c in columns), None)
    if chat_column is not None:  # only then is a row read: text corpora and trl layouts pass untouched
        first = next(iter(ds), None)
        if first is not None and _sharegpt_turns(first[chat_column]):
            return _from_sharegpt(ds, source, chat_column, columns)
        if chat_column == "conversations" and isinstance(first and first["conversations"], list):
            return ds.rename_column("conversations", "messages")  # role/content turns under the other name
    if "instruction" in columns and not {"messages", "prompt"} & set(columns):
        if "output" in columns or {"chosen", "rejected"} <= set(columns):
            return _from_alpaca(ds, columns)
    return ds


def _sharegpt_turns(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "from" in value[0]


def _sharegpt_messages(turns, where: str) -> list[dict]:
    messages = []
    for j, turn in enumerate(turns if isinstance(turns, list) else [turns]):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise UserError(f"{where}: turn {j} is not a ShareGPT turn {{from, value}}: {json.dumps(turn)[:60]}")
        role = SHAREGPT_ROLES.get(str(turn.get("from")).lower())
        if role is None:
            raise UserError(f"{where}: turn {j} is from {turn.get('from')!r}; ShareGPT speakers read here: "
                            f"{', '.join(SHAREGPT_ROLES)}. Drop or rename that turn")  # fmt: skip
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _from_sharegpt(ds, source: str, chat_column: str, columns: list[str]):
    preference = "chosen" in columns and "rejected" in columns

    def convert(row, index):
        where = f"{source}: row {index}"
        system = row.get("system")
        head = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
        messages = head + _sharegpt_messages(row[chat_column], f"{where}: {chat_column!r}")
        if not preference:
            return {"messages": messages}
        return {"prompt": messages, "chosen": _sharegpt_messages(row["chosen"], f"{where}: 'chosen'"),
                "rejected": _sharegpt_messages(row["rejected"], f"{where}: 'rejected'")}  # fmt: skip

    drop = [c for c in (chat_column, "system", "chosen", "rejected") if c in columns]
    return ds.map(convert, with_indices=True, remove_columns=drop)


def _from_alpaca(ds, columns: list[str]):
    reply = "output" if "output" in columns else None

    def convert(row):
        messages = [{"role": "system", "content": row["system"]}] if str(row.get("system") or "").strip() else []
        for turn in row.get("history") or []:
            messages += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
        extra = str(row.get("input") or "").strip()
        messages.append({"role": "user", "content": str(row["instruction"]) + (f"\n\n{extra}" if extra else "")})
        if reply is None:
            return {"prompt": messages}
        return {"messages": messages + [{"role": "assistant", "content": str(row[reply])}]}

    drop = [c for c in ("instruction", "input", "output", "system", "history", "text") if c in columns]
    return ds.map(convert, remove_columns=drop)
