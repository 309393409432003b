"""Progress of long commands (verify, dead-letters retry, rebuild-statements, retention) on
stderr: a tqdm bar on a terminal; elsewhere (a CronJob's log, a pipe) a plain line at most every
``PLAIN_INTERVAL`` seconds and one at the end, so logs stay readable and still show the command
is moving. stdout keeps only the command's report."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO, Any

#: Seconds between plain progress lines when stderr is not a terminal.
PLAIN_INTERVAL = 10.0


class Progress:
    def __init__(
        self,
        description: str,
        *,
        total: int | None = None,
        unit: str = "",
        stream: IO[str] | None = None,
        interval: float = PLAIN_INTERVAL,
    ) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.done = 0
        self._stream = stream or sys.stderr
        self._interval = interval
        self._started = self._last = time.monotonic()
        self._bar: Any = None
        if self._stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=description,
                unit=f" {unit}" if unit else "it",
                file=self._stream,
                leave=True,
                dynamic_ncols=True,
            )

    def set_total(self, total: int) -> None:
        """The amount of work, once known."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._line()

    def _line(self, final: bool = False) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        unit = f" {self.unit}" if self.unit else ""
        elapsed = time.monotonic() - self._started
        state = "done" if final else "running"
        print(
            f"{self.description}: {self.done}{of}{unit} ({state}, {elapsed:.0f} s)",
            file=self._stream,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            self._line(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._bar is not None:
            self._bar.close()
