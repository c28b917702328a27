"""Preference pairs to label, and the append-only JSONL log that holds every labelling action.

The pairs file has one JSON object per line: `prompt` (a string, or a chat as a list of messages) and two candidate
answers `response_a` and `response_b` (strings, or lists of assistant messages). Each pair is known by a hash of its
content, so a reordered pairs file still matches its log.

The log's first line is a header naming the pairs file and a hash of its set of pairs; then one record per action:
    {"type": "label", "id": "…", "annotator": "ann", "pair": "3f9c…", "label": "a", "left": "b", "key": "2", …}
    {"type": "undo", "id": "…", "annotator": "ann", "pair": "3f9c…", "undoes": "<id of the label>", …}
    {"type": "rationale", "id": "…", "annotator": "ann", "pair": "3f9c…", "text": "…", …}
`label` is in the pairs file's terms (a, b, tie, both_bad, skip); `left` says which response was shown on the left.
Each record is one os.write of a whole line under an exclusive flock, then fsync: once the script says "saved",
the record survives a crash, and two annotators appending at once never interleave. Records are never rewritten:
undo appends a correction. A torn line (a power cut mid-write) is ignored with a warning when the log is read.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from pipeline.config import UserError
from pipeline.data import jsonl_objects
from pipeline.formats import CHAT_ROLES, message_problem

LABELS = ("a", "b", "tie", "both_bad", "skip")
DECISIVE = ("a", "b")  # the labels that become a (chosen, rejected) row
LOG_VERSION = 1


# --- pairs ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pair:
    id: str
    line: int  # 1-based line in the pairs file, for messages
    prompt: str | list[dict]
    response_a: str | list[dict]
    response_b: str | list[dict]

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def pair_id(prompt: Any, response_a: Any, response_b: Any) -> str:
    canonical = json.dumps([prompt, response_a, response_b], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def pairs_hash(pairs: list[Pair]) -> str:
    """A hash of the set of pairs, independent of their order in the file."""
    return hashlib.sha256("\n".join(sorted(p.id for p in pairs)).encode()).hexdigest()[:16]


def raise_problems(problems: list[str], most: int = 20) -> None:
    if problems:
        more = [f"... and {len(problems) - most} more problems"] if len(problems) > most else []
        raise UserError(problems[:most] + more)


def load_pairs(path: str | Path) -> list[Pair]:
    """Read and check a pairs file; every bad line is reported at once (file:line: problem)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: pairs file not found")
    problems: list[str] = []
    pairs: list[Pair] = []
    seen: dict[str, int] = {}
    for lineno, row in jsonl_objects(path, problems):
        missing = [k for k in ("prompt", "response_a", "response_b") if row.get(k) in (None, "", [])]
        if missing:
            problems.append(
                f"{path}:{lineno}: {', '.join(repr(k) for k in missing)} missing or empty "
                f"(every line needs prompt, response_a, response_b; it has {sorted(row)})"
            )
            continue
        checks = [message_problem(row["prompt"], "prompt", roles=CHAT_ROLES, allow_text=True)]
        checks += [message_problem(row[k], k, roles=("assistant",), allow_text=True)
                   for k in ("response_a", "response_b")]  # fmt: skip
        if row["response_a"] == row["response_b"]:
            checks.append("response_a and response_b are identical: there is nothing to choose")
        if any(checks):
            problems += [f"{path}:{lineno}: {c}" for c in checks if c]
            continue
        pair = Pair(pair_id(row["prompt"], row["response_a"], row["response_b"]), lineno, row["prompt"],
                    row["response_a"], row["response_b"])  # fmt: skip
        if pair.id in seen:
            problems.append(f"{path}:{lineno}: the same pair as line {seen[pair.id]}")
            continue
        seen[pair.id] = lineno
        pairs.append(pair)
    raise_problems(problems or ([] if pairs else [f"{path}: holds no pairs"]))
    return pairs


# --- the log ----------------------------------------------------------------------------------------------------


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def new_record(kind: str, annotator: str, pair: str, **fields: Any) -> dict:
    return {"type": kind, "id": uuid.uuid4().hex[:12], "time": now(), "annotator": annotator, "pair": pair, **fields}


