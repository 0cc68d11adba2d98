"""Progress of a multi-image run: a live table on a terminal, one plain line per event elsewhere (CI)."""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Row:
    id: str
    state: str = "queued"
    step: str = ""
    started: float | None = None
    ended: float | None = None
    detail: str = ""

    @property
    def elapsed(self) -> str:
        if self.started is None:
            return ""
        return f"{(self.ended or time.monotonic()) - self.started:.0f}s"


@dataclass
class Progress:
    """Thread-safe record of each image's state; subclasses decide how it is shown."""

    ids: list[str]
    rows: dict[str, Row] = field(init=False)
    lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.rows = {i: Row(i) for i in self.ids}

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def start(self, image_id: str) -> None:
        with self.lock:
            row = self.rows[image_id]
            row.state, row.started = "building", time.monotonic()
        self.event(image_id, "building")

    def step(self, image_id: str, text: str) -> None:
        with self.lock:
            self.rows[image_id].step = text

    def finish(self, image_id: str, state: str, detail: str = "") -> None:
        with self.lock:
            row = self.rows[image_id]
            row.state, row.detail = state, detail
            row.ended = time.monotonic()
            if row.started is None:
                row.started = row.ended
        self.event(image_id, f"{state} {row.elapsed} {detail}".rstrip())

    def event(self, image_id: str, text: str) -> None:
        pass


class PlainProgress(Progress):
    """One line per event, flushed: readable in CI logs, grep-able, no terminal control codes."""

    def event(self, image_id: str, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {image_id}: {text}", flush=True)


class LiveProgress(Progress):
    """A rich live table: a row per image with its state, current step and elapsed time."""

    def __enter__(self) -> LiveProgress:
        from rich.live import Live

        self._live = Live(self._table(), refresh_per_second=4, transient=False)
        self._live.__enter__()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._live.update(self._table())
        self._live.__exit__(*exc)

    def _refresh(self) -> None:
        while not self._stop.wait(0.25):
            self._live.update(self._table())

    def _table(self):
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        for col in ("IMAGE", "STATE", "ELAPSED", "STEP"):
            table.add_column(col, no_wrap=True, overflow="ellipsis", max_width=None if col != "STEP" else 80)
        colour = {"built": "green", "skipped": "cyan", "failed": "red", "building": "yellow"}
        with self.lock:
            for row in self.rows.values():
                step = row.detail if row.state in ("failed", "skipped") else row.step
                table.add_row(row.id, f"[{colour.get(row.state, 'white')}]{row.state}", row.elapsed, step)
        return table


def progress_for(ids: list[str], plain: bool | None = None) -> Progress:
    """Live on an interactive terminal, plain in CI or when output is piped."""
    if plain is None:
        plain = not sys.stdout.isatty() or bool(os.environ.get("CI"))
    return PlainProgress(ids) if plain else LiveProgress(ids)
