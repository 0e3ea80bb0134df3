"""Progress of long steps, through one logger: ``logging.getLogger("mllama_export")``.

Library code says what it is doing with ``step("exporting the vision graph")`` (a line when it
starts, one with its elapsed time when it ends) and walks loops of known length with
``bar(items, total, "writing weights")``. Nothing is shown until someone installs a handler:
the CLI puts one on stderr (tqdm bars on a terminal, plain lines elsewhere, silent under
--json); an API user may attach any handler of their own, or none.

This module imports nothing of the project, so every folder can use it without a cycle.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

LOGGER_NAME = "mllama_export"
log = logging.getLogger(LOGGER_NAME)
# Bar updates: below INFO, so that a plain INFO handler sees a bar's first and last line only.
UPDATE = 15
logging.addLevelName(UPDATE, "PROGRESS")

T = TypeVar("T")


@dataclass
class Bar:
    """A loop's state, carried by its log records (``record.bar``) for handlers that draw it."""

    desc: str
    total: float
    unit: str
    done: float = 0.0
    start: float = 0.0
    finished: bool = False

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta(self) -> float | None:
        if self.done <= 0 or self.total <= 0:
            return None
        return self.elapsed * (self.total - self.done) / self.done


def duration(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def info(message: str) -> None:
    log.info(message)


@contextmanager
def step(what: str) -> Iterator[None]:
    """Logs ``what`` when it starts and ``what: 12 s`` when it ends (or when it is stopped)."""
    start = time.perf_counter()
    log.info(what, extra={"step": "start"})
    try:
        yield
    except BaseException:
        log.info(f"{what}: stopped after {duration(time.perf_counter() - start)}")
        raise
    log.info(f"{what}: {duration(time.perf_counter() - start)}", extra={"step": "end"})


def bar(
    items: Iterable[T],
    total: float,
    desc: str,
    unit: str = "it",
    weight: Callable[[T], float] | None = None,
) -> Iterator[T]:
    """Yields ``items``, reporting how far along ``total`` (items, or the sum of ``weight``
    over them: bytes, say) the loop is, with its elapsed time and an estimate of the rest."""
    state = Bar(desc, float(total), unit, start=time.perf_counter())
    log.info(desc, extra={"bar": state})
    for item in items:
        yield item
        state.done += 1 if weight is None else weight(item)
        log.log(UPDATE, desc, extra={"bar": state})
    state.finished = True
    log.info(f"{desc}: {duration(state.elapsed)}", extra={"bar": state})
