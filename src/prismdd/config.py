"""Dataclass configs shared by the CLI and the Python API, filled from YAML files and ``key=value``.

Precedence (lowest first): dataclass defaults < method preset < ``--config FILE.yaml`` < explicit CLI
flags < ``--set key=value``. Unknown keys are an error listing the valid ones.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .utils import PrismError, atomic_path


@dataclass
class CommonConfig:
    """Options every stage honours."""

    dataset: str = "fashion-mnist"  # a name from `prismdd datasets`
    data_root: str | None = None  # folder with the dataset files; default: Debian's /usr/share/datasets/<name>
    download: bool = False  # allow torchvision to download data (needs internet)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # every random choice derives from this (and is recorded)
    out: str = "runs/out"  # output folder
    num_workers: int = 0  # DataLoader workers for file-backed datasets (in-memory sets need none)
    resolution: int | None = None  # None: the dataset's own (imagefolder: 224)
    subset: str | None = None  # .npy/.txt file of training-set indices to use instead of the whole train split


def comma_list(text: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``: the form of every list-valued option (archs, methods, seeds)."""
    return [t.strip() for t in str(text or "").split(",") if t.strip()]


def config_fields(cls_or_obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls_or_obj)}


def config_to_dict(cfg) -> dict:
    return {k: _plain(v) for k, v in dataclasses.asdict(cfg).items()}


def _plain(v):
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, Path):
        return str(v)
    return v


def save_config(cfg, path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise PrismError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PrismError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise PrismError(f"--config {path}: expected a mapping of key: value at the top level")
    return data


def parse_sets(items: Iterable[str]) -> dict:
    """``["a=1", "b=x,y"]`` -> ``{"a": 1, "b": "x,y"}`` (values parsed as YAML scalars)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise PrismError(f"--set {item!r}: expected key=value, e.g. --set iterations=500")
        k, v = item.split("=", 1)
        # kept as text: _coerce parses it as YAML only for fields that are not strings (out=1.10 stays "1.10")
        out[k.strip().replace("-", "_")] = v.strip() if v.strip() else None
    return out


def _coerce(cls, name: str, value: Any, hint) -> Any:
    """Convert ``value`` to the field's annotated type, with a one-line error naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args or hint is Any:
            return None
        raise PrismError(f"{name}: may not be empty")
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if isinstance(value, str) and value.lower() in ("none", "null", "~"):
            return None
        return _coerce(cls, name, value, inner[0]) if len(inner) == 1 else value
    if isinstance(value, str) and hint is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise PrismError(f"{name}={value!r}: not a valid value") from None
        if value is None:
            raise PrismError(f"{name}: may not be empty")
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint in (int, float) and isinstance(value, bool):
            raise ValueError(value)  # `epochs=true` is a mistake, not 1
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
        if origin in (list, tuple):
            if isinstance(value, str):
                value = comma_list(value)
            elif not isinstance(value, (list, tuple)):
                value = [value]
            elem = args[0] if args else Any
            items = [_coerce(cls, name, v, elem) if elem is not Any else v for v in value]
            if origin is tuple:
                if len(args) == 2 and args[1] is not Ellipsis and len(items) != 2:
                    raise ValueError(value)
                return tuple(items)
            return items
    except (TypeError, ValueError):
        raise PrismError(f"{name}={value!r}: expected {getattr(hint, '__name__', hint)}") from None
    return value


def build_config(cls, *layers: Mapping[str, Any] | None, source: str = "config"):
    """Create ``cls`` from layered mappings (later layers win); None values in a layer are skipped."""
    hints = typing.get_type_hints(cls)
    valid = config_fields(cls)
    merged: dict[str, Any] = {}
    for layer in layers:
        for k, v in (layer or {}).items():
            key = k.replace("-", "_")
            if key not in valid:
                raise PrismError(
                    f"unknown {source} key {k!r} for {cls.__name__}; valid keys: {', '.join(valid)}"
                )
            merged[key] = v
    values = {k: _coerce(cls, k, v, hints[k]) for k, v in merged.items()}
    cfg = cls(**values)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def replace(cfg, **changes):
    return build_config(type(cfg), config_to_dict(cfg), changes)


__all__ = ["CommonConfig", "build_config", "config_to_dict", "save_config", "load_yaml", "parse_sets",
           "replace", "field", "dataclass"]
