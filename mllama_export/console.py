"""What the CLI shows of the library's progress (graphs/progress.py): on stderr, so that
stdout carries only a command's answer.

Every step prints a line when it starts and one with its time when it ends. On a terminal a
loop of known length is a tqdm bar with its rate and an estimate of the time left; elsewhere
(a pipe, a CI log) a loop that runs long prints its share done, the time so far and the
estimate every PLAIN_EVERY_S, and its total time at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

import click

from mllama_export.graphs.progress import LOGGER_NAME, UPDATE, Bar, duration

# Without a terminal, a running loop is reported at most this often, and a finished one
# only if it took longer than SLOW_S (its time then ends the line).
PLAIN_EVERY_S = 10.0
SLOW_S = 2.0


class ConsoleHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=UPDATE)
        self._bars: dict[int, object] = {}  # id(Bar) -> a tqdm bar, or when it last printed

    def emit(self, record: logging.LogRecord) -> None:
        try:
            state = getattr(record, "bar", None)
            if state is None:
                if record.levelno >= logging.INFO:
                    self._line(record.getMessage())
            else:
                self._bar(state, record)
        except Exception:  # a display problem must never stop a build
            self.handleError(record)

    def _line(self, text: str) -> None:
        if any(not isinstance(b, float) for b in self._bars.values()):
            from tqdm import tqdm

            tqdm.write(f"  {text}", file=sys.stderr)
        else:
            click.echo(f"  {text}", err=True)

    def _bar(self, state: Bar, record: logging.LogRecord) -> None:
        key = id(state)
        if key not in self._bars:
            if sys.stderr.isatty():
                self._bars[key] = self._tqdm(state)
            else:
                self._bars[key] = state.start
                self._line(f"{state.desc} ({_amount(state.total, state.unit)})")
            return
        shown = self._bars[key]
        if state.finished:
            del self._bars[key]
            if not isinstance(shown, float):
                shown.close()
            if state.elapsed >= SLOW_S:
                self._line(record.getMessage())
        elif isinstance(shown, float):
            if time.perf_counter() - shown >= PLAIN_EVERY_S:
                self._bars[key] = time.perf_counter()
                self._line(_status(state))
        else:
            shown.n = min(state.done, state.total)
            shown.refresh()

    @staticmethod
    def _tqdm(state: Bar):
        from tqdm import tqdm

        scale = state.unit == "B"
        return tqdm(
            total=state.total,
            desc=f"  {state.desc}",
            unit=state.unit,
            unit_scale=scale,
            unit_divisor=1024 if scale else 1000,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
            mininterval=0.5,
        )


def _status(state: Bar) -> str:
    fraction = state.done / state.total if state.total else 1.0
    eta = state.eta()
    rest = "" if eta is None else f", about {duration(eta)} left"
    done = _amount(state.done, state.unit)
    return f"{state.desc}: {fraction:.0%} ({done}) after {duration(state.elapsed)}{rest}"


def _amount(total: float, unit: str) -> str:
    if unit == "B":
        return f"{total / 1e9:.2f} GB" if total >= 1e8 else f"{total / 1e6:.1f} MB"
    return f"{total:g} {unit}"


def install(quiet: bool = False) -> Callable[[], None]:
    """One console handler on the project's logger (replacing any earlier one).

    Returns what puts the logger back as it was: the CLI calls it when a command ends, so
    that running the CLI in-process (a test, a notebook) leaves no handler behind and the
    host's own logging (which we keep out of while a command runs) sees records again."""
    logger = logging.getLogger(LOGGER_NAME)
    before = (list(logger.handlers), logger.level, logger.propagate)
    for handler in [h for h in logger.handlers if isinstance(h, ConsoleHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(ConsoleHandler())
    logger.setLevel(logging.WARNING if quiet else UPDATE)
    logger.propagate = False

    def restore() -> None:
        logger.handlers[:] = before[0]
        logger.setLevel(before[1])
        logger.propagate = before[2]

    return restore


def quiet() -> None:
    """Progress off (``--json``: a machine reads the output); warnings still show."""
    logging.getLogger(LOGGER_NAME).setLevel(logging.WARNING)
