"""Dataclass configs shared by the CLI and the Python API, filled from YAML files and ``key=value``.

Precedence (lowest first): dataclass defaults < preset (``--method``, ``--protocol``, ``--quick``) <
``--config FILE.yaml`` < explicit CLI flags < ``--set key=value``. Unknown keys are an error listing the
valid ones.

Every field is declared with ``opt(default, help, ...)``: its help text (the CLI's ``--help``), its
allowed values or lower bound (checked when the config is built, so a bad value fails before any work; every
float must also be finite: NaN or inf never reaches a stage),
and whether it shapes results (fields that do not, such as ``out`` or ``device``, are left out of the
config hash that decides whether finished work may be reused).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .errors import PrismError
from .io import atomic_path
from .presets import preset_settings


def opt(default: Any, help: str, *, choices: Iterable[Any] | None = None, many: bool = False,
        minimum: float | None = None, hashed: bool = True, path: bool = False):
    """A config field with its help text. ``choices``: the allowed values (``many``: the field is a comma
    list and each item must be one of them); ``minimum``: the smallest allowed number; ``hashed=False``: the
    field does not change results (where outputs go, how fast they are made), so the config hash skips it;
    ``path``: the field names a file or folder (a comma list of them if ``many``), hashed as an absolute path, so
    ``runs/zoo`` and ``/home/me/runs/zoo`` are the same input (what is IN it is checked by digests elsewhere)."""
    meta = {"help": help, "hashed": hashed, "many": many, "path": path}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if minimum is not None:
        meta["minimum"] = minimum
    return field(default=default, metadata=meta)


DEFAULT_DATASET = "fashion-mnist"
FROM_DISTILLED = "default: the distilled folder's own dataset (a different one given here is refused)"


@dataclass
class CommonConfig:
    """Options every stage honours."""

    dataset: str = opt(DEFAULT_DATASET, "a name from `prismdd datasets`")
    data_root: str | None = opt(None, "folder with the dataset files; default: Debian's /usr/share/datasets/<name>",
                                path=True)
    download: bool = opt(False, "allow torchvision to download data (needs internet)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N", hashed=False)
    seed: int = opt(0, "every random choice derives from this (and is recorded)")
    out: str = opt("runs/out", "output folder", hashed=False)
    num_workers: int = opt(0, "DataLoader workers for file-backed datasets (in-memory sets need none); also the "
                              "processes that run --rand-augment (same result for any number)", minimum=0,
                           hashed=False)
    resolution: int | None = opt(None, "image side in pixels; None: the dataset's own (imagefolder: the most common "
                                       "shorter side of its images)", minimum=1)
    channels: int | None = opt(None, "1 (grey) or 3 (RGB); None: the dataset's own (imagefolder: 1 if every image is "
                                     "greyscale)", choices=(1, 3))
    eval_crop: str = opt("auto", "preprocessing of the test split and of recovery's real starts: none (shorter side "
                                 "to --resolution, centre crop) | imagenet (Resize 256 + CenterCrop 224: shorter side "
                                 "to resolution*256/224, centre crop) | auto (imagenet at 224 px and above)",
                         choices=("auto", "none", "imagenet"))
    subset: str | None = opt(None, ".npy/.txt file of training-set indices to use instead of the whole train split",
                             path=True)
    threads: int | None = opt(None, "torch CPU threads; None: OMP_NUM_THREADS if set, else the cores this process "
                                    "may use (taskset), divided among torchrun's processes on this machine (from "
                                    "Python: torch's own setting); two jobs side by side on a 2-core machine: "
                                    "--threads 1 each (README)", minimum=1, hashed=False)
    force: bool = opt(False, "redo finished work in --out instead of reusing it", hashed=False)


def comma_list(text: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``: the form of every list-valued option (archs, methods, seeds)."""
    return [t.strip() for t in str(text or "").split(",") if t.strip()]


def config_fields(cls_or_obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls_or_obj)}


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def field_default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def hashed_fields(cls_or_obj) -> list[str]:
    """The fields that shape a stage's results: what the config hash covers."""
    return [f.name for f in dataclasses.fields(cls_or_obj) if f.metadata.get("hashed", True)]


