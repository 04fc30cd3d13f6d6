"""Issue 36: progress without a terminal. Every long stage prints a line at least once a minute when its output goes to
a file (``Heartbeat``), with the stage, step of total, loss, elapsed time and time left."""
from __future__ import annotations

import re

import pytest

from prismdd.core import runtime
from prismdd.core.config import build_config
from prismdd.stages.relabel import RelabelConfig, relabel
from prismdd.stages.validate import validate, validate_config

LINE = re.compile(r"^\[(?P<stage>[^\]]+)\] (?:.*, )?step (?P<done>\d+)/(?P<total>\d+) \(\d+ %\)(?:, loss [\d.]+)?, "
                  r"\d+(?:s|m\d\ds|h\d\dm) elapsed(?:, about \S+ left)?$")


class FakeClock:
    def __init__(self):
        self.elapsed = 0.0


def test_a_line_once_the_interval_has_passed_with_the_time_left(capsys, monkeypatch):
    monkeypatch.delenv(runtime.PROGRESS_EVERY_ENV, raising=False)
    beat = runtime.Heartbeat("recover prism", 300, done=100)  # resumed after 100 of 300 steps
    beat.timer = clock = FakeClock()
    for _ in range(10):  # 10 steps in 59 s: not yet a minute, nothing said
        clock.elapsed += 5.9
        beat.step(loss=1.5)
    assert capsys.readouterr().out == ""
    clock.elapsed = 61.0
    beat.step(loss=1.23456, batch=0)
    # 11 steps made in 61 s, 189 left: about 17m28s
    assert capsys.readouterr().out == ("[recover prism] batch 0, step 111/300 (37 %), loss 1.2346, 1m01s elapsed, "
                                       "about 17m28s left\n")
    clock.elapsed = 100.0  # 39 s later: quiet again until the next minute
    beat.step()
    assert capsys.readouterr().out == ""


def test_the_interval_is_a_setting(monkeypatch):
    monkeypatch.setenv(runtime.PROGRESS_EVERY_ENV, "0.5")
    assert runtime.Heartbeat("x", 1).every == 0.5
    monkeypatch.setenv(runtime.PROGRESS_EVERY_ENV, "soon")
    with pytest.raises(runtime.PrismError, match="PRISMDD_PROGRESS_EVERY"):
        runtime.Heartbeat("x", 1)


def _lines(text: str, stage: str) -> list[re.Match]:
    found = [LINE.match(line) for line in text.splitlines() if line.startswith(f"[{stage}]")]
    assert found and all(found), text[-2000:]
    return found


def test_recover_relabel_and_validate_say_where_they_are_without_a_terminal(recover_run, zoo, tmp_path, capsys,
                                                                           monkeypatch):
    """Output captured (not a terminal) and an interval of 0: a line for every step of each long stage."""
    monkeypatch.setenv(runtime.PROGRESS_EVERY_ENV, "0")
    rec = recover_run(tmp_path / "rec")  # 3 iterations per batch
    lines = _lines(capsys.readouterr().out, "recover prism")
    total = 3 * len(list((rec / "records").glob("batch_*.json")))
    assert [int(m["done"]) for m in lines] == list(range(1, total + 1)) and {m["total"] for m in lines} == {str(total)}
    relabel(build_config(RelabelConfig, dict(dataset="digits", distilled=str(rec), teachers=str(zoo), epochs=2,
                                             batch_size=8, device="cpu", out=str(tmp_path / "labels"))))
    out = capsys.readouterr().out
    assert "[relabel] epoch 1/2 (50 %)" in out and "[relabel] epoch 2/2 (100 %)" in out
    validate(validate_config(dataset="digits", device="cpu", student_width=0.25, distilled=str(rec),
                             labels=str(tmp_path / "labels"), epochs=2, out=str(tmp_path / "eval")))
    lines = _lines(capsys.readouterr().out, "validate convnet seed 0")
    assert int(lines[-1]["done"]) == int(lines[-1]["total"]) == 6  # 20 images in batches of 8: 3 steps x 2 epochs
