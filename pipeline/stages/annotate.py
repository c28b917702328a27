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

import fcntl
import random
import re
from contextlib import contextmanager
from pathlib import Path

from pipeline.annotation.log import DECISIVE, AnnotationLog, Pair, load_pairs, new_record
from pipeline.annotation.sampling import sample_pairs
from pipeline.annotation.terminal import KEY_HELP, Keys, Screen
from pipeline.config import UserError, config, field

FLAGS = ("pairs", "log", "annotator")  # config keys that the command line also takes as --pairs FILE etc.
KEY_LABELS = {"t": "tie", "b": "both_bad", "s": "skip"}  # 1 and 2 depend on the sides shown
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
        sample_pairs(cfg.prompts, cfg.model, cfg.pairs, tokenizer_name=cfg.tokenizer, seed=cfg.seed,
                     temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                     sample_tries=cfg.sample_tries, sample_batch_size=cfg.sample_batch_size,
                     trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    elif cfg.prompts is not None:
        print(f"{cfg.pairs} exists: labelling its pairs (delete it to sample new ones from {cfg.model})")
    pairs = load_pairs(cfg.pairs)

    # --- the log: a log of other pairs is refused before anything is written
    log_path, screen = Path(cfg.log), Screen(cfg.annotator, len(pairs), cfg.side_by_side_width, cfg.guidelines)
    log = AnnotationLog(log_path, warn=screen.warn).refresh()
    if log.header is not None:
        log.check_pairs(cfg.pairs, pairs)
    with annotator_lock(log_path, cfg.annotator), Keys() as keys:
        log.open_for_append(cfg.pairs, pairs)
        try:
            label_loop(cfg, pairs, log, keys, screen)
        finally:
            log.close()
