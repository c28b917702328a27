"""Label preference pairs in a terminal (works over SSH): two responses to a prompt, one key per judgement.

    llmpipe annotate --pairs pairs.jsonl --log labels.jsonl --annotator alice
    llmpipe annotate --pairs sampled.jsonl --log labels.jsonl --annotator bo prompts=prompts.jsonl model=runs/tiny/sft
    llmpipe annotate export --log labels.jsonl --out preference.jsonl     (then: llmpipe reward data.path=...)
    llmpipe annotate stats --log labels.jsonl

The pairs file has one JSON object per line: `prompt` (a string or a chat message list) and `response_a`,
`response_b` (strings or assistant message lists). With `prompts` and `model`, two different responses per prompt
are sampled first and written to the pairs file, so labelling never waits on the model.

Keys: 1 = A better, 2 = B better, t = tie, b = both bad, s = skip, u = undo the last label, r = add a rationale,
g = guidelines, q = quit. Enter and unknown keys label nothing. Which response is A (left) is drawn per pair and
annotator and recorded. Every action is appended to the log and fsync'd before "saved: ..." is printed; running the
same command again resumes where this annotator stopped.
"""

from __future__ import annotations

import codecs
import fcntl
import json
import os
import random
import re
import select
import termios
import tty
from contextlib import contextmanager
from pathlib import Path

from pipeline.annotation_log import (
    DECISIVE,
    AnnotationLog,
    Pair,
    jsonl_objects,
    load_pairs,
    new_record,
    raise_problems,
)
from pipeline.config import UserError, config, field

FLAGS = ("pairs", "log", "annotator")  # config keys that the command line also takes as --pairs FILE etc.
KEY_LABELS = {"t": "tie", "b": "both_bad", "s": "skip"}  # 1 and 2 depend on the sides shown
KEY_HELP = "keys: 1 A better  2 B better  t tie  b both bad  s skip  u undo  r rationale  g guidelines  q quit"
SHOWN = {"tie": "tie", "both_bad": "both bad", "skip": "skip"}


@config
class AnnotateConfig:
    pairs: str = field(help="Pairs JSONL (prompt, response_a, response_b); with prompts+model, sampled pairs go here.")
    log: str = field(help="Append-only JSONL log of every action; shared by all annotators of these pairs.")
    annotator: str = field(help="Who is labelling (letters, digits, . _ - @); resumes where this name stopped.")
    annotators_per_pair: int | None = field(
        None, "Show a pair only while fewer than N other annotators have labelled it (None: to everyone).", ge=1
    )
    guidelines: str | None = field(None, "Labelling guidelines, shown on `g`: the text itself or a text file.")
    seed: int = field(0, "Seed of the side draw (which response is shown as A) and of sampling.")
    side_by_side_width: int = field(100, "Terminals at least this many columns wide show A and B side by side.")
    # --- sampling pairs from a model
    prompts: str | None = field(None, "Prompts JSONL (a 'prompt' string or message list per line) to sample from.")
    model: str | None = field(None, "Model to sample two responses per prompt from: a stage folder or HF path.")
    tokenizer: str | None = field(None, "Tokenizer for sampling (None: the model's).")
    temperature: float = field(1.0, "Sampling temperature.", gt=0)
    top_p: float = field(0.95, "Nucleus sampling: keep the smallest set of tokens with this much probability.", gt=0)
    max_new_tokens: int = field(128, "Longest sampled response, in tokens.", ge=1)
    sample_tries: int = field(4, "Draws per prompt to get two different responses; a prompt that fails is dropped.")
    sample_batch_size: int = field(16, "Prompts per generate call when sampling.", ge=1)
    trust_remote_code: bool = field(False, "Allow models that ship their own Python code. Off: safe.")

    def check(self) -> list[str]:
        problems = []
        if not re.fullmatch(r"[\w.@-]+", self.annotator):
            problems.append(f"annotator: got {self.annotator!r}; use letters, digits and . _ - @ only")
        if (self.prompts is None) != (self.model is None):
            problems.append(f"prompts ({self.prompts!r}) and model ({self.model!r}) go together: set both or neither")
        if Path(self.log).resolve() == Path(self.pairs).resolve():
            problems.append(f"log and pairs are the same file ({self.log}); the log needs its own file")
        return problems


