"""`llmpipe annotate` driven as a person would: key presses through a pseudo-terminal, kills, restarts, export."""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
from conftest import REPO, run_cli, write_jsonl
from test_sft import qwen2_model  # noqa: F401 - a tiny Qwen2 with the test tokenizer (samples pairs, trains reward)

from pipeline.annotation.log import read_log

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


def exited(child) -> None:
    """After EOF, wait for the process to exit before closing. EOF only means the terminal closed: a process still
    finishing (Python's shutdown, which restores SIGINT's default) would otherwise be killed by close()'s force
    (SIGHUP, SIGINT), and read as killed by a signal rather than its own exit code (a CI flake, 1 in ~250)."""
    child.wait()
    child.close()


class Terminal:
    """One `llmpipe annotate` process on a pseudo-terminal; `screen()` waits for the next full screen."""

    def __init__(self, pairs: Path, log: Path, annotator: str, *overrides: str, width: int = 120,
                 sigint: object = signal.SIG_DFL):  # fmt: skip
        self.transcript = io.StringIO()
        args = ["-m", "pipeline.cli", "annotate", "--pairs", str(pairs), "--log", str(log), "--annotator", annotator]
        self.child = pexpect.spawn(
            sys.executable, [*args, *overrides], cwd=str(REPO), dimensions=(50, width), encoding="utf-8",
            timeout=30, env={**os.environ, "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"},
            # the disposition a launcher leaves (a background job of a script ignores SIGINT), not pytest's own
            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
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
        exited(self.child)
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


@pytest.mark.slow  # ~40 s: 5 annotator sessions, 3 CLI runs and a reward training run
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
    print("\n" + stats.stdout)

    # the export trains a reward model as it is
    reward = run_cli(
        "reward", "--config", str(REPO / "configs/tiny/reward.yaml"), f"output_dir={tmp_path / 'reward'}",
        f"init_from={qwen2_model}", f"data.path={out}", "eval_data=null", "eval_fraction=0.2", "max_length=64",
        "train.max_steps=4", "train.micro_batch_size=4", "train.logging_steps=1",
    )  # fmt: skip
    assert reward.returncode == 0, reward.stderr[-3000:]
    manifest = json.loads((tmp_path / "reward/manifest.json").read_text())
    print("reward:", {k: manifest["metrics"][k] for k in ("train_loss", "steps", "train_pairs", "heldout_pairs")})


# --- crashes --------------------------------------------------------------------------------------------------


def acknowledged(text: str) -> dict[str, tuple[str, str]]:
    """{record id: (pair id, what was said)} for every 'saved: ...' / 'undone: ...' line the screen showed."""
    return {m.group(4): (m.group(2), m.group(1)) for m in ACK.finditer(text)}


@pytest.mark.slow  # ~35 s: 21 process starts
def test_sigkill_at_random_moments_loses_no_acknowledged_label(tmp_path):
    pairs, _ = make_pairs(tmp_path / "pairs.jsonl", 60)
    log = tmp_path / "labels.jsonl"
    rng = random.Random(0)
    acked: dict[str, tuple[str, str]] = {}
    for _ in range(20):
        term = Terminal(pairs, log, "alice")
        deadline = time.monotonic() + rng.uniform(0.2, 2.5)  # from mid-start-up to well into labelling
        while time.monotonic() < deadline:
            term.child.send(rng.choice("1212tbsuu"))
            try:
                term.child.expect(r"q quit|q = quit\)", timeout=rng.uniform(0.0, 0.08))
            except pexpect.TIMEOUT:
                pass
        os.kill(term.child.pid, signal.SIGKILL)
        term.child.expect(pexpect.EOF)  # everything it printed before it died
        term.child.close()
        assert term.child.signalstatus == signal.SIGKILL
        acked.update(acknowledged(term.text()))

    warnings: list[str] = []
    state = read_log(log, warn=warnings.append)
    assert not warnings, warnings
    lost = {rid: ack for rid, ack in acked.items() if state.by_id.get(rid, {}).get("pair") != ack[0]}
    assert not lost, f"acknowledged but not in the log: {lost}"
    assert len(acked) >= 40, f"only {len(acked)} acknowledged actions: the kills came too early to test much"
    print(f"\n{len(acked)} acknowledged actions over 20 kills, all in the log; {len(state.records)} records")

    # and the log still drives the script: it resumes after the last current label
    done = len(state.labels["alice"])
    term = Terminal(pairs, log, "alice")
    assert f"alice: pair {done + 1} of 60" in term.screen() if done < 60 else "all done" in term.screen()
    term.quit()


def test_torn_last_line_is_ignored_with_a_warning_and_labelling_goes_on(tmp_path):
    pairs, _ = make_pairs(tmp_path / "pairs.jsonl", 5)
    log = tmp_path / "labels.jsonl"
    term = Terminal(pairs, log, "alice")
    term.screen()
    term.press("1")
    term.press("2")
    term.quit()
    with open(log, "ab") as f:  # a power cut in the middle of the third record
        f.write(b'{"type": "label", "id": "torn", "annotator": "alice", "pa')

    stats = run_cli("annotate", "stats", "--log", str(log))
    assert stats.returncode == 0 and "incomplete last line" in stats.stderr, stats.stderr
    term = Terminal(pairs, log, "alice")
    screen = term.screen()
    assert "incomplete last line" in screen and "alice: pair 3 of 5" in screen
    assert "saved: pair 3" in term.press("t")
    term.quit()

    warnings: list[str] = []
    state = read_log(log, warn=warnings.append)
    assert len(warnings) == 1 and "unreadable record" in warnings[0], warnings  # the torn line, now ended
    assert [r["label"] for r in state.labels["alice"].values()][-1] == "tie"
    assert all(line.endswith("}") for line in log.read_text().splitlines()[-1:])


def test_two_annotators_appending_at_once_never_interleave(tmp_path):
    """Two real processes label 60 pairs each into one log as fast as keys arrive (stdin from a pipe)."""
    pairs, _ = make_pairs(tmp_path / "pairs.jsonl", 60)
    log = tmp_path / "labels.jsonl"
    args = [sys.executable, "-m", "pipeline.cli", "annotate", "--pairs", str(pairs), "--log", str(log)]
    procs = [
        subprocess.Popen([*args, "--annotator", name, "guidelines=" + "long " * 2000], cwd=REPO,
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for name in ("alice", "bob")
    ]  # fmt: skip
    for proc, keys in zip(procs, ("1" * 60 + "q", "r" + "x" * 3000 + "\n" + "2" * 60 + "q"), strict=True):
        proc.stdin.write(keys)
        proc.stdin.close()
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    warnings: list[str] = []
    state = read_log(log, warn=warnings.append)
    assert not warnings
    assert len(state.labels["alice"]) == len(state.labels["bob"]) == 60
    assert len(state.rationales["bob"]) == 1 and len(next(iter(state.rationales["bob"].values()))[0]) == 3000


# --- bad input ----------------------------------------------------------------------------------------------------


def test_bad_input_gets_a_clear_message_and_nothing_is_lost(tmp_path):
    pairs, _ = make_pairs(tmp_path / "pairs.jsonl", 6)
    log = tmp_path / "labels.jsonl"

    # a pairs file with a missing response: every bad line named, no log created
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    del rows[2]["response_b"]
    rows[4]["response_a"] = rows[4]["response_b"]
    broken = write_jsonl(tmp_path / "broken.jsonl", rows)
    result = run_cli("annotate", "--pairs", str(broken), "--log", str(log), "--annotator", "alice")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{broken}:3: 'response_b' missing or empty" in result.stderr
    assert f"{broken}:5: response_a and response_b are identical" in result.stderr
    assert not log.exists()

    # unknown keys and Enter label nothing; a label after them does
    term = Terminal(pairs, log, "alice")
    term.screen()
    for key in ("x", "\r", "\x1b[A"):  # a letter, Enter, an arrow key
        term.child.send(key)
        term.child.expect(r"does nothing here, nothing was labelled; keys:.*?q quit")
    assert "saved: pair 1" in term.press("1")

    # the same annotator in a second terminal is refused while the first one runs
    second = run_cli("annotate", "--pairs", str(pairs), "--log", str(log), "--annotator", "alice")
    assert second.returncode == 2 and "alice is already labelling" in second.stderr, second.stderr
    term.quit()
    assert len(read_log(log).records) == 1

    # a log written for other pairs: both files named, the log untouched
    other, _ = make_pairs(tmp_path / "other.jsonl", 6, skip=100)
    before = log.read_bytes()
    result = run_cli("annotate", "--pairs", str(other), "--log", str(log), "--annotator", "alice")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert str(log) in result.stderr and str(pairs.resolve()) in result.stderr and str(other) in result.stderr
    result = run_cli("annotate", "export", "--log", str(log), "--out", str(tmp_path / "x.jsonl"), f"pairs={other}")
    assert result.returncode == 2 and "holds different pairs" in result.stderr
    assert log.read_bytes() == before and not (tmp_path / "x.jsonl").exists()

    # a file that is no log (here: the pairs file) is refused, untouched
    pairs_before = pairs.read_bytes()
    result = run_cli("annotate", "--pairs", str(other), "--log", str(pairs), "--annotator", "alice")
    assert result.returncode == 2 and "not an llmpipe annotation log" in result.stderr, result.stderr
    assert pairs.read_bytes() == pairs_before

    # the same pairs in another order are still the same pairs: alice goes on with the ones she has not labelled
    lines = pairs.read_text().splitlines()
    reordered = tmp_path / "reordered.jsonl"
    reordered.write_text("\n".join(lines[::-1]) + "\n")
    term = Terminal(reordered, log, "alice")
    assert "alice: pair 2 of 6 (line 1)" in term.screen()
    term.quit()


# --- screen, sources, several annotators, export formats --------------------------------------------------------


def test_one_ctrl_c_quits_even_when_started_with_sigint_ignored(tmp_path):
    """A background job of a script (CI runners, `cmd &`, nohup) starts with SIGINT ignored; Python then never
    raises KeyboardInterrupt, and Ctrl-C at the labelling screen did nothing (the 'first Ctrl-C ignored' flake)."""
    pairs, _ = make_pairs(tmp_path / "pairs.jsonl", 2)
    log = tmp_path / "labels.jsonl"
    term = Terminal(pairs, log, "alice", sigint=signal.SIG_IGN)
    term.screen()
    assert "pair 2 of 2" in term.press("1")  # one label on disk before the interrupt
    term.child.kill(signal.SIGINT)
    term.child.expect(pexpect.EOF, timeout=10)
    exited(term.child)
    assert term.child.exitstatus == 130 and "interrupted" in term.text()
    assert len(read_log(log).records) == 1


@pytest.mark.slow  # ~2-3 min: 50 annotate processes
def test_fifty_single_ctrl_cs_at_random_moments_each_exit_130_with_the_log_intact(tmp_path):  # issue 19, item 7
    """One Ctrl-C, at a random moment of a session: while it starts up, at the labelling screen after 0-3 labels
    or undos, in the guidelines view or while a rationale is typed. Every one exits 130 within 2 s, and the log
    (shared by all 50 sessions) holds every acknowledged record, no torn line."""
    rng = random.Random(19)
    pairs, _ = make_pairs(tmp_path / "pairs.jsonl", 200)
    log = tmp_path / "labels.jsonl"
    acknowledged = 0
    for session in range(50):
        term = Terminal(pairs, log, "alice", "side_by_side_width=1000")
        moment = "startup" if session % 5 == 0 else rng.choice(["screen", "screen", "guidelines", "rationale"])
        if moment == "startup":
            time.sleep(rng.uniform(0.02, 0.4))  # while Python starts and llmpipe imports (~0.3 s), or later
        else:
            term.screen()
            keys = rng.choices("12ts", k=rng.randint(0, 3))
            for key in keys + (["u"] if keys and rng.random() < 0.3 else []):  # an undo needs a label before it
                term.child.send(key)
                term.child.expect(ACK)
                acknowledged += 1
            if moment == "guidelines":
                term.child.send("g")
            elif moment == "rationale":
                term.child.send("r")
                term.child.expect("rationale")
                term.child.send("half a thought")
            time.sleep(rng.uniform(0, 0.3))
        term.child.kill(signal.SIGINT)
        pressed = time.monotonic()
        term.child.expect(pexpect.EOF, timeout=10)
        exited(term.child)
        waited = time.monotonic() - pressed
        status = (session, moment, term.child.exitstatus, term.child.signalstatus, waited, term.text()[-800:])
        assert term.child.exitstatus == 130 and waited < 2, status
        assert "interrupted" in term.text() and "Traceback" not in term.text(), (session, moment, term.text()[-800:])
        if log.exists():
            warnings: list[str] = []
            records = read_log(log, warnings.append).records
            assert not warnings and acknowledged <= len(records) <= acknowledged + 1, (session, moment, warnings)
            acknowledged = len(records)  # one sent just before the interrupt may have landed unacknowledged


def test_side_by_side_when_wide_stacked_when_narrow_guidelines_rationale_ctrl_c(tmp_path):
    pairs, _ = make_pairs(tmp_path / "pairs.jsonl", 3)
    log = tmp_path / "labels.jsonl"
    wide = Terminal(pairs, log, "alice", "guidelines=Prefer the answer that is *correct*.", width=140)
    screen = wide.screen()
    assert re.search(r"│ A +│ B +│", screen), screen  # one table, two columns
    wide.child.send("g")
    wide.child.expect("Prefer the answer that is")
    assert "alice: pair 1 of 3" in wide.press(" ")  # any key goes back, labelling nothing
    wide.child.send("r")
    wide.child.expect("rationale")
    wide.child.send("A is more specific\r")  # typed with the terminal's line editing, Enter ends it
    wide.child.expect(r"saved: rationale for pair 1 \(record \w+\)")
    # one Ctrl-C: the terminal is given back, nothing half-written (50 random ones: the test above)
    wide.child.kill(signal.SIGINT)
    wide.child.expect(pexpect.EOF, timeout=10)
    exited(wide.child)
    assert wide.child.exitstatus == 130 and "interrupted" in wide.text()
    narrow = Terminal(pairs, log, "alice", width=70)
    screen = narrow.screen()
    assert "─ A ─" in screen and "─ B ─" in screen and not re.search(r"│ A +│ B +│", screen)
    narrow.quit()
    assert [(r["type"], r["text"]) for r in read_log(log).records] == [("rationale", "A is more specific")]

    help_text = run_cli("annotate", "--help").stdout
    for text in ("--pairs PAIRS", "--log LOG", "--annotator ANNOTATOR", "1 = A better", "annotate export", "prompts"):
        assert text in help_text, text


def test_pairs_sampled_from_a_model_first_then_labelled(tmp_path, qwen2_model):  # noqa: F811 (fixture)
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": [{"role": "user", "content": "Where does Bramo live?"}]},
         {"prompt": [{"role": "user", "content": "Add 5 and 4."}]}, {"prompt": "Tillford is"}],
    )  # fmt: skip
    pairs, log = tmp_path / "sampled.jsonl", tmp_path / "labels.jsonl"
    model_args = [f"prompts={prompts}", f"model={qwen2_model}", "max_new_tokens=6", "sample_batch_size=2"]
    args = [sys.executable, "-m", "pipeline.cli", "annotate", "--pairs", str(pairs), "--log", str(log),
            "--annotator", "alice", *model_args]  # fmt: skip
    result = subprocess.run(args, cwd=REPO, input="1q", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sampled 3 pairs" in result.stdout and "saved: pair 1" in result.stdout
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert [r["prompt"][0]["content"] for r in rows[:2]] == ["Where does Bramo live?", "Add 5 and 4."]
    assert all(r["response_a"] != r["response_b"] for r in rows)
    assert rows[0]["response_a"][0]["role"] == "assistant" and rows[2]["prompt"] == "Tillford is"
    assert isinstance(rows[2]["response_a"], str)  # a plain prompt gets plain responses

    again = subprocess.run(args, cwd=REPO, input="q", capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "exists: labelling its pairs" in again.stdout  # not sampled again
    assert "alice: pair 2 of 3" in again.stdout


def test_three_annotators_fleiss_kappa_and_pairs_shown_to_n_annotators(tmp_path):
    pairs, chosen_of = make_pairs(tmp_path / "pairs.jsonl", 8)
    log = tmp_path / "labels.jsonl"
    decisions = {
        "ann": ["good"] * 6 + ["tie", "tie"],
        "bo": ["good"] * 5 + ["bad", "tie", "both"],
        "cy": ["good"] * 4 + ["bad", "bad", "tie", "both"],
    }
    for name in ("ann", "bo", "cy"):
        if name == "cy":  # every pair already has two labels: cy is shown none of them
            term = Terminal(pairs, log, name, "annotators_per_pair=2")
            assert "all done: cy has labelled 0 of 8" in term.screen()
            term.quit()
        term = Terminal(pairs, log, name, "side_by_side_width=1000")
        screen = term.screen()
        for decision in decisions[name]:
            screen = label(term, screen, decision, chosen_of)
        term.quit()

    stats = json.loads(run_cli("annotate", "stats", "--log", str(log), "json=true").stdout)
    assert {tuple(row["annotators"]) for row in stats["cohen_kappa"]} == {("ann", "bo"), ("ann", "cy"), ("bo", "cy")}
    assert stats["fleiss_kappa"]["pairs"] == 8 and stats["fleiss_kappa"]["raters_per_pair"] == 3
    assert 0 < stats["fleiss_kappa"]["kappa"] < 1

    majority = run_cli("annotate", "export", "--log", str(log), "--out", str(tmp_path / "m.jsonl"), "stats=false")
    unanimous = run_cli("annotate", "export", "--log", str(log), "--out", str(tmp_path / "u.jsonl"), "rule=unanimous")
    assert "exported 6 of 8" in majority.stdout and "1 ties, 1 both bad, 0 skipped, 0 undecided" in majority.stdout
    assert "exported 4 of 8" in unanimous.stdout and "1 ties, 0 both bad, 0 skipped, 3 undecided" in unanimous.stdout
    assert "Fleiss' kappa" in unanimous.stdout
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert rows[5]["rejected"][0]["content"] == chosen_of[rows[5]["prompt"][0]["content"]]  # 2 of 3 said "bad"


def test_plain_string_pairs_export_as_standard_preference_rows(tmp_path):
    from pipeline.config import DataConfig
    from pipeline.formats import load_preference_pairs

    rows = [
        {"prompt": f"Q{i}: which colour? ", "response_a": f"red {i}", "response_b": f"{i} {i} {i}"} for i in range(4)
    ]
    pairs, log = write_jsonl(tmp_path / "pairs.jsonl", rows), tmp_path / "labels.jsonl"
    args = [sys.executable, "-m", "pipeline.cli", "annotate", "--pairs", str(pairs), "--log", str(log), "--annotator"]
    subprocess.run([*args, "alice"], cwd=REPO, input="12ts", capture_output=True, text=True, timeout=60, check=True)
    out = tmp_path / "preference.jsonl"
    result = run_cli("annotate", "export", "--log", str(log), "--out", str(out))
    assert result.returncode == 0 and "(standard, majority rule)" in result.stdout, result.stdout
    assert "1 ties, 0 both bad, 1 skipped" in result.stdout
    ds, conversational = load_preference_pairs(DataConfig(path=str(out)))
    assert not conversational and len(ds) == 2 and set(ds.column_names) == {"prompt", "chosen", "rejected"}
