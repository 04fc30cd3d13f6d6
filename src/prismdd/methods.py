"""Method presets for ``recover``: each is a YAML file of RecoverConfig fields in ``presets/``.

A preset only sets fields; anything can still be overridden with --config / flags / --set.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .registry import Registry

PRESET_DIR = Path(__file__).parent / "presets"
METHODS: Registry[Path] = Registry("method")
for _p in sorted(PRESET_DIR.glob("*.yaml")):
    METHODS.register(_p.stem, _p)


def method_settings(name: str) -> tuple[str, dict]:
    """(description, settings) of a preset."""
    data = yaml.safe_load(METHODS.get(name).read_text()) or {}
    desc = data.pop("description", "")
    return desc, data


def list_methods() -> list[dict]:
    rows = []
    for name in METHODS.names():
        desc, settings = method_settings(name)
        rows.append({"name": name, "description": desc,
                     "settings": ", ".join(f"{k}={v}" for k, v in settings.items())})
    return rows
