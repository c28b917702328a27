"""The labelling terminal: single key presses from stdin (cbreak mode, works over SSH) and the rich screen that
shows a prompt with its two responses, A and B, side by side or stacked."""

from __future__ import annotations

import codecs
import os
import re
import select
import signal
import termios
import tty
from pathlib import Path

from pipeline.annotation.log import AnnotationLog, Pair

KEY_HELP = "keys: 1 A better  2 B better  t tie  b both bad  s skip  u undo  r rationale  g guidelines  q quit"


# --- keys -------------------------------------------------------------------------------------------------------


class Keys:
    """Single key presses from stdin: cbreak mode on a terminal (no Enter needed, no echo; Ctrl-C still works)."""

    def __init__(self, fd: int = 0):
        self.fd, self.pending = fd, ""
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.saved = termios.tcgetattr(fd) if os.isatty(fd) else None
        self.ignored_sigint = False

    def __enter__(self) -> Keys:
        if self.saved is not None:
            tty.setcbreak(self.fd)
            # A process started in the background of a script (`cmd &` without job control, as CI runners and
            # nohup do) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: Ctrl-C on this
            # terminal did nothing at all. Someone labelling at a terminal must always be able to stop.
            if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                self.ignored_sigint = True
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
        if self.ignored_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

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
    """What one annotator sees: notices and warnings, progress, the prompt, responses A and B, the key help.
    Terminals at least `side_by_side_width` columns wide show A and B side by side; `guidelines` is the text
    itself or a text file, shown on request."""

    def __init__(self, annotator: str, total: int, side_by_side_width: int = 100, guidelines: str | None = None):
        from rich.console import Console

        self.annotator, self.total, self.console = annotator, total, Console(highlight=False)
        self.side_by_side_width, self.guidelines_text = side_by_side_width, guidelines
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
        mine = done.get(self.annotator, 0)
        self.say(f"{self.annotator}: pair {mine + 1} of {self.total} (line {pair.line})   done: {progress or '-'}")
        self.console.print(Panel(Text(_as_text(pair.prompt)), title="prompt", title_align="left"))
        if self.console.width >= self.side_by_side_width:
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

        text = self.guidelines_text
        if text and len(text) < 4096 and Path(text).is_file():
            text = Path(text).read_text(encoding="utf-8")
        self.console.print(Markdown(text or "No guidelines were given (set `guidelines=` in the config)."))
        self.say("(press any key to go back)", "dim")
