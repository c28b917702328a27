"""`llmpipe annotate` driven as a person would: key presses through a pseudo-terminal, kills, restarts, export."""

from __future__ import annotations

import io
import json
import os
import random
import re
import sys
from pathlib import Path

import pexpect
from conftest import REPO, run_cli, write_jsonl
from test_sft import qwen2_model  # noqa: F401 - a tiny Qwen2 with the test tokenizer (samples pairs, trains reward)

DEMO_PAIRS = REPO / "data/demo/preference.jsonl"
ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|\][^\x07]*\x07|[()][A-Z0-9]|[=>])")
ACK = re.compile(r"(saved|undone): pair \d+ \[(\w+)\] (?:->|was) (A|B|tie|both bad|skip) \(record (\w+)\)")


def make_pairs(path: Path, n: int, seed: int = 0, skip: int = 0) -> tuple[Path, dict[str, str]]:
    """n demo preference rows as pairs with random sides; returns the file and {prompt text: chosen answer}."""
    rng = random.Random(seed)
    rows, chosen_of = [], {}
    for line in DEMO_PAIRS.read_text().splitlines()[skip : skip + n]:
        row = json.loads(line)
        a, b = (row["chosen"], row["rejected"]) if rng.random() < 0.5 else (row["rejected"], row["chosen"])
        rows.append({"prompt": row["prompt"], "response_a": a, "response_b": b})
        chosen_of[row["prompt"][0]["content"]] = row["chosen"][0]["content"]
    return write_jsonl(path, rows), chosen_of


class Terminal:
    """One `llmpipe annotate` process on a pseudo-terminal; `screen()` waits for the next full screen."""

    def __init__(self, pairs: Path, log: Path, annotator: str, *overrides: str, width: int = 120):
        self.transcript = io.StringIO()
        args = ["-m", "pipeline.cli", "annotate", "--pairs", str(pairs), "--log", str(log), "--annotator", annotator]
        self.child = pexpect.spawn(
            sys.executable, [*args, *overrides], cwd=str(REPO), dimensions=(50, width), encoding="utf-8",
            timeout=30, env={**os.environ, "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.child.logfile_read = self.transcript

    def screen(self) -> str:
        self.child.expect(r"q quit|q = quit\)")
        return ANSI.sub("", self.child.before + self.child.after)

    def press(self, key: str) -> str:
        self.child.send(key)
        return self.screen()

    def quit(self) -> str:
        self.child.send("q")
        self.child.expect(pexpect.EOF)
        self.child.close()
        assert self.child.exitstatus == 0, self.text()
        return self.text()

    def text(self) -> str:
        return ANSI.sub("", self.transcript.getvalue())


def key_for(screen: str, decision: str, chosen_of: dict[str, str]) -> str:
    """The key a person with `decision` (good/bad/tie/both/skip) presses on this (stacked) screen."""
    if decision in ("tie", "both", "skip"):
        return {"tie": "t", "both": "b", "skip": "s"}[decision]
    screen = screen[screen.rindex("─ prompt ─") :]
    prompt = next(text for text in chosen_of if text in " ".join(screen.split()))
    side_a = screen[screen.index("─ A ─") : screen.index("─ B ─")]
    chosen_on_a = f"│ {chosen_of[prompt]} " in side_a
    return "1" if chosen_on_a == (decision == "good") else "2"


def label(term: Terminal, screen: str, decision: str, chosen_of: dict[str, str]) -> str:
    screen = term.press(key_for(screen, decision, chosen_of))
    assert "saved: pair" in screen, screen
    return screen


# --- the whole path: two annotators, undo, restart, export, reward ----------------------------------------------

ALICE = ["good"] * 20
ALICE[2], ALICE[6], ALICE[8] = "tie", "both", "skip"
BOB = list(ALICE)
BOB[1], BOB[10], BOB[8], BOB[14] = "bad", "bad", "good", "both"


def test_two_annotators_undo_restart_export_train_reward(tmp_path, qwen2_model):  # noqa: F811 (fixture)
    pairs, chosen_of = make_pairs(tmp_path / "pairs.jsonl", 20)
    log = tmp_path / "labels.jsonl"
    stacked = "side_by_side_width=1000"  # one panel under the other: easy to read back here

    # alice: 12 pairs, one undone and relabelled, then quit
    alice = Terminal(pairs, log, "alice", stacked)
    screen = alice.screen()
    assert "alice: pair 1 of 20" in screen
    for i in range(12):
        screen = label(alice, screen, "bad" if i == 4 else ALICE[i], chosen_of)
        if i == 4:  # a wrong key: undo brings the same pair back
            screen = alice.press("u")
            assert re.search(r"undone: pair 5 \[\w+\] was [AB]", screen) and "alice: pair 5 of 20" in screen
            screen = label(alice, screen, ALICE[i], chosen_of)
    assert "quit: alice has labelled 12 of 20 pairs" in alice.quit()

    # alice resumes at pair 13 after a restart; bob labels everything meanwhile, with an undo of his own
    bob = Terminal(pairs, log, "bob", stacked)
    alice = Terminal(pairs, log, "alice", stacked)
    screen, bob_screen = alice.screen(), bob.screen()
    assert "alice: pair 13 of 20" in screen and "alice 12/20" in screen
    for i in range(12, 20):
        screen = label(alice, screen, ALICE[i], chosen_of)
    assert "all done: alice has labelled 20 of 20" in screen
    alice.quit()
    for i in range(20):
        bob_screen = label(bob, bob_screen, BOB[i], chosen_of)
        if i == 0:
            bob_screen = bob.press("u")
            bob_screen = label(bob, bob_screen, BOB[i], chosen_of)
    bob.quit()

    # export: majority of two = both agree; ties, both-bad, skips and disagreements are left out and counted
    out = tmp_path / "preference.jsonl"
    result = run_cli("annotate", "export", "--log", str(log), "--out", str(out), "stats=false")
    assert result.returncode == 0, result.stderr
    assert "exported 15 of 20 pairs" in result.stdout  # 14 agreed + 1 where alice skipped and bob voted
    assert "1 ties, 1 both bad, 0 skipped, 3 undecided" in result.stdout, result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["chosen"][0]["content"] == chosen_of[r["prompt"][0]["content"]] for r in rows)

    stats = run_cli("annotate", "stats", "--log", str(log))
    assert stats.returncode == 0, stats.stderr
    kappa = re.search(r"Cohen's kappa alice vs bob: (-?[\d.]+) on 19 shared pairs", stats.stdout)
    bias = re.search(r"position bias: left side picked in (\d+)% of (\d+) A/B decisions", stats.stdout)
    assert kappa and bias, stats.stdout
    print(f"\nkappa {kappa.group(1)}, left picks {bias.group(1)}% of {bias.group(2)}")

    # the export trains a reward model as it is
    reward = run_cli(
        "reward", "--config", str(REPO / "configs/tiny/reward.yaml"), f"output_dir={tmp_path / 'reward'}",
        f"init_from={qwen2_model}", f"data.path={out}", "eval_data=null", "eval_fraction=0.2", "max_length=64",
        "train.max_steps=4", "train.micro_batch_size=4", "train.logging_steps=1",
    )  # fmt: skip
    assert reward.returncode == 0, reward.stderr[-3000:]
    manifest = json.loads((tmp_path / "reward/manifest.json").read_text())
    print("reward metrics:", {k: manifest["metrics"][k] for k in ("train_loss", "train_pairs", "heldout_pairs")})