Config = AnnotateConfig


# --- sampling two responses per prompt --------------------------------------------------------------------------


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


def sample_pairs(cfg: AnnotateConfig) -> None:
    """Write cfg.pairs from cfg.prompts: two different sampled responses per prompt (chat prompts through the chat
    template), `sample_batch_size` prompts per generate call. Written atomically: a half-sampled file never exists."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from pipeline.artifacts import atomic_write_text
    from pipeline.modeling import load_tokenizer, resolve_model_path
    from pipeline.stages.pretrain import generation_config

    prompts = _read_prompts(cfg.prompts)
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(cfg.tokenizer or model_path, cfg.trust_remote_code)
    if any(isinstance(p, list) for p in prompts) and not tokenizer.chat_template:
        raise UserError(f"tokenizer of {cfg.model} has no chat template, but {cfg.prompts} holds chat prompts")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code,
                                                     use_safetensors=True).eval()  # fmt: skip
    except (OSError, ValueError) as exc:
        raise UserError(f"model: cannot load {model_path!r}: {' '.join(str(exc).split())[:300]}") from None
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer.padding_side = "left"  # sampled tokens must follow each prompt directly
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    stops = generation_config(tokenizer).eos_token_id  # EOS and end-of-turn tokens
    # A chat template already holds BOS where the model wants one; a plain prompt gets the tokenizer's specials.
    encoded = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
               if isinstance(p, list) else tokenizer(p) for p in prompts]  # fmt: skip
    responses: list[list[str]] = [[] for _ in prompts]
    torch.manual_seed(cfg.seed)
    for _ in range(cfg.sample_tries):  # a prompt whose two samples came out equal (or empty) is drawn again
        todo = [i for i, found in enumerate(responses) if len(found) < 2]
        batches = [todo[start : start + cfg.sample_batch_size] for start in range(0, len(todo), cfg.sample_batch_size)]
        for batch_ids in tqdm(batches, desc=f"sampling 2 responses for {len(todo)} prompts", disable=not todo):
            batch = tokenizer.pad([{"input_ids": encoded[i]["input_ids"]} for i in batch_ids], return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**batch.to(model.device), do_sample=True, temperature=cfg.temperature,
                                     top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, num_return_sequences=2,
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
        raise UserError(f"{cfg.model}: no prompt of {cfg.prompts} gave two different non-empty responses")
    atomic_write_text(cfg.pairs, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"sampled {len(rows)} pairs from {cfg.model} -> {cfg.pairs} "
          f"({len(prompts) - len(rows)} prompts without two different responses, left out)")  # fmt: skip


# --- keys -------------------------------------------------------------------------------------------------------


class Keys:
    """Single key presses from stdin: cbreak mode on a terminal (no Enter needed, no echo; Ctrl-C still works)."""

    def __init__(self, fd: int = 0):
        self.fd, self.pending = fd, ""
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.saved = termios.tcgetattr(fd) if os.isatty(fd) else None

    def __enter__(self) -> Keys:
        if self.saved is not None:
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def _fill(self) -> bool:
        data = os.read(self.fd, 64)
        self.pending += self.decoder.decode(data)
        return bool(data)

    def read(self) -> str:
        """One key; 'escape' for an escape sequence (arrows, F-keys), '' at end of input."""
        while not self.pending:
            if not self._fill():
                return ""
        key, self.pending = self.pending[0], self.pending[1:]
        if key == "\x1b":  # an arrow or function key is ESC [ ...: wait a moment for the rest, then drop it
            if not self.pending and select.select([self.fd], [], [], 0.05)[0]:
                self._fill()
            self.pending = re.sub(r"^(\[[0-9;]*[A-Za-z~]|O[A-Za-z])?", "", self.pending)
            return "escape"
        return key

    def line(self) -> str:
        """A line of text, typed with the terminal's own line editing."""
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
        try:
            while "\n" not in self.pending and "\r" not in self.pending:
                if not self._fill():
                    break
            text, _, self.pending = self.pending.replace("\r", "\n").partition("\n")
            return text.strip()
        finally:
            if self.saved is not None:
                tty.setcbreak(self.fd)