def config_hash(cfg, **changes) -> str:
    """Hash of the fields that shape results (``changes`` replace values first, e.g. one arch of a zoo).

    The one definition of "made with the same settings": every resume guard and the main job's stage
    folders compare it. Every hashed field counts at every value, except the fields of an option group that is
    not active in ``cfg`` (``OPTION_GROUPS``, ``methods.base.Options.active``).
    """
    d = config_to_dict(cfg)
    d.update({k: _plain(v) for k, v in changes.items()})
    # an option group that takes no part in this run (another method's own, a prior switched off) shapes nothing
    idle = {f.name for g in getattr(cfg, "OPTION_GROUPS", ()) if not g.active(cfg) for f in dataclasses.fields(g)}
    d = {k: d[k] for k in hashed_fields(cfg) if k not in idle}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("path") and f.name in d and d[f.name] not in (None, "") and f.name not in changes:
            d[f.name] = ",".join(os.path.abspath(p) for p in (comma_list(d[f.name]) if f.metadata["many"]
                                                              else [d[f.name]]))
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    if path.is_dir():
        raise PrismError(f"--config {path}: is a directory; pass a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise PrismError(f"--config {path}: not UTF-8 text; save the file as UTF-8") from None
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


def preset_name(cls, layers) -> str | None:
    """The preset a config of ``cls`` asks for: the last layer's value of its PRESET_FIELD, else the default."""
    key = getattr(cls, "PRESET_FIELD", None)
    if key is None:
        return None
    fields = config_fields(cls)
    value = field_default(fields[key])
    for layer in layers:
        for k, v in (layer or {}).items():
            if k.replace("-", "_") == key and v is not None:
                value = v
    hint = typing.get_type_hints(cls)[key]
    value = _coerce(cls, key, value, hint)
    if hint is bool:  # a switch such as --quick: the preset is named after the field
        return key if value else None
    return value


def preset_defaults(cls, *layers: Mapping[str, Any] | None) -> tuple[str | None, dict]:
    """(preset name, {field: default}) with the preset the layers pick applied: what ``--help`` shows."""
    name = preset_name(cls, layers)
    values = {f.name: field_default(f) for f in dataclasses.fields(cls)}
    if name is not None:
        values.update(_preset_fields(cls, name))
    return name, values


def _preset_fields(cls, name: str) -> dict:
    """A preset's fields; a class with ``PRESET_PARTIAL`` (relabel's ``--protocol``) takes only the fields it has."""
    settings = preset_settings(cls.PRESET_FAMILY, name)[1]
    if getattr(cls, "PRESET_PARTIAL", False):
        valid = config_fields(cls)
        settings = {k: v for k, v in settings.items() if k.replace("-", "_") in valid}
    return settings


def build_config(cls, *layers: Mapping[str, Any] | None, source: str = "config"):
    """Create ``cls`` from layered mappings (later layers win) on top of its preset (if it has presets).

    Every value is converted to the field's type and checked against the field's ``choices``/``minimum``;
    then the class's own ``check()`` runs for rules that involve several fields.
    """
    hints = typing.get_type_hints(cls)
    valid = config_fields(cls)
    name = preset_name(cls, layers)
    if name is not None:
        layers = (_preset_fields(cls, name),) + tuple(layers)
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
    for k, v in values.items():
        _check_field(valid[k], v)
    cfg = cls(**values)
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


def _check_field(f: dataclasses.Field, value: Any) -> None:
    flag = "--" + f.name.replace("_", "-")
    choices = f.metadata.get("choices")
    if choices is not None and value is not None:
        items = comma_list(value) if f.metadata.get("many") else [value]
        bad = [v for v in items if v not in choices]
        if bad or not items:
            named = f" ({', '.join(map(str, bad))} unknown)" if bad and len(items) > 1 else ""
            raise PrismError(f"{flag} {value!r}{named}: expected {'a comma list of ' if f.metadata.get('many') else 'one of '}"
                             f"{', '.join(map(str, choices))}")
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        # NaN passes every comparison with a bound (nan < 0 is False), and inf passes a lower one: a float option
        # is refused here, once for every config class, rather than becoming black images or a 'lr: .nan' record
        if isinstance(v, float) and not math.isfinite(v):
            raise PrismError(f"{flag} {v}: must be a finite number")
    low = f.metadata.get("minimum")
    if low is not None and value is not None:
        for v in values:
            if v < low:
                raise PrismError(f"{flag} {v}: must be >= {low}")


def assemble_config(name: str, base: type, groups: Iterable[type], module: str) -> type:
    """The dataclass ``name``: ``base``'s fields, then those of every dataclass in ``groups`` (declared elsewhere,
    e.g. beside a method's code) under their own flat names, with their metadata as declared, so help, checks and
    the config hash treat them as fields of ``base``. ``groups`` is kept as ``OPTION_GROUPS``."""
    groups = tuple(groups)
    taken = set(config_fields(base))
    extra = []
    for g in groups:
        hints = typing.get_type_hints(g)
        for f in dataclasses.fields(g):
            if f.name in taken:
                raise ValueError(f"{g.__name__}.{f.name}: already a field of {name}")
            taken.add(f.name)
            extra.append((f.name, hints[f.name], field(default=f.default, default_factory=f.default_factory,
                                                       metadata=f.metadata)))
    cls = dataclasses.make_dataclass(name, extra, bases=(base,), namespace={"OPTION_GROUPS": groups})
    cls.__module__ = module  # pickles and reprs as a class of the module that assembles it
    return cls


def replace(cfg, **changes):
    return build_config(type(cfg), config_to_dict(cfg), changes)


__all__ = ["CommonConfig", "assemble_config", "build_config", "config_hash", "config_to_dict", "comma_list", "opt",
           "save_config", "load_yaml", "parse_sets", "replace", "field", "dataclass"]
