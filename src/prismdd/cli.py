"""The ``prismdd`` command: a thin layer over the Python API.

Every stage's flags are generated from its dataclass config (names, defaults and help text come from the
fields' own metadata), so ``--config FILE.yaml`` and ``--set key=value`` reach exactly the same fields as
the flags, and a field cannot exist without its help.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from .audit import AuditConfig, audit
from .core.config import build_config, field_default, field_help, load_yaml, parse_sets
from .core.data import check_data, list_datasets
from .core.errors import PrismError
from .core.models import list_models
from .core.presets import list_presets
from .core.text import format_table
from .pipeline import RunConfig, run
from .stages.metrics import MetricsConfig, metrics
from .stages.recover import RecoverConfig, recover
from .stages.relabel import RelabelConfig, relabel
from .stages.squeeze import SqueezeConfig, squeeze
from .stages.validate import ValidateConfig, validate

# command -> (config class, function, one-line help)
STAGES: dict[str, tuple[type, typing.Callable, str]] = {
    "squeeze": (SqueezeConfig, squeeze, "train teacher networks (a zoo: --arch a,b,c)"),
    "recover": (RecoverConfig, recover, "synthesise images through frozen teachers (PRISM and baselines)"),
    "relabel": (RelabelConfig, relabel, "store teacher soft labels on replayable augmented views"),
    "validate": (ValidateConfig, validate, "train a fresh student on distilled data, test on real data"),
    "run": (RunConfig, run, "the whole job: teachers, every method, students, metrics, report"),
    "metrics": (MetricsConfig, metrics, "diversity metrics of distilled sets (observer network)"),
    "audit": (AuditConfig, audit, "membership-inference audit of the privacy claim"),
}


def _add_config_flags(p: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    g = p.add_argument_group("options (any of them also as --set key=value or in --config FILE.yaml)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        h = f"{field_help(f)} [default: {field_default(f)}]".strip().replace("%", "%%")
        if hints[f.name] is bool:
            g.add_argument(flag, dest=f.name, action="store_const", const=True, default=None, help=h)
        else:
            g.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=h)
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of key: value settings")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any option (repeatable), e.g. --set iterations=500")


def config_from_args(name: str, args: argparse.Namespace):
    """Defaults < preset (picked by the layers below) < --config < flags < --set."""
    cls = STAGES[name][0]
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    file_layer = load_yaml(args.config) if args.config else {}
    return build_config(cls, file_layer, flags, parse_sets(args.sets))


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
    for name, (cls, _, help_) in STAGES.items():
        _add_config_flags(sub.add_parser(name, help=help_, description=help_), cls)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        if args.command == "datasets":
            rows = [dict(r, available=r["available"] or f"no ({r['how_to_get']})") for r in list_datasets(args.data_root)]
            print(format_table(rows, ["name", "available", "description"]))
        elif args.command == "models":
            print(format_table(list_models(), ["name", "family", "batchnorm", "pretrained", "description"]))
        elif args.command == "methods":
            print(format_table(list_presets("recover"), ["name", "description", "settings"]))
        elif args.command == "check-data":
            res = check_data(args.dataset, args.data_root, args.resolution)
            print(f"{res['dataset']}: {res['train']} train, {res['test']} test, {res['classes']} classes, "
                  f"{len(res['bad_files'])} unreadable files")
            for b in res["bad_files"]:
                print("  " + b)
            return 1 if res["bad_files"] else 0
        else:
            cls, fn, _ = STAGES[args.command]
            fn(config_from_args(args.command, args))
    except PrismError as e:
        print(f"prismdd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nprismdd: interrupted; finished work is kept, re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