# --- screen -----------------------------------------------------------------------------------------------------


def _as_text(value: str | list[dict]) -> str:
    if isinstance(value, str):
        return value
    if len(value) == 1 and value[0]["role"] == "assistant":
        return value[0]["content"]
    return "\n\n".join(f"[{m['role']}] {m['content']}" for m in value)


class Screen:
    def __init__(self, cfg: AnnotateConfig, total: int):
        from rich.console import Console

        self.cfg, self.total, self.console = cfg, total, Console(highlight=False)
        self.warnings: list[str] = []  # shown at the top of the next screen, where a clear cannot wipe them

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def notices(self, notice: str) -> None:
        for message in self.warnings:
            self.say(f"warning: {message}", "yellow")
        self.warnings.clear()
        if notice:
            self.say(notice, "green")

    def say(self, message: str, style: str = "") -> None:
        from rich.text import Text

        self.console.print(Text(message, style=style))

    def show(self, pair: Pair, left: str, log: AnnotationLog, notice: str) -> None:
        from rich import box
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        sides = {"A": getattr(pair, f"response_{left}"), "B": getattr(pair, f"response_{'b' if left == 'a' else 'a'}")}
        self.console.clear()
        self.notices(notice)
        done = {name: len(labels) for name, labels in sorted(log.labels.items()) if labels}
        progress = "   ".join(f"{name} {count}/{self.total}" for name, count in done.items())
        mine = done.get(self.cfg.annotator, 0)
        self.say(f"{self.cfg.annotator}: pair {mine + 1} of {self.total} (line {pair.line})   done: {progress or '-'}")
        self.console.print(Panel(Text(_as_text(pair.prompt)), title="prompt", title_align="left"))
        if self.console.width >= self.cfg.side_by_side_width:
            table = Table(box=box.ROUNDED, expand=True, show_lines=False)
            for name in sides:
                table.add_column(name, ratio=1, justify="left", header_style="bold")
            table.add_row(*(Text(_as_text(v)) for v in sides.values()))
            self.console.print(table)
        else:
            for name, value in sides.items():
                self.console.print(Panel(Text(_as_text(value)), title=name, title_align="center"))
        self.say(KEY_HELP, "bold")

    def guidelines(self) -> None:
        from rich.markdown import Markdown

        text = self.cfg.guidelines
        if text and len(text) < 4096 and Path(text).is_file():
            text = Path(text).read_text(encoding="utf-8")
        self.console.print(Markdown(text or "No guidelines were given (set `guidelines=` in the config)."))
        self.say("(press any key to go back)", "dim")


# --- labelling --------------------------------------------------------------------------------------------------


@contextmanager
def annotator_lock(log_path: Path, annotator: str):
    """One terminal per annotator and log: a second one would show the same pairs and label them twice."""
    lock_path = log_path.with_name(f".{log_path.name}.{annotator}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{annotator} is already labelling with {log_path} in another terminal") from None
        yield


def side_shown_left(cfg: AnnotateConfig, pair: Pair) -> str:
    """'a' or 'b': drawn per (annotator, pair), the same after a restart, independent between annotators."""
    return random.Random(f"{cfg.seed}:{cfg.annotator}:{pair.id}").choice("ab")


def next_pair(cfg: AnnotateConfig, pairs: list[Pair], log: AnnotationLog, first: str | None) -> Pair | None:
    mine = log.labels.get(cfg.annotator, {})
    candidates = sorted(pairs, key=lambda p: p.id != first)  # an undone pair comes back first
    for pair in candidates:
        if pair.id in mine:
            continue
        others = [name for name, label in log.votes(pair.id).items() if label != "skip"]
        if cfg.annotators_per_pair is None or len(others) < cfg.annotators_per_pair:
            return pair
    return None


