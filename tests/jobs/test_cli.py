"""The prismdd command: help, listings, and one-line errors (exit code 2) for unknown names / keys."""
from __future__ import annotations

import sys

import pytest

from prismdd.core.presets import METHODS
from prismdd.core.models import ARCHS


def _run(cli, capsys, argv):
    capsys.readouterr()
    code = cli(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help(cli, capsys):
    code, out, _ = _run(cli, capsys, ["--help"])
    assert code == 0
    for word in ("squeeze", "recover", "datasets", "models", "methods", "check-data", "digits"):
        assert word in out
    code, out2, _ = _run(cli, capsys, [])  # no command: help, exit 0
    assert code == 0 and "squeeze" in out2


def test_stage_help_lists_config_fields(cli, capsys):
    code, out, _ = _run(cli, capsys, ["recover", "--help"])
    assert code == 0
    for flag in ("--ipc", "--bn-pool", "--selection", "--crop-scale", "--set", "--config", "--primary"):
        assert flag in out
    assert "[default: 10]" in out  # ipc's default is shown
    code, out, _ = _run(cli, capsys, ["squeeze", "--help"])
    assert code == 0 and "--arch" in out and "--epochs" in out


def test_datasets_table(cli, capsys):
    code, out, _ = _run(cli, capsys, ["datasets"])
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split(" | ")[0].strip() == "name" and "available" in lines[0] and "description" in lines[0]
    rows = {line.split(" | ")[0].strip(): line for line in lines[2:]}
    assert {"digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder"} <= set(rows)
    assert "scikit-learn" in rows["digits"]
    assert "no (" in rows["imagefolder"]  # not available without --data-root, with how to get it


def test_models_table(cli, capsys):
    code, out, _ = _run(cli, capsys, ["models"])
    assert code == 0
    lines = out.strip().splitlines()
    assert [c.strip() for c in lines[0].split(" | ")] == ["name", "family", "batchnorm", "pretrained", "description"]
    rows = {line.split(" | ")[0].strip(): [c.strip() for c in line.split(" | ")] for line in lines[2:]}
    assert set(ARCHS.names()) <= set(rows)
    assert rows["alexnet"][2] == "False" and rows["convnet_in"][2] == "False" and rows["resnet18"][2] == "True"
    assert any(name.startswith("timm:") for name in rows)


def test_methods_table(cli, capsys):
    code, out, _ = _run(cli, capsys, ["methods", "--wide"])
    assert code == 0
    rows = {line.split(" | ")[0].strip(): line for line in out.strip().splitlines()[2:]}
    assert set(rows) == set(METHODS.names())
    assert "selection=intra" in rows["prism"] and "selection=pre" in rows["prism-pre"]
    assert "init=noise" in rows["sre2l"] and "budget=rounds" in rows["delt"]


@pytest.mark.parametrize("argv", [["methods"], ["models"]])
def test_listings_fit_100_columns(cli, capsys, argv):
    code, out, _ = _run(cli, capsys, argv)
    assert code == 0 and max(len(line) for line in out.splitlines()) <= 100
    names = {line.split(" | ")[0].strip() for line in out.strip().splitlines()[2:] if " | " in line}
    assert names >= set(METHODS.names() if argv == ["methods"] else ARCHS.names())


@pytest.mark.parametrize("family", ["recover", "validate"])
def test_every_preset_names_its_paper_and_code(family):
    """A paper-named preset names the code snapshot it was checked against (owner/repo @ full commit); our own
    variants say prismdd."""
    import re

    from prismdd.core.presets import CODE_PATTERN, list_presets

    for row in list_presets(family):
        assert row["paper"], f"{family}/{row['name']}: no paper"
        assert row["code_full"] == "prismdd" or CODE_PATTERN.match(row["code_full"]), (family, row["name"])
        if row["code_full"] != "prismdd":  # the commit in `code` is the one the source line names
            assert re.search(row["code_full"].split(" @ ")[1], row["source"]), (family, row["name"])


def test_methods_lists_paper_and_code(cli, capsys):
    code, out, _ = _run(cli, capsys, ["methods"])
    rows = {line.split(" | ")[0].strip(): line for line in out.strip().splitlines()[2:] if " | " in line}
    assert "VILA-Lab/SRe2L @ 8d00cba" in rows["sre2l"] and "NeurIPS 2023" in rows["sre2l"]
    code, out, _ = _run(cli, capsys, ["methods", "--protocols"])
    assert code == 0 and "Brian-Moser/prism @ a691b41" in out


def test_one_method_shows_its_settings(cli, capsys):
    code, out, _ = _run(cli, capsys, ["methods", "sre2l"])
    assert code == 0 and "init=noise" in out and out.startswith("name: sre2l")
    assert _run(cli, capsys, ["methods", "nope"])[0] == 2


def test_help_shows_the_chosen_presets_defaults(cli, capsys):
    code, out, _ = _run(cli, capsys, ["recover", "--method", "sre2l", "--help"])
    assert code == 0 and "preset 'sre2l'" in out
    init_help = " ".join(out.split("\n  --init INIT", 1)[1].split("--init-select")[0].split())
    assert "[default from the preset: noise]" in init_help
    code, out, _ = _run(cli, capsys, ["recover", "--help"])  # the default method is prism: real init
    init_help = " ".join(out.split("\n  --init INIT", 1)[1].split("--init-select")[0].split())
    assert "[default: real]" in init_help


def test_boolean_fields_switch_both_ways(cli, capsys):
    from prismdd.cli import build_parser, config_from_args

    argv = ["recover", "--no-flip", "--no-channels-last", "--bn-normalize"]
    cfg = config_from_args("recover", build_parser(argv).parse_args(argv))
    assert (cfg.flip, cfg.channels_last, cfg.bn_normalize) == (False, False, True)
    argv = ["run", "--quick", "--no-quick"]
    assert config_from_args("run", build_parser(argv).parse_args(argv)).quick is False


def _one_line_error(code, err):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("prismdd: error:"), err
    return lines[0]


def test_unknown_method(cli, capsys, tmp_path):
    code, _, err = _run(cli, capsys, ["recover", "--method", "prizm", "--dataset", "digits",
                                      "--out", tmp_path / "r", "--device", "cpu"])
    msg = _one_line_error(code, err)
    assert "prizm" in msg
    for name in METHODS.names():
        assert name in msg


def test_unknown_method_via_set(cli, capsys, tmp_path):
    code, _, err = _run(cli, capsys, ["recover", "--set", "method=nope", "--out", tmp_path / "r"])
    msg = _one_line_error(code, err)
    assert "nope" in msg and "sre2l" in msg


@pytest.mark.parametrize("stage", ["squeeze", "recover"])
def test_unknown_dataset(cli, capsys, tmp_path, stage):
    extra = ["--teachers", tmp_path] if stage == "recover" else []
    code, _, err = _run(cli, capsys, [stage, "--dataset", "cifar11", "--out", tmp_path / "o", "--device", "cpu"]
                        + extra)
    msg = _one_line_error(code, err)
    assert "cifar11" in msg and "digits" in msg and "fashion-mnist" in msg


def test_unknown_dataset_check_data(cli, capsys):
    code, _, err = _run(cli, capsys, ["check-data", "--dataset", "nope"])
    assert "digits" in _one_line_error(code, err)


def test_unknown_arch(cli, capsys, tmp_path):
    code, _, err = _run(cli, capsys, ["squeeze", "--dataset", "digits", "--arch", "resnet17", "--epochs", "1",
                                      "--out", tmp_path / "t", "--device", "cpu"])
    msg = _one_line_error(code, err)
    assert "resnet17" in msg and "resnet18" in msg and "mobilenet_v2" in msg
    assert not (tmp_path / "t" / "resnet17" / "card.json").exists()


def test_unknown_set_key_lists_valid_keys(cli, capsys, tmp_path):
    code, _, err = _run(cli, capsys, ["squeeze", "--dataset", "digits", "--out", tmp_path / "t",
                                      "--set", "epoch=3"])
    msg = _one_line_error(code, err)
    assert "'epoch'" in msg
    for key in ("epochs", "arch", "width", "batch_size", "seed"):
        assert key in msg
    code, _, err = _run(cli, capsys, ["recover", "--set", "ipcs=3", "--out", tmp_path / "r"])
    msg = _one_line_error(code, err)
    assert "'ipcs'" in msg and "ipc" in msg and "bn_pool" in msg


def test_unknown_key_in_config_file(cli, capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 1\nlearning_rate: 0.1\n")
    code, _, err = _run(cli, capsys, ["squeeze", "--config", cfg, "--out", tmp_path / "t"])
    msg = _one_line_error(code, err)
    assert "learning_rate" in msg and "lr" in msg
    code, _, err = _run(cli, capsys, ["squeeze", "--config", tmp_path / "missing.yaml", "--out", tmp_path / "t"])
    assert "missing.yaml" in _one_line_error(code, err)


def test_set_without_equals(cli, capsys, tmp_path):
    code, _, err = _run(cli, capsys, ["squeeze", "--set", "epochs", "--out", tmp_path / "t"])
    assert "key=value" in _one_line_error(code, err)


def test_unknown_command_is_a_usage_error(cli, capsys):
    code, _, err = _run(cli, capsys, ["distil"])
    assert code == 2 and "invalid choice" in err


def test_python_api_exports_keep_stage_modules():
    import importlib
    import types

    import prismdd

    for name in ("squeeze", "recover", "relabel", "validate", "metrics"):
        mod = importlib.import_module(f"prismdd.stages.{name}")
        assert callable(getattr(mod, name))  # prismdd.stages.<stage>.<stage>(config)
    assert isinstance(prismdd.audit, types.ModuleType)  # a function here would shadow the module
    assert callable(prismdd.audit.audit)
    for name in prismdd.__all__:
        assert hasattr(prismdd, name), name
    assert prismdd.recover_config("sre2l").init == "noise"


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--help"], ["methods"], ["methods", "--protocols", "prism"], ["models"]])
def test_help_and_listings_start_without_torch(argv):
    """Issue 27: `prismdd --help` took 12-15 s on a loaded machine, nearly all of it importing torch. The
    listings and the top-level help never import it now (times: benchmarks/startup.py, BENCHMARKS.md 11)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "prismdd", *argv], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "torch" not in imported and "torchvision" not in imported and "numpy" not in imported, argv


@pytest.mark.slow
def test_lazy_attributes_and_no_old_stage_names():
    """The public names load on first use without torch; the stages live in prismdd.stages only (no import hook)."""
    import subprocess
    import sys

    code = ("import sys, prismdd; assert 'torch' not in sys.modules; "
            "assert prismdd.RunConfig.__name__ == 'RunConfig' and callable(prismdd.validate_config); "
            "from prismdd.stages.recover import recover\n"
            "try:\n    import prismdd.recover\nexcept ModuleNotFoundError:\n    pass\n"
            "else:\n    raise SystemExit('prismdd.recover still imports')\n"
            "assert not hasattr(prismdd, 'recover') and not hasattr(prismdd, 'load_teacher')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_bad_name_in_a_list_option_is_named(cli, capsys, tmp_path):
    """Issue 27: `--methods prism,foo` listed the valid names without saying which one was wrong."""
    code = cli(["run", "--methods", "prism,foo", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "--methods 'prism,foo' (foo unknown): expected a comma list of" in err
    assert not (tmp_path / "r").exists()


def test_a_failed_stage_call_leaves_no_empty_folder(cli, capsys, tmp_path):
    """Issue 27: a call that failed its checks (missing --teachers) left its empty output folder behind."""
    out = tmp_path / "new" / "recover"
    code = cli(["recover", "--dataset", "digits", "--teachers", str(tmp_path / "missing"), "--out", str(out)])
    assert code == 2 and "no finished teachers found" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    (kept / "note.txt").parent.mkdir()
    (kept / "note.txt").write_text("mine")
    assert cli(["recover", "--dataset", "digits", "--teachers", str(tmp_path / "missing"), "--out", str(kept)]) == 2
    assert (kept / "note.txt").read_text() == "mine"  # a folder that existed is left alone


# ----------------------------------------------------------------------------- issue 36: threads, help
THREADED = ("squeeze", "recover", "relabel", "validate", "run", "metrics", "audit")


@pytest.mark.parametrize("command", THREADED)
def test_every_stage_command_takes_threads_outside_the_config_hash(cli, capsys, command):
    from prismdd.cli import stage
    from prismdd.core.config import CommonConfig, build_config, config_fields, config_hash

    code, out, _ = _run(cli, capsys, [command, "--help"])
    assert code == 0 and "--threads THREADS" in out
    cls = stage(command)[0]
    # one definition, not one per command
    assert config_fields(cls)["threads"].metadata is config_fields(CommonConfig)["threads"].metadata
    base = {"validate": dict(random_real=True, teachers="t")}.get(command, {})
    # a machine setting: finished outputs made with any thread count stay reusable
    assert config_hash(build_config(cls, base)) == config_hash(build_config(cls, dict(base, threads=1)))


def test_default_threads_share_the_usable_cores(monkeypatch):
    import os

    from prismdd.core import runtime

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)  # e.g. taskset -c 0,2,5
    assert runtime.default_threads() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun --nproc_per_node 2: half each, at least one
    assert runtime.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's word wins
    assert runtime.default_threads() == 2


def test_default_threads_split_the_cores_among_running_prismdd_jobs(monkeypatch, tmp_path):
    """Two commands started side by side take half the cores each (2 threads each on 2 cores ran 1.8x slower than
    1 each, BENCHMARKS 14.1); a job left alone takes them all again at its next heartbeat; a killed job's file is
    not counted."""
    import os
    import subprocess

    import torch

    from prismdd.core import runtime

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("PRISMDD_JOBS_DIR", str(tmp_path / "jobs"))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(runtime, "RETUNE_EVERY_S", 0.0)
    monkeypatch.setattr(runtime, "FIRST_RETUNE_S", 0.0)
    before = torch.get_num_threads()
    other = subprocess.Popen(["sleep", "30"])  # another job, alive
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        with runtime.shared_cores(auto=True):
            assert runtime.default_threads() == 4 and runtime.live_jobs() == 1
            (tmp_path / "jobs" / str(other.pid)).touch()
            (tmp_path / "jobs" / str(dead.pid)).touch()
            assert runtime.live_jobs() == 2 and runtime.default_threads() == 2
            assert not (tmp_path / "jobs" / str(dead.pid)).exists()
            runtime.Heartbeat("test", 10, enabled=False).step()  # the running loop re-tunes its threads
            assert torch.get_num_threads() == 2
            other.kill()
            other.wait()
            runtime.Heartbeat("test", 10, enabled=False).step()
            assert torch.get_num_threads() == 4
        assert not any((tmp_path / "jobs").iterdir())  # its own file goes with it
        with runtime.shared_cores(auto=False):  # --threads given: counted by the others, never re-tuned
            torch.set_num_threads(1)
            runtime.Heartbeat("test", 10, enabled=False).step()
            assert torch.get_num_threads() == 1
    finally:
        other.kill()
        torch.set_num_threads(before)


def test_threads_are_set_for_the_stage_recorded_and_restored(cli, capsys, tmp_path):
    import torch

    from prismdd.core.io import read_json

    before = torch.get_num_threads()
    want = 2 if before == 1 else 1  # a count other than the caller's, so setting it is seen
    code, _, err = _run(cli, capsys, ["squeeze", "--dataset", "digits", "--arch", "convnet", "--width", "0.25",
                                      "--epochs", "1", "--batch-size", "256", "--device", "cpu", "--threads", want,
                                      "--out", tmp_path / "t"])
    assert code == 0, err
    assert read_json(tmp_path / "t" / "manifest.json")["threads"] == want
    assert torch.get_num_threads() == before  # the caller's count is back


def test_one_default_per_option_in_help(cli, capsys):
    code, out, _ = _run(cli, capsys, ["export", "--help"])
    assert code == 0 and "(default: <distilled>-ddranking)" in out
    assert "[default: None]" not in out.split("--out OUT", 1)[1].split("--teachers", 1)[0]
    for command in ("validate", "relabel", "recover", "run"):
        code, out, _ = _run(cli, capsys, [command, "--help"])
        options = " ".join(out.split()).split(" --")[1:]  # one option (flag, help, default) per item
        twice = [o for o in options if "[default: None]" in o and "default" in o.split("[default")[0].lower()]
        assert code == 0 and not twice, (command, twice)


@pytest.mark.slow
@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_the_command_line_makes_openmp_waiters_passive_unless_told(preset):
    """Spinning OpenMP waiters made two 2-thread jobs on 2 cores 4-5x slower (BENCHMARKS.md section 14): the
    command sets OMP_WAIT_POLICY=PASSIVE before torch loads; a value the user set is kept."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = ("import os, sys; from prismdd.cli import main; main(['datasets']); "
            "print('policy', os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip().splitlines()[-1].split()[:2] == ["policy", preset or "PASSIVE"]


# ----------------------------------------------------------------------------- issue 32: logging
TINY_SQUEEZE = ["squeeze", "--dataset", "digits", "--arch", "convnet", "--width", "0.25", "--epochs", "1",
                "--batch-size", "256", "--device", "cpu"]


@pytest.mark.parametrize("command", ["squeeze", "recover", "relabel", "validate", "run", "metrics", "audit", "export",
                                     "datasets", "models", "methods", "check-data"])
def test_every_command_takes_quiet_and_verbose(cli, capsys, command):
    code = cli([command, "--help"])
    out = capsys.readouterr().out
    assert code == 0 and "--quiet" in out and "--verbose" in out


def test_quiet_silences_info_lines(cli, capsys, caplog, tmp_path):
    import logging

    code, out, err = _run(cli, capsys, [*TINY_SQUEEZE, "--quiet", "--out", tmp_path / "t"])
    assert code == 0, err
    # a 1-epoch teacher is at chance: that warning stays; the info lines ("test top-1 ... -> folder") do not
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert out.splitlines() == warned and "at chance level" in out and " -> " not in out
    assert not any(r.levelno < logging.WARNING for r in caplog.records)
    assert logging.getLogger("prismdd").level == logging.WARNING
    # the same command without --quiet says what it found (the teacher is finished: one info line)
    code, out, err = _run(cli, capsys, [*TINY_SQUEEZE, "--out", tmp_path / "t"])
    assert code == 0 and "[squeeze] convnet: finished teacher found in" in out
    assert any(r.name == "prismdd.squeeze" and r.levelno == logging.INFO for r in caplog.records)
    caplog.clear()
    code, out, err = _run(cli, capsys, [*TINY_SQUEEZE, "-q", "--out", tmp_path / "t"])
    assert code == 0 and out == "" and not caplog.records  # the finished teacher's line is info: dropped
    code, out, err = _run(cli, capsys, [*TINY_SQUEEZE, "--verbose", "--out", tmp_path / "t"])
    assert code == 0 and "finished teacher found" in out and logging.getLogger("prismdd").level == logging.DEBUG
    assert cli([*TINY_SQUEEZE, "--quiet", "--verbose", "--out", tmp_path / "t"]) == 2  # one or the other


def test_a_library_caller_gets_the_messages_and_no_output(library_logging, caplog, capsys, tmp_path):
    """`import prismdd` installs no handler: nothing is printed, and the caller's logging sees every message."""
    import logging

    from prismdd.core.config import build_config
    from prismdd.stages.squeeze import SqueezeConfig, squeeze

    settings = dict(dataset="digits", arch="convnet", width=0.25, epochs=1, batch_size=256, device="cpu",
                    out=str(tmp_path / "t"))
    assert [type(h) for h in library_logging.handlers] == [logging.NullHandler]
    squeeze(build_config(SqueezeConfig, settings))
    assert capsys.readouterr() == ("", "")  # nothing printed by prismdd (no handler of its own)
    caplog.set_level(logging.INFO, logger="prismdd")  # the caller routes prismdd's info messages
    squeeze(build_config(SqueezeConfig, settings))
    assert capsys.readouterr() == ("", "")
    said = [(r.name, r.getMessage()) for r in caplog.records]
    assert any(name == "prismdd.squeeze" and "[squeeze] convnet: finished teacher found in" in text
               for name, text in said), said


def test_say_once_is_once_per_process(caplog):
    import logging

    from prismdd.core.log import say_once

    caplog.set_level(logging.INFO, logger="prismdd")
    for _ in range(3):
        say_once("key-of-this-test", "[data] a notice", logger="data")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("prismdd.data", "[data] a notice")]
