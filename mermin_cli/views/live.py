"""The full-screen view: a rich Live table refreshed every interval, with keys to change
the sort (b, p, r, d) and q to quit. The terminal is restored on every exit path."""

from __future__ import annotations

import logging
import os
import queue
import select
import sys
import termios
import threading
import time
import tty
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from types import TracebackType

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from mermin_cli.views import render
from mermin_cli.views.snapshot import Snapshot, SortKey

SORT_KEYS = {"b": SortKey.bytes, "p": SortKey.packets, "r": SortKey.rate, "d": SortKey.duration}
QUIT_KEYS = frozenset("qQ")
HELP = "keys: b bytes, p packets, r rate, d duration, q quit"
KEY_POLL = 0.1  # seconds the key thread waits for input before checking for stop


class KeyReader:
    """Single key presses from a terminal put in cbreak mode, read on a thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.keys: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._saved = termios.tcgetattr(fd)
        self._thread = threading.Thread(target=self._read, name="mermin-keys", daemon=True)

    def _read(self) -> None:
        while not self._stop.is_set():
            if select.select([self.fd], [], [], KEY_POLL)[0]:
                data = os.read(self.fd, 32)
                if not data:
                    return
                for key in data.decode(errors="ignore"):
                    self.keys.put(key)

    def __enter__(self) -> KeyReader:
        tty.setcbreak(self.fd)  # keys without Enter, no echo; Ctrl-C still signals
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: deque[logging.LogRecord] = deque(maxlen=100)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _logs_held() -> Iterator[_Held]:
    """While the screen is up, warnings are held (the last one shows at the bottom) instead
    of written over the screen; the original handlers get them afterwards."""
    root = logging.getLogger()
    original = root.handlers[:]
    held = _Held()
    root.handlers[:] = [held]
    try:
        yield held
    finally:
        root.handlers[:] = original
        for record in held.records:
            for handler in original:
                if record.levelno >= handler.level:
                    handler.handle(record)


def _screen(snap: Snapshot, console: Console, held: _Held) -> Group:
    lines = render.header(snap)
    lines[0] += f"  ({HELP})"
    room = max(1, console.height - render.HEADER_LINES - 3)  # blank, column titles, footer
    footer = Text("")
    if held.records:
        footer = Text(held.records[-1].getMessage(), style="yellow", no_wrap=True)
    lost = any(snap.loss[key] for key, _ in render.LOSS_LABELS)
    return Group(
        Text(lines[0], style="bold", no_wrap=True),
        Text(lines[1], no_wrap=True),
        Text(lines[2], style="red" if lost else "dim", no_wrap=True),
        Text(""),
        render.table(snap, rows=room, styled=True),
        footer,
    )


def run(fetch: Callable[[SortKey], Snapshot], sort: SortKey, interval: float) -> None:
    """Show fetch(sort) full screen every `interval` seconds until q (or Ctrl-C)."""
    console = Console()
    with ExitStack() as stack:
        held = stack.enter_context(_logs_held())
        keys: queue.Queue[str] = queue.Queue()
        if sys.stdin.isatty():
            keys = stack.enter_context(KeyReader(sys.stdin.fileno())).keys
        live = stack.enter_context(
            Live(console=console, screen=True, auto_refresh=False, transient=True)
        )
        due = 0.0
        while True:
            if time.monotonic() >= due:
                live.update(_screen(fetch(sort), console, held), refresh=True)
                due = time.monotonic() + interval
            try:
                key = keys.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                continue
            if key in QUIT_KEYS:
                return
            if key.lower() in SORT_KEYS:
                sort, due = SORT_KEYS[key.lower()], 0.0
