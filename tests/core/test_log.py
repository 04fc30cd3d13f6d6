"""prismdd's messages (issue 32): the terminal handler writes to the stdout of the moment, the audit's stage logs
go to a file for the duration, and nothing is printed for a library caller."""
from __future__ import annotations

import contextlib
import io
import logging

from prismdd.core.log import get_logger, to_file


def test_the_terminal_handler_writes_to_the_current_stdout(capsys):
    said = io.StringIO()
    with contextlib.redirect_stdout(said):  # replaced after the handler was installed (conftest): still seen
        get_logger("recover").info("[recover] 20 images -> out")
    assert said.getvalue() == "[recover] 20 images -> out\n" and capsys.readouterr().out == ""


def test_to_file_sends_the_messages_to_the_file_for_the_duration(capsys, caplog, tmp_path):
    log = tmp_path / "stages.log"
    logging.getLogger("prismdd").setLevel(logging.WARNING)  # as under --quiet: the file still gets the info lines
    with to_file(log):
        get_logger("squeeze").info("[squeeze] convnet: test top-1 90.00% -> t")
        assert log.read_text() == "[squeeze] convnet: test top-1 90.00% -> t\n"  # a line at a time (tail -f)
        get_logger("lock").warning("[squeeze] taking over the lock", extra={"stderr": True})
    get_logger("squeeze").warning("[squeeze] after")
    out, err = capsys.readouterr()
    assert out == "[squeeze] after\n" and err == "[squeeze] taking over the lock\n"  # stderr lines stay on it
    assert log.read_text().splitlines() == ["[squeeze] convnet: test top-1 90.00% -> t", "[squeeze] taking over the lock"]
    assert logging.getLogger("prismdd").level == logging.WARNING  # the caller's level is back
    assert not any(isinstance(h, logging.FileHandler) for h in logging.getLogger("prismdd").handlers)


def test_nothing_printed_without_a_handler(library_logging, capsys, caplog):
    get_logger("data").warning("[data] a warning")  # no handler of prismdd's: not even logging's last resort
    assert capsys.readouterr() == ("", "")
    assert [r.getMessage() for r in caplog.records] == ["[data] a warning"]  # a handler of the caller's sees it
