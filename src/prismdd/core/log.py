"""prismdd's messages: one ``logging`` logger per stage or module under ``prismdd`` (``prismdd.recover``,
``prismdd.data``, ...), each message carrying its ``[stage] `` prefix in its text.

A library user gets no handler beyond logging's default (a NullHandler on ``prismdd``, set in ``prismdd/__init__``):
route or silence the messages with ``logging`` as for any library. The ``prismdd`` command installs one
``TerminalHandler`` (``configure``): the messages on stdout as plain lines, what ``--quiet`` and ``--verbose`` set.
Progress bars (tqdm) are not messages: they stay on stderr. Deliberately free of torch (``prismdd --help``).
"""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = "prismdd"
PLAIN = logging.Formatter("%(message)s")  # the text is the line: "[recover] 20 images -> ..."


def get_logger(name: str) -> logging.Logger:
    """The logger ``prismdd.<name>`` (``name`` a stage or module: ``recover``, ``data``, ``recover.frepo``)."""
    return logging.getLogger(f"{ROOT}.{name}")


class TerminalHandler(logging.Handler):
    """Writes each message as one line to the *current* ``sys.stdout`` (``sys.stderr`` for a record logged with
    ``extra={"stderr": True}``), looked up at emit time: a caller's ``contextlib.redirect_stdout`` (or pytest's
    capture) sees the lines, as it saw the prints they replace."""

    def __init__(self, level: int = logging.NOTSET):
        super().__init__(level)
        self.setFormatter(PLAIN)
        self.diverted = 0  # > 0 while ``to_file`` sends the messages to a file instead

    def emit(self, record: logging.LogRecord) -> None:
        to_stderr = getattr(record, "stderr", False)
        if self.diverted and not to_stderr:  # stderr lines (a lock taken over) stay on the terminal
            return
        try:
            stream = sys.stderr if to_stderr else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()  # a line at a time: `tail -f` and a pipe see it at once
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def level_of(quiet: bool = False, verbose: bool = False) -> int:
    """``--quiet``: warnings and errors only; ``--verbose``: debug messages too; neither: info."""
    return logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO


def configure(level: int = logging.INFO) -> TerminalHandler:
    """What the ``prismdd`` command does before it runs: one ``TerminalHandler`` on the ``prismdd`` logger (the
    same one on every call: an in-process caller may run ``main`` many times) and the level."""
    logger = logging.getLogger(ROOT)
    handler = next((h for h in logger.handlers if isinstance(h, TerminalHandler)), None)
    if handler is None:
        handler = TerminalHandler()
        logger.addHandler(handler)
    logger.setLevel(level)
    return handler


@contextmanager
def to_file(path: str | Path):
    """For the duration, prismdd's messages go to ``path`` (appended, flushed line by line: ``tail -f`` works)
    instead of the terminal handler; handlers of the caller's own (the root logger's) still see them. The file
    gets the info lines whatever the terminal's level (it is the record of what ran)."""
    logger = logging.getLogger(ROOT)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(PLAIN)
    terminals = [h for h in logger.handlers if isinstance(h, TerminalHandler)]
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    for h in terminals:
        h.diverted += 1
    try:
        yield handler
    finally:
        for h in terminals:
            h.diverted -= 1
        logger.setLevel(level)
        logger.removeHandler(handler)
        handler.close()


_SAID: set[tuple[str, str]] = set()  # (key, text): notices already said by this process


def say_once(key, text: str, logger: str = "data", level: int = logging.INFO) -> None:
    """Log a notice about ``key`` (a dataset root, a folder) once per process: every stage of ``prismdd run`` loads
    the same data, and one notice said nine times reads as nine problems."""
    if (str(key), text) not in _SAID:
        _SAID.add((str(key), text))
        get_logger(logger).log(level, text)
