"""The ``prismdd`` command: a thin layer over the Python API.

Every stage's flags are generated from its dataclass config (names, defaults and help text come from the
fields' own metadata), so ``--config FILE.yaml`` and ``--set key=value`` reach exactly the same fields as
the flags, and a field cannot exist without its help.

Start-up is kept short: a stage's module (and with it torch) is imported only when that stage's command
runs, so ``prismdd --help`` and ``prismdd methods`` answer without loading torch (BENCHMARKS.md section 11).
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import os
import signal
import sys
import typing

from safetensors import SafetensorError

from .core.config import build_config, config_fields, field_default, field_help, load_yaml, parse_sets, preset_defaults
from .core.errors import PrismError
from .core.log import configure, level_of
from .core.presets import list_presets
from .core.text import format_table
from .core.zoo import list_models

TABLE_WIDTH = 100  # `methods` and `models` fit a standard terminal; --wide shows everything

# command -> (module, config class, function, one-line help); the module is imported when the command runs
STAGES: dict[str, tuple[str, str, str, str]] = {
    "squeeze": ("prismdd.stages.squeeze", "SqueezeConfig", "squeeze", "train teacher networks (a zoo: --arch a,b,c)"),
    "score": ("prismdd.stages.score", "ScoreConfig", "score",
              "per-example scores of the training split (embeddings, entropies, training dynamics) for coreset selection"),
    "recover": ("prismdd.stages.recover", "RecoverConfig", "recover",
                "synthesise images through frozen teachers (PRISM and baselines)"),
    "relabel": ("prismdd.stages.relabel", "RelabelConfig", "relabel",
                "store teacher soft labels on replayable augmented views"),
    "validate": ("prismdd.stages.validate", "ValidateConfig", "validate",
                 "train a fresh student on distilled data, test on real data"),
    "run": ("prismdd.pipeline", "RunConfig", "run", "the whole job: teachers, every method, students, metrics, report"),
    "metrics": ("prismdd.stages.metrics", "MetricsConfig", "metrics",
                "diversity metrics of distilled sets (observer network)"),
    "audit": ("prismdd.audit", "AuditConfig", "audit", "membership-inference audit of the privacy claim"),
    "export": ("prismdd.export", "ExportConfig", "export",
               "write a distilled set for another evaluator: --format ddranking (DD-Ranking 0.2.0's LRS/ARS)"),
}


def stage(name: str) -> tuple[type, typing.Callable]:
    """The config class and function of a stage command, importing its module now."""
    module, cls, fn, _ = STAGES[name]
    mod = importlib.import_module(module)
    return getattr(mod, cls), getattr(mod, fn)


def _lazy(module: str, name: str):
    """A function of a module that needs torch, imported when a listing command calls it."""
    return getattr(importlib.import_module(module), name)


def _add_config_flags(p: argparse.ArgumentParser, cls, chosen: dict | None = None) -> None:
    """One flag per config field; ``--help`` shows the defaults in effect for the preset ``chosen`` picks
    (e.g. ``prismdd recover --method sre2l --help`` shows SRe2L's budget and init, not the base defaults).
    A class with ``help_groups`` (recover) lists its fields in sections, the engine's and one per method; a
    section it marks as not shown keeps its flags (they still parse) out of the listing."""
    hints = typing.get_type_hints(cls)
    preset, defaults = preset_defaults(cls, chosen or {})
    where = ("any of them also as --set key=value or in --config FILE.yaml"
             + (f"; defaults shown are those of the preset {preset!r}" if preset else ""))
    fields = config_fields(cls)
    if hasattr(cls, "help_groups"):
        sections = cls.help_groups(defaults, bool(chosen))
        hidden = [title for title, _, _, shown in sections if not shown]
        sections[0] = (sections[0][0], f"{sections[0][1]} ({where})", *sections[0][2:])
        if hidden:
            p.epilog = (f"The options of {', '.join(hidden)} act on other methods and are left out here "
                        f"(`prismdd {p.prog.split()[-1]} --help` lists them).")
    else:
        sections = [(f"options ({where})", None, list(fields), True)]
    for title, description, names, shown in sections:
        g = p.add_argument_group(title, description) if shown else p
        for name in names:
            _add_flag(g, fields[name], hints[name], defaults[name], preset, shown)
    if getattr(cls, "POSITIONAL", None):  # e.g. `prismdd export DIR`: the field also as the first bare argument
        p.add_argument("positional", nargs="?", default=None, metavar=cls.POSITIONAL.upper(),
                       help=f"the same as --{cls.POSITIONAL.replace('_', '-')}")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of key: value settings")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any option (repeatable), e.g. --set iterations=500")


def _add_flag(g, f: dataclasses.Field, hint, default, preset: str | None, shown: bool) -> None:
    flag = "--" + f.name.replace("_", "-")
    mark = " from the preset" if preset and default != field_default(f) else ""
    # one default per option: a help that says what an unset (None) option means gets no "[default: None]"
    said = default is None and "default" in field_help(f).lower()
    h = (field_help(f) if said else f"{field_help(f)} [default{mark}: {default}]").strip().replace("%", "%%")
    h = h if shown else argparse.SUPPRESS
    # --x switches a field on, --no-x off; unset leaves the default/preset value (or None: decided at run time)
    if hint is bool or set(typing.get_args(hint)) == {bool, type(None)}:
        g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=h)
    else:
        g.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=h)


def config_from_args(name: str, args: argparse.Namespace):
    """Defaults < preset (picked by the layers below) < --config < flags < --set."""
    cls = stage(name)[0]
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    if getattr(args, "positional", None) is not None:
        flags.setdefault(cls.POSITIONAL, args.positional)
    file_layer = load_yaml(args.config) if args.config else {}
    return build_config(cls, file_layer, flags, parse_sets(args.sets))


def _chosen_preset(argv: list[str] | None, command: str) -> dict:
    """The preset selector (``--method X``, ``--protocol X``, ``--quick``) in ``argv`` when ``command`` is run."""
    argv = list(argv or [])
    if command not in argv:
        return {}
    cls = stage(command)[0]
    key = getattr(cls, "PRESET_FIELD", None)
    if key is None:
        return {}
    flag = "--" + key.replace("_", "-")
    found = {}
    for i, a in enumerate(argv):
        if a == flag:
            found[key] = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else True
        elif a.startswith(flag + "="):
            found[key] = a.split("=", 1)[1]
        elif a == "--no-" + key.replace("_", "-"):
            found[key] = False
        elif a == "--set" and i + 1 < len(argv) and argv[i + 1].replace("-", "_").startswith(key + "="):
            found[key] = argv[i + 1].split("=", 1)[1]
    return found


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    """--quiet / --verbose, the same on every command: how much of prismdd's messages reach the terminal (the
    command's own product, a table or a listing, is printed whatever they say)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quiet", "-q", action="store_true", help="warnings and errors only (no progress messages)")
    g.add_argument("--verbose", "-v", action="store_true", help="debug messages too")


def invoked(argv: list[str] | None) -> str | None:
    """The command ``argv`` runs (its first word that is one), or None."""
    return next((a for a in argv or [] if not a.startswith("-") and a in STAGES), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``argv``, only the command it runs gets its flags (the others need no import)."""
    p = argparse.ArgumentParser(
        prog="prismdd",
        description="Dataset distillation with PRISM (PRIors from diverse Source Models) and the SRe2L family: "
                    "squeeze -> recover -> relabel -> validate, or `prismdd run` for all of it.",
        epilog="Start with: prismdd run --dataset digits --quick --out runs/demo   (8 min on 2 shared CPU cores with "
               "--threads 1 beside a second job: README; two jobs on one machine: --threads 1 each)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("datasets", help="list datasets and whether each is available here")
    d.add_argument("--data-root", default=None)
    m = sub.add_parser("models", help="list architectures")
    m.add_argument("--wide", action="store_true", help="full descriptions, however long the lines")
    m = sub.add_parser("methods", help="list method presets (recover) with their paper and code; NAME for one preset")
    m.add_argument("name", nargs="?", default=None, help="a preset name: show its description, source and settings")
    m.add_argument("--wide", action="store_true", help="every preset's settings in the table, however long the lines")
    m.add_argument("--protocols", action="store_true", help="the student-training presets (validate --protocol) instead")
    c = sub.add_parser("check-data", help="decode every file of a dataset and list unreadable ones")
    c.add_argument("--dataset", default="fashion-mnist")
    c.add_argument("--data-root", default=None)
    c.add_argument("--resolution", type=int, default=None, help="default: the dataset's own (imagefolder: inferred)")
    c.add_argument("--channels", type=int, default=None, choices=(1, 3), help="default: the dataset's own")
    running = invoked(argv) if argv is not None else None
    for listing in (d, sub.choices["models"], m, c):
        _add_output_flags(listing)
    for name, (*_, help_) in STAGES.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        _add_output_flags(sp)
        if argv is not None and name != running:
            continue
        cls = stage(name)[0]
        try:
            chosen = _chosen_preset(argv, name)
            preset_defaults(cls, chosen)
        except PrismError:  # an unknown preset name: the stage itself reports it with the valid names
            chosen = {}
        _add_config_flags(sp, cls, chosen)
    return p


def fit_table(rows: list[dict], cols: list[str], width: int = TABLE_WIDTH) -> str:
    """``format_table`` with the last column cut (with an ellipsis) so every line fits ``width`` characters."""
    fixed = sum(max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in cols[:-1]) + 3 * (len(cols) - 1)
    room = max(10, width - fixed)
    last = cols[-1]
    cut = [dict(r, **{last: (lambda v: v if len(v) <= room else v[: room - 1] + "\u2026")(str(r.get(last, "")))})
           for r in rows]
    return format_table(cut, cols)


_ERRNO_FIX = {
    errno.ENOSPC: "the disk is full: free space or pass another --out, then re-run the same command to resume",
    errno.EFBIG: "the file grew past a size limit (ulimit -f): raise it or pass another --out, then re-run",
    errno.EDQUOT: "the disk quota is used up: free space or pass another --out, then re-run",
    errno.EACCES: "permission denied: pass a folder you may write (e.g. --out under your home) or fix its permissions",
    errno.EPERM: "operation not permitted: pass a folder you may write or fix its permissions",
    errno.EROFS: "read-only file system: pass an --out on a writable disk",
    errno.ENOTDIR: "a file stands where a folder is expected: pass a folder path",
    errno.EISDIR: "a folder stands where a file is expected: pass a file path",
    errno.EEXIST: "a file of that name exists where a folder is expected: pass a folder path",
    errno.ENOENT: "no such file or folder: check the path",
}


def environment_error(e: BaseException) -> str:
    """One line for an error of the machine rather than of prismdd (permissions, a full disk, a file where a
    folder belongs, a file that is not UTF-8): the path it concerns and what to do."""
    if isinstance(e, UnicodeDecodeError):
        return (f"a file is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 "
                f"(a YAML --config, a card.json or a class list)")
    if isinstance(e, OSError):
        path = e.filename if e.filename is not None else "?"
        if e.filename2 is not None:
            path = f"{path} -> {e.filename2}"
        fix = _ERRNO_FIX.get(e.errno, "check the path and the disk")
        return f"{path}: {e.strerror or e} ({fix})"
    return f"{str(e).splitlines()[0]}: a safetensors file could not be read or written (disk full or damaged file)"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, `kill`, a container stop) unwinds like Ctrl-C: locks released, temporary
    files removed, finished work kept."""


def _terminate(signum, frame):
    raise Terminated()


# OpenMP threads that wait by sleeping instead of spinning: torch's libgomp reads this once, when torch is first
# imported (here, only when a stage runs). With spinning waiters two jobs of 2 threads on 2 cores ran 4-5x slower
# than with one thread each; passive waiters removed that (BENCHMARKS.md section 14). A value the user set wins.
WAIT_POLICY = "PASSIVE"


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line, not the API: a Python caller keeps its own SIGTERM handling
        signal.signal(signal.SIGTERM, _terminate)
    if "torch" not in sys.modules:  # too late once torch is loaded (a Python caller's own torch settings stand)
        os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    parser = build_parser(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    configure(level_of(args.quiet, args.verbose))  # a library caller configures logging itself
    try:
        if args.command == "datasets":
            rows = [dict(r, available=r["available"] or f"no ({r['how_to_get']})")
                    for r in _lazy("prismdd.core.data", "list_datasets")(args.data_root)]
            print(format_table(rows, ["name", "available", "description"]))
        elif args.command == "models":
            cols = ["name", "family", "batchnorm", "pretrained", "description"]
            models = list_models()
            print(format_table(models, cols) if args.wide else fit_table(models, cols))
        elif args.command == "methods":
            rows = list_presets("validate" if args.protocols else "recover")
            if args.name:
                row = next((r for r in rows if r["name"] == args.name.lower()), None)
                if row is None:
                    raise PrismError(f"methods {args.name!r}: unknown; valid: {', '.join(r['name'] for r in rows)}")
                print("\n".join(f"{k}: {row['code_full' if k == 'code' else k]}"
                                for k in ("name", "images", "description", "paper", "code", "source", "starts_from",
                                          "settings")
                                if row[k]))
            elif args.wide:
                print(format_table(rows, ["name", *(["images"] * (not args.protocols)), "paper", "code_full",
                                          "description", "source", "settings"]))
            else:  # images: synthetic, or selected (real training images picked by a rule)
                print(fit_table(rows, ["name", *(["images"] * (not args.protocols)), "paper", "code"]))
                print(f"`prismdd methods{' --protocols' if args.protocols else ''} NAME` shows one preset's description, "
                      f"source and settings; --wide shows them all")
        elif args.command == "check-data":
            res = _lazy("prismdd.core.data", "check_data")(args.dataset, args.data_root, args.resolution,
                                                          args.channels)
            print(f"{res['dataset']}: {res['train']} train, {res['test']} test, {res['classes']} classes, "
                  f"{res['resolution']} px x {res['channels']} channels, {len(res['bad_files'])} unreadable files")
            if res.get("modes"):
                print("  image modes: " + ", ".join(f"{m} x {n}" for m, n in sorted(res["modes"].items())))
            for n in res["notes"]:
                print("  note: " + n)
            for b in res["bad_files"]:
                print("  " + b)
            return 1 if res["bad_files"] else 0
        else:
            cfg = config_from_args(args.command, args)
            # before any work (the main job's data loading and checks too); unset: this process's share of the cores
            # counted among the machine's prismdd jobs while it runs: without --threads, its share of the cores
            given = getattr(cfg, "threads", None)
            with _lazy("prismdd.core.runtime", "shared_cores")(auto=not given):
                threads = given or _lazy("prismdd.core.runtime", "default_threads")()
                with _lazy("prismdd.core.runtime", "torch_threads")(threads):
                    stage(args.command)[1](cfg)
    except PrismError as e:
        print(f"prismdd: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `prismdd methods | head`: the reader left; nothing went wrong here
        sys.stderr.close()
        return 0
    except (OSError, UnicodeDecodeError, SafetensorError) as e:  # the environment, not a bug: one line, no traceback
        print(f"prismdd: error: {environment_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"\nprismdd: {what}; finished work is kept, re-run the same command to resume", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
