"""Export an annotation log as trl preference pairs that `llmpipe reward` and `llmpipe dpo` read as they are.

    llmpipe annotate export --log labels.jsonl --out preference.jsonl [rule=unanimous] [min_annotators=2]
    llmpipe reward --config configs/tiny/reward.yaml data.path=preference.jsonl

Each pair's current labels (undone ones do not count, skips are no vote) are combined by `rule`: `majority`, more
than half of the votes agree; `unanimous`, all agree. A winning A or B becomes a row {prompt, chosen, rejected}:
message lists when the prompt is a chat (trl's conversational format), strings otherwise. Ties, both-bad, skipped
and undecided pairs are left out and counted. The agreement statistics of `llmpipe annotate stats` follow.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pipeline.annotation.log import AnnotationLog, Pair, load_pairs, read_log
from pipeline.annotation.stats import annotation_stats, print_stats
from pipeline.artifacts import atomic_write_text
from pipeline.config import UserError, config, field

FLAGS = ("log", "out")


@config
class AnnotateExportConfig:
    log: str = field(help="The annotation log (JSONL) written by `llmpipe annotate`.")
    out: str = field(help="Where to write the preference pairs (JSONL: prompt, chosen, rejected).")
    pairs: str | None = field(None, "The pairs file (None: the one named in the log's header).")
    rule: str = field("majority", "How several annotators' votes combine: majority (> half agree) or unanimous.")
    min_annotators: int = field(1, "Leave out pairs with fewer votes than this (skips are no vote).", ge=1)
    stats: bool = field(True, "Print the agreement statistics after exporting.")

    def check(self) -> list[str]:
        if self.rule not in ("majority", "unanimous"):
            return [f"rule: got {self.rule!r}, expected majority or unanimous"]
        return []


Config = AnnotateExportConfig


def decide(votes: dict[str, str], rule: str, min_annotators: int) -> str:
    """The winning label of one pair, or why there is none: skipped, unlabelled, too_few, no_majority."""
    judged = [label for label in votes.values() if label != "skip"]
    if not judged:
        return "skipped" if votes else "unlabelled"
    if len(judged) < min_annotators:
        return "too_few"
    label, count = Counter(judged).most_common(1)[0]
    agreed = count == len(judged) if rule == "unanimous" else count > len(judged) / 2
    return label if agreed else "no_majority"


def _as_messages(value: str | list[dict], role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _as_string(value: str | list[dict]) -> str:
    return value if isinstance(value, str) else "".join(m["content"] for m in value)


def preference_rows(pairs: list[Pair], log: AnnotationLog, rule: str, min_annotators: int) -> tuple[list, Counter]:
    """Rows in trl's preference format and a count of every outcome (a, b, tie, both_bad, skipped, ...)."""
    conversational = any(p.conversational for p in pairs)  # trl wants one format per file: chats win
    outcomes: Counter = Counter()
    rows = []
    for pair in pairs:
        outcome = decide(log.votes(pair.id), rule, min_annotators)
        outcomes[outcome] += 1
        if outcome not in ("a", "b"):
            continue
        chosen, rejected = (pair.response_a, pair.response_b) if outcome == "a" else (pair.response_b, pair.response_a)
        if conversational:
            row = {"prompt": _as_messages(pair.prompt, "user"), "chosen": _as_messages(chosen, "assistant"),
                   "rejected": _as_messages(rejected, "assistant")}  # fmt: skip
        else:
            row = {"prompt": pair.prompt, "chosen": _as_string(chosen), "rejected": _as_string(rejected)}
        rows.append(row)
    return rows, outcomes


def run(cfg: AnnotateExportConfig) -> dict:
    log = read_log(cfg.log)
    pairs_path = cfg.pairs or log.header.get("pairs_file")
    if not pairs_path or not Path(pairs_path).is_file():
        raise UserError(f"{cfg.log}: its pairs file {pairs_path} is not there; name it with pairs=FILE")
    pairs = load_pairs(pairs_path)
    log.check_pairs(pairs_path, pairs)
    rows, outcomes = preference_rows(pairs, log, cfg.rule, cfg.min_annotators)
    left_out = {name: outcomes[key] for key, name in (("tie", "ties"), ("both_bad", "both bad"),
                ("skipped", "skipped"), ("no_majority", "undecided"), ("too_few", "too few votes"),
                ("unlabelled", "unlabelled"))}  # fmt: skip
    summary = ", ".join(f"{count} {name}" for name, count in left_out.items())
    if not rows:
        raise UserError(f"{cfg.log}: no pair has a winning A or B under the {cfg.rule} rule ({summary}); "
                        f"nothing written to {cfg.out}")  # fmt: skip
    atomic_write_text(cfg.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    kind = "conversational" if isinstance(rows[0]["chosen"], list) else "standard"
    print(f"exported {len(rows)} of {len(pairs)} pairs to {cfg.out} ({kind}, {cfg.rule} rule); left out: {summary}")
    if cfg.stats:
        print_stats(annotation_stats(log))
    return {"exported": len(rows), **{k: v for k, v in outcomes.items()}}
