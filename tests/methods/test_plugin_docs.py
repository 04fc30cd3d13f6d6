"""docs/PLUGINS.md's worked example runs as written: its module and preset, taken from the page's code blocks,
register a method whose own option reaches the config, the CLI and a tiny recover on digits.

It runs in a fresh interpreter: the method must be registered before recover's config is assembled, as a module
in ``methods/`` is (``import prismdd.methods`` imports it first), and this session's registries stay as they are."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_RECOVER

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "PLUGINS.md"

RUNNER = r"""
import contextlib, io, json, sys, types
from pathlib import Path

code, preset, teachers, out = sys.argv[1:5]
tiny = json.loads(sys.argv[5])
# the module as if it were src/prismdd/methods/noise.py (its dataclass resolves its annotations through sys.modules)
module = types.ModuleType("prismdd.methods.noise")
sys.modules[module.__name__] = module
exec(compile(code, "docs/PLUGINS.md: src/prismdd/methods/noise.py", "exec"), module.__dict__)
from prismdd.core.presets import METHODS
METHODS.register("noise", Path(preset))

from prismdd.cli import build_parser, main
from prismdd.core.config import config_hash
from prismdd.core.errors import PrismError
from prismdd.core.io import read_json
from prismdd.stages.recover import recover_config

res = {}
argv = ["recover", "--method", "noise", "--help"]
res["help"] = build_parser(argv)._subparsers._group_actions[0].choices["recover"].format_help()
cfg = recover_config("noise", dataset="digits", teachers="/t", noise_tv_weight=0.2)
res["cfg"] = [cfg.plugin, cfg.init, cfg.noise_tv_weight]
res["hash_moves"] = config_hash(cfg) != config_hash(recover_config("noise", dataset="digits", teachers="/t"))
res["prism_hash"] = config_hash(recover_config("prism", dataset="digits", teachers="/t"))
try:
    recover_config("noise", init="real")
except PrismError as e:
    res["refusal"] = str(e)
flags = [f"--{k.replace('_', '-')}={v}" for k, v in tiny.items()]
with contextlib.redirect_stdout(io.StringIO()):
    res["rc"] = main(["recover", "--method", "noise", "--noise-tv-weight", "0.5", "--teachers", teachers,
                      "--out", out, *flags])
res["records"] = [read_json(p) for p in sorted(Path(out, "records").glob("batch_*.json"))]
res["manifest_weight"] = read_json(Path(out, "manifest.json"))["config"]["noise_tv_weight"]
print(json.dumps(res))
"""


def block(text: str, lang: str, first_line: str) -> str:
    """The ``lang`` code block of ``text`` whose first line is ``first_line``."""
    found = [b for b in re.findall(rf"```{lang}\n(.*?)```", text, re.S) if b.splitlines()[0] == first_line]
    assert len(found) == 1, f"docs/PLUGINS.md: expected one {lang} block starting {first_line!r}"
    return found[0]


@pytest.mark.slow
def test_the_worked_example_is_a_whole_method(zoo, tmp_path):
    text = DOC.read_text()
    code = block(text, "python", "# src/prismdd/methods/noise.py")
    assert len(code.splitlines()) <= 60  # the page promises a method in under 60 lines
    preset = tmp_path / "noise.yaml"
    preset.write_text(block(text, "yaml", "# src/prismdd/presets/recover/noise.yaml"))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", RUNNER, code, str(preset), str(zoo), str(tmp_path / "out"),
                           json.dumps(TINY_RECOVER)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])

    # its option is a field of recover's config under its flat name, shapes the hash, and its check refuses
    assert res["cfg"] == ["noise", "noise", 0.2] and res["hash_moves"]
    assert res["refusal"].startswith("--init real: --plugin noise starts from noise")
    # its field is in every recover config but takes no part in prism's run, so prism's hash stays the golden value of
    # tests/methods/test_plugin_options.py (docs/PLUGINS.md says so): adding a method keeps every finished folder
    assert res["prism_hash"] == "a8d381054cf8c755"
    # --method noise --help: the engine's section and the method's own, no other plug-in's
    helptext = res["help"]
    assert "\nengine:" in helptext and "\nplug-in noise:" in helptext and "--noise-tv-weight" in helptext
    assert "[default from the preset: 0.05]" in " ".join(helptext.split("--noise-tv-weight")[-1].split())
    assert "\n  --frepo-width" not in helptext and "\nplug-in frepo:" not in helptext  # (the epilog names it)
    assert "--clip-prior" in helptext  # the engine optimises this method's pixels: the prior applies

    # the tiny recover on digits ran with it: the term is logged, weighted, in every batch
    assert res["rc"] == 0 and res["manifest_weight"] == 0.5
    assert res["records"] and all(r["final_losses"]["noise_tv"] > 0 for r in res["records"])


def test_adding_the_example_touches_only_its_module_preset_and_tests():
    """What the page says a method needs: nothing outside the three files, because methods/ imports its own
    modules and recover's config, help and presets are read from registries."""
    text = DOC.read_text()
    init = (ROOT / "src" / "prismdd" / "methods" / "__init__.py").read_text()
    assert "pkgutil.iter_modules" in init  # a new module is imported without a line added here
    for path in ("src/prismdd/methods/noise.py", "src/prismdd/presets/recover/noise.yaml", "tests/methods/test_noise.py"):
        assert path in text