class AnnotationLog:
    """The log read into per-annotator state; `refresh()` reads only what other writers appended since."""

    def __init__(self, path: str | Path, warn=None):
        self.path = Path(path)
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))
        self.header: dict | None = None
        self.records: list[dict] = []
        self.by_id: dict[str, dict] = {}
        # annotator -> {pair id: its current label record}, in the order labelled (undo takes the last one)
        self.labels: dict[str, dict[str, dict]] = {}
        self.rationales: dict[str, dict[str, list[str]]] = {}
        self._offset = 0  # bytes read so far, always at a line boundary
        self._lines = 0
        self._warned_tail = -1
        self._write_fd: int | None = None

    # --- reading
    def refresh(self) -> AnnotationLog:
        if not self.path.exists():
            return self
        with open(self.path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)  # a writer holds LOCK_EX for its whole line
            try:
                f.seek(self._offset)
                data = f.read()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        end = data.rfind(b"\n") + 1  # only whole lines are read; a torn tail waits (or is a crash's leftover)
        self._offset += end
        for raw in data[:end].splitlines():
            self._lines += 1
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                if not isinstance(record, dict) or "type" not in record:
                    raise ValueError("not a log record")
            except ValueError:
                if self.header is None:
                    self._not_a_log()
                self.warn(f"{self.path}:{self._lines}: unreadable record (torn by a crash?): ignored")
                continue
            self._apply(record)
        if end < len(data) and self._warned_tail != self._offset:
            self._warned_tail = self._offset
            self.warn(
                f"{self.path}:{self._lines + 1}: incomplete last line ({len(data) - end} bytes; the writer was cut "
                "off, e.g. by a power cut): ignored"
            )
        return self

    def _apply(self, record: dict) -> None:
        kind = record["type"]
        if self.header is None:
            if kind != "header":
                self._not_a_log()
            self.header = record
            return
        self.records.append(record)
        self.by_id[record.get("id", "")] = record
        annotator, pair = record.get("annotator"), record.get("pair")
        labels = self.labels.setdefault(annotator, {})
        if kind == "label":
            labels.pop(pair, None)  # a newer label replaces an older one and moves to the end
            labels[pair] = record
        elif kind == "undo":
            if labels.get(pair, {}).get("id") == record.get("undoes"):
                del labels[pair]
        elif kind == "rationale":
            self.rationales.setdefault(annotator, {}).setdefault(pair, []).append(record.get("text", ""))

    def _not_a_log(self) -> None:
        raise UserError(
            f"{self.path}: not an llmpipe annotation log (its first line is not a log header); "
            "name a new file or a log that `llmpipe annotate` wrote"
        )

    def last_label(self, annotator: str) -> dict | None:
        labels = self.labels.get(annotator, {})
        return next(reversed(labels.values())) if labels else None

    def votes(self, pair: str) -> dict[str, str]:
        """{annotator: label} of every annotator's current label for a pair."""
        return {name: labels[pair]["label"] for name, labels in self.labels.items() if pair in labels}

    # --- checking against a pairs file
    def check_pairs(self, pairs_path: str | Path, pairs: list[Pair]) -> None:
        """Refuse a pairs file other than the one the log was started with (reordering is fine)."""
        header = self.header or {}
        if header.get("pairs_hash") != pairs_hash(pairs):
            raise UserError(
                f"{self.path} was written for the pairs file {header.get('pairs_file')} ({header.get('pairs')} "
                f"pairs, content hash {header.get('pairs_hash')}), but {pairs_path} holds different pairs "
                f"({len(pairs)} pairs, content hash {pairs_hash(pairs)}). Use the pairs file the log was started "
                "with, or a new log file; nothing was written"
            )

    # --- writing
    def open_for_append(self, pairs_path: str | Path, pairs: list[Pair]) -> None:
        """Open the log for appending; a new (or empty) log gets its header first, under the lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # read-write: pread checks that the last line is whole before the next one is appended
        self._write_fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        header = {"type": "header", "version": LOG_VERSION, "pairs_file": str(Path(pairs_path).resolve()),
                  "pairs": len(pairs), "pairs_hash": pairs_hash(pairs), "created": now()}  # fmt: skip
        self.append(header, only_if_empty=True)
        self.refresh()
        self.check_pairs(pairs_path, pairs)

    def append(self, record: dict, only_if_empty: bool = False) -> None:
        """One whole line, one write, fsync, all under an exclusive lock. Returns once the record is on disk."""
        assert self._write_fd is not None, "open_for_append first"
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        fcntl.flock(self._write_fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(self._write_fd).st_size
            if only_if_empty and size > 0:
                return
            if size and os.pread(self._write_fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # end a torn last line first, so it stays one (ignored) line
            written = os.write(self._write_fd, line)
            while written < len(line):  # only on a full disk or similar; still under the lock
                written += os.write(self._write_fd, line[written:])
            os.fsync(self._write_fd)
        finally:
            fcntl.flock(self._write_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None


def read_log(path: str | Path, warn=None) -> AnnotationLog:
    """A log read for export or statistics (nothing is written)."""
    if not Path(path).is_file():
        raise UserError(f"{path}: annotation log not found")
    log = AnnotationLog(path, warn).refresh()
    if log.header is None:
        raise UserError(f"{path}: empty annotation log (no header)")
    return log
