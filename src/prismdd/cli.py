"""The ``prismdd`` command: a thin layer over the Python API.

Every stage's flags are generated from its dataclass config (one source of truth for names, defaults
and help), so ``--config FILE.yaml`` and ``--set key=value`` reach exactly the same fields as the flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
import typing

from .config import build_config, load_yaml, parse_sets
from .registry import UnknownNameError
from .utils import PrismError

# stage name -> (module, config class, function, one-line help)
STAGES: dict[str, tuple[str, str, str, str]] = {
    "squeeze": ("squeeze", "SqueezeConfig", "squeeze", "train teacher networks (a zoo: --arch a,b,c)"),
    "recover": ("recover", "RecoverConfig", "recover", "synthesise images through frozen teachers (PRISM and baselines)"),
    "relabel": ("relabel", "RelabelConfig", "relabel", "store teacher soft labels on replayable augmented views"),
    "validate": ("validate", "ValidateConfig", "validate", "train a fresh student on distilled data, test on real data"),
    "run": ("pipeline", "RunConfig", "run", "the whole job: teachers, every method, students, metrics, report"),
    "metrics": ("metrics", "MetricsConfig", "metrics", "diversity metrics of distilled sets (observer network)"),
    "audit": ("audit", "AuditConfig", "audit", "membership-inference audit of the privacy claim"),
}


def _field_help(cls) -> dict[str, str]:
    """Trailing ``# comment`` of each dataclass field, walking base classes: the flag's help text."""
    out = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+):[^\n=]*=[^\n#]*#\s*(.+)$", src, re.M):
            out[m.group(1)] = m.group(2).strip()
    return out


def _add_config_flags(p: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    helps = _field_help(cls)
    g = p.add_argument_group("options (any of them also as --set key=value or in --config FILE.yaml)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        h = f"{helps.get(f.name, '')} [default: {default}]".strip().replace("%", "%%")
        if hints[f.name] is bool:
            g.add_argument(flag, dest=f.name, action="store_const", const=True, default=None, help=h)
        else:
            g.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=h)
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of key: value settings")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any option (repeatable), e.g. --set iterations=500")


def _load_stage(name: str):
    mod_name, cls_name, fn_name, _ = STAGES[name]
    mod = importlib.import_module(f".{mod_name}", __package__)
    return getattr(mod, cls_name), getattr(mod, fn_name), mod


def config_from_args(name: str, args: argparse.Namespace):
    cls, _, mod = _load_stage(name)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    sets = parse_sets(args.sets)
    file_layer = load_yaml(args.config) if args.config else {}
    layers = [file_layer, flags, sets]
    # a method preset sits between the defaults and everything the user wrote
    preset = getattr(mod, "preset_layer", None)
    if preset is not None:
        key = getattr(mod, "PRESET_KEY", "method")
        name = next((l[key] for l in reversed(layers) if key in l and l[key] is not None), None)
        layers.insert(0, preset(name))
    return build_config(cls, *layers)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prismdd",
        description="Dataset distillation with PRISM (PRIors from diverse Source Models) and the SRe2L family: "
                    "squeeze -> recover -> relabel -> validate, or `prismdd run` for all of it.",
        epilog="Start with: prismdd run --dataset digits --quick --out runs/demo   (a minute on a laptop CPU)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("datasets", help="list datasets and whether each is available here")
    d.add_argument("--data-root", default=None)
    sub.add_parser("models", help="list architectures")
    sub.add_parser("methods", help="list method presets (recover) with their settings")
    c = sub.add_parser("check-data", help="decode every file of a dataset and list unreadable ones")
    c.add_argument("--dataset", default="fashion-mnist")
    c.add_argument("--data-root", default=None)
    c.add_argument("--resolution", type=int, default=None)
    for name, (_, _, _, help_) in STAGES.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        try:
            cls, _, _ = _load_stage(name)
        except ImportError:  # a stage under construction must not break the others
            continue
        _add_config_flags(sp, cls)
    return p


def _table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = [" | ".join(c.ljust(widths[c]) for c in cols), "-+-".join("-" * widths[c] for c in cols)]
    lines += [" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        if args.command == "datasets":
            from .data import list_datasets

            rows = [dict(r, available=r["available"] or f"no ({r['how_to_get']})") for r in list_datasets(args.data_root)]
            print(_table(rows, ["name", "available", "description"]))
        elif args.command == "models":
            from .models import list_models

            print(_table(list_models(), ["name", "family", "batchnorm", "pretrained", "description"]))
        elif args.command == "methods":
            from .methods import list_methods

            print(_table(list_methods(), ["name", "description", "settings"]))
        elif args.command == "check-data":
            from .data import check_data

            res = check_data(args.dataset, args.data_root, args.resolution)
            print(f"{res['dataset']}: {res['train']} train, {res['test']} test, {res['classes']} classes, "
                  f"{len(res['bad_files'])} unreadable files")
            for b in res["bad_files"]:
                print("  " + b)
            return 1 if res["bad_files"] else 0
        else:
            cfg = config_from_args(args.command, args)
            _, fn, _ = _load_stage(args.command)
            fn(cfg)
    except (PrismError, UnknownNameError) as e:
        print(f"prismdd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prismdd: interrupted; finished work is kept, re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