def label_loop(cfg: AnnotateConfig, pairs: list[Pair], log: AnnotationLog, keys: Keys, screen: Screen) -> None:
    notice, first = "", None
    index = {p.id: i + 1 for i, p in enumerate(pairs)}
    while True:
        log.refresh()  # other annotators' labels: progress, and annotators_per_pair
        pair = next_pair(cfg, pairs, log, first)
        if pair is None:
            mine = len(log.labels.get(cfg.annotator, {}))
            screen.notices(notice)
            screen.say(f"all done: {cfg.annotator} has labelled {mine} of {len(pairs)} pairs "
                       "(u = undo the last label, q = quit)", "bold")  # fmt: skip
        else:
            left = side_shown_left(cfg, pair)
            screen.show(pair, left, log, notice)
        notice = ""
        while True:
            key = keys.read()
            if key in ("q", "Q", "", "\x04"):  # q, end of input, Ctrl-D
                mine = len(log.labels.get(cfg.annotator, {}))
                screen.say(f"quit: {cfg.annotator} has labelled {mine} of {len(pairs)} pairs; "
                           "run the same command to resume")  # fmt: skip
                return
            if key == "u":
                last = log.last_label(cfg.annotator)
                if last is None:
                    screen.say("nothing to undo", "yellow")
                    continue
                record = new_record("undo", cfg.annotator, last["pair"], undoes=last["id"])
                log.append(record)
                shown = "A" if last["label"] == last["left"] else "B" if last["label"] in DECISIVE else ""
                was = shown or SHOWN[last["label"]]
                notice = f"undone: pair {index.get(last['pair'])} [{last['pair']}] was {was} (record {record['id']})"
                first = last["pair"]
                break
            if pair is not None and key in ("1", "2", *KEY_LABELS):
                label = {"1": left, "2": "b" if left == "a" else "a"}.get(key) or KEY_LABELS[key]
                record = new_record("label", cfg.annotator, pair.id, label=label, left=left, key=key)
                log.append(record)  # on disk (fsync'd) before it is acknowledged
                shown = {"1": "A", "2": "B"}.get(key) or SHOWN[label]
                notice = f"saved: pair {index[pair.id]} [{pair.id}] -> {shown} (record {record['id']})"
                first = None
                break
            if pair is not None and key == "r":
                screen.say("rationale (Enter to save, empty to cancel): ", "bold")
                text = keys.line()
                if text:
                    record = new_record("rationale", cfg.annotator, pair.id, text=text)
                    log.append(record)
                    screen.say(f"saved: rationale for pair {index[pair.id]} (record {record['id']})", "green")
                continue
            if key in ("g", "?"):
                screen.guidelines()
                keys.read()
                break
            name = {"\r": "Enter", "\n": "Enter", " ": "Space", "escape": "an arrow/escape key"}.get(key, repr(key))
            screen.say(f"{name} does nothing here, nothing was labelled; {KEY_HELP}", "yellow")


def run(cfg: AnnotateConfig) -> None:
    # --- pairs: sample them first if asked (an existing pairs file is reused, so every annotator labels the same)
    if cfg.prompts is not None and not Path(cfg.pairs).exists():
        sample_pairs(cfg)
    elif cfg.prompts is not None:
        print(f"{cfg.pairs} exists: labelling its pairs (delete it to sample new ones from {cfg.model})")
    pairs = load_pairs(cfg.pairs)

    # --- the log: a log of other pairs is refused before anything is written
    log_path, screen = Path(cfg.log), Screen(cfg, len(pairs))
    log = AnnotationLog(log_path, warn=screen.warn).refresh()
    if log.header is not None:
        log.check_pairs(cfg.pairs, pairs)
    with annotator_lock(log_path, cfg.annotator), Keys() as keys:
        log.open_for_append(cfg.pairs, pairs)
        try:
            label_loop(cfg, pairs, log, keys, screen)
        finally:
            log.close()
