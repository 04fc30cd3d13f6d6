"""Presets: named bundles of config fields, one YAML file each in ``prismdd/presets/<family>/<name>.yaml``.

One mechanism for every stage: a config class that has presets names its family (``PRESET_FAMILY``) and
the field that picks one (``PRESET_FIELD``): recover's ``method``, validate's ``protocol``, the main job's
and the audit's ``quick``. ``build_config`` puts the picked preset between the dataclass defaults and
everything the user wrote, so a preset only changes defaults and any field can still be overridden.
A YAML file's ``description``, ``paper`` (authors, venue), ``code`` (``github.com/OWNER/REPO @ <40-hex commit>``, the
snapshot the preset was checked against, or ``prismdd`` for our own variants) and ``source`` (title, files read)
are shown by ``prismdd methods``; the rest are fields.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from .errors import PrismError
from .registry import Registry

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
# keys of a preset file that are not config fields; ``starts_from`` (recover): the method whose run gives this one's
# starting images (``--init-from``), run first by ``prismdd run`` and the benchmarks; ``images`` (recover): what the
# set's images are, ``selected`` for a method that picks real training images (its plug-in a ``SelectionPlugin``,
# checked by tests/methods/test_select.py), else left out (synthetic)
INFO_KEYS = ("description", "source", "paper", "code", "starts_from", "images")
CODE_PATTERN = re.compile(r"^github\.com/([\w.-]+/[\w.-]+) @ ([0-9a-f]{40})$")
KINDS = {"recover": "method", "validate": "protocol", "run": "run preset", "audit": "audit preset"}

_families: dict[str, Registry[Path]] = {}


def family(name: str) -> Registry[Path]:
    """The registry of one family's preset files (read from disk once)."""
    if name not in _families:
        reg: Registry[Path] = Registry(KINDS.get(name, f"{name} preset"))
        for p in sorted((PRESET_DIR / name).glob("*.yaml")):
            reg.register(p.stem, p)
        _families[name] = reg
    return _families[name]


def preset_file(family_name: str, name: str) -> dict:
    path = family(family_name).get(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PrismError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return data


def preset_settings(family_name: str, name: str) -> tuple[str, dict]:
    """(description, fields) of one preset."""
    data = preset_file(family_name, name)
    desc = data.get("description", "")
    return desc, {k: v for k, v in data.items() if k not in INFO_KEYS}


def list_presets(family_name: str) -> list[dict]:
    rows = []
    for name in family(family_name).names():
        data = preset_file(family_name, name)
        settings = {k: v for k, v in data.items() if k not in INFO_KEYS}
        code = data.get("code", "")
        m = CODE_PATTERN.match(code)
        rows.append({"name": name, "description": data.get("description", ""), "source": data.get("source", ""),
                     "paper": data.get("paper", ""), "code": f"{m.group(1)} @ {m.group(2)[:7]}" if m else code,
                     "code_full": code, "starts_from": data.get("starts_from", ""),
                     "images": data.get("images", "synthetic" if family_name == "recover" else ""),
                     "settings": ", ".join(f"{k}={v}" for k, v in settings.items())})
    return rows


METHODS = family("recover")  # recovery presets: `prismdd methods`, `--method`
PROTOCOLS = family("validate")  # student-training presets: `--protocol`
# the protocol validate trains with and relabel labels for when none is named: one default for both, so stored
# labels (relabel, then validate --labels) and online ones (validate --teachers) come from the same teachers,
# ensemble and views, and the two flows train the same student up to fp16 storage
DEFAULT_PROTOCOL = "prism"
