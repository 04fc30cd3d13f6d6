"""FIDELITY.md's prismdd-side citations resolve, so a refactor cannot leave the document pointing at code that moved.

How FIDELITY.md cites prismdd, in backticks: a file (relative to ``src/prismdd/`` or to the repository:
`methods/edc.py`, `tests/methods/test_gvbsm.py`; or a bare name such as `recover.py` naming a file of the package),
optionally with line ranges (`edc.py:12-34`; `:40` continues the file cited before it; `:1-3, 7` lists several),
and the names it points at, after or before it (`EDC.pick_teachers`, `layer_term`, `sample_views(per="batch")`).
Tests are named `test_x`, `test_x[param]` or `tests/a.py::test_x`, often after a section's letter for its test file
("Tests: `tests/stages/test_fidelity.py` (F)", "T = `tests/methods/test_dwa_edc.py`"). Checked, for each citation:

- the file exists (a bare name: a package file of that name; several may share it, e.g. the presets' YAML files);
- every cited line range lies inside the file;
- every cited name is defined in the file it belongs to: ``def``/``class`` (at any depth), a module- or class-level
  assignment (``NAME =``, a dataclass field ``name: ...``) or a YAML key. A bare name belongs to the nearest file
  cited before it in the same table cell; one cited before any file of its cell must be defined somewhere in the
  package. ``Class.member`` and ``module.name`` locate themselves (the package's class or module). A stage config
  field (a CLI option, declared in a ``*Config`` class or in a method's ``*Options`` group) and a word the package uses as a string (an option value such as `half_cosine`, a record key
  such as `rded_patches`) are values, accepted wherever they are cited;
- every cited test is defined: in the test file named by ``path::`` or by the section's letter, else under tests/.

Only prismdd's side is read: in tables, the columns whose header says ``prismdd`` or ``test`` (the reference columns
cite the reference repositories, which are not here); in prose, paths whose first component is one of prismdd's own
folders or modules, the names written right after them, and test names. What counts as a name: a backticked
identifier that looks like code (an underscore, a dot, a capital or a call: `layer_term`, `EDC`, `fit(ema_decay=)`),
or a plain word written right after a file or line citation (`rded.py:97-115` `slots`, `stitch`); other plain words
are values (`auto`, `convnet`). Other libraries' names are written with their module or class (`torch.randperm`,
`TF.resized_crop`, `RandomResizedCrop.get_params`): a dotted name whose first part is not the package's is skipped.
Line ranges must lie inside their file, not inside the named definition: the names are the stable pointer
(FIDELITY.md says so), the numbers a convenience that this check keeps from pointing past the end of a file.
"""
from __future__ import annotations

import ast
import functools
import keyword
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "prismdd"
TESTS = ROOT / "tests"
DOC = ROOT / "FIDELITY.md"

TICKED = re.compile(r"`([^`]+)`")
RANGES = r"\d+(?:-\d+)?(?:, ?\d+(?:-\d+)?)*"
FILE = re.compile(r"^(?P<path>[\w./{},*<>-]+\.(?:py|yaml|yml|sh|md|json|toml))"
                  rf"(?:::(?P<test>\w+)(?:\[[^\]]*\])?)?(?::(?P<lines>{RANGES}))?$")
CONTINUED = re.compile(rf"^:(?P<lines>{RANGES})$")
# a name, Class.name, or a name written with its arguments or parameter: sample_views(per="batch"), test_x[edc]
NAME = re.compile(r"^(?P<name>(?:\.\.\.)?[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)(?:\[[^\]]*\])?(?:\(.*\))?$")
NOT_NAMES = {"True", "False", "None"}
# a dotted token ending in one of these is a file name (`gvbsm_stats.safetensors`), not Class.attr
FILE_SUFFIXES = {"safetensors", "json", "jsonl", "npz", "png", "jpg", "pt", "pth", "py", "yaml", "txt", "html", "npy",
                 "md", "sh"}
CHAIN_GAP = re.compile(r"[\s,;()/]*")  # what may separate a citation from the names that belong to it
# prose cites prismdd through paths that start with one of these (other paths in prose are the references')
PROSE_TOPS = {p.name for p in PKG.iterdir() if not p.name.startswith("_")} | {"tests", "configs", "benchmarks"}
LETTER_DEFS = (re.compile(r"`(tests/[\w/]+\.py)` \((\w+)\)"), re.compile(r"\b([A-Z]{1,2})\s*=\s*`(tests/[\w/]+\.py)`"))


@dataclass
class Citation:
    where: str  # "FIDELITY.md:<line> (<column>)", for the failure message
    path: str | None  # None: names cited in a cell that cites no file
    lines: list[tuple[int, int]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    tests: list[tuple[str, str | None]] = field(default_factory=list)  # (test name, its test file if cited)
    orphan_lines: list[str] = field(default_factory=list)  # `:12` with no file cited before it in the cell


def _ranges(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        a, _, b = part.strip().partition("-")
        out.append((int(a), int(b or a)))
    return out


def _name(token: str) -> str | None:
    m = NAME.match(token)
    if not m or m["name"] in NOT_NAMES or keyword.iskeyword(m["name"]):
        return None
    name = m["name"]
    if "." in name and name.rsplit(".", 1)[1] in FILE_SUFFIXES:
        return None
    return name


def _code_like(token: str, name: str) -> bool:
    return "_" in name.lstrip(".") or "." in name or "(" in token or name != name.lower()


def _is_test(name: str) -> bool:
    return name.startswith(("test_", "..."))


def _split_row(line: str) -> list[str]:
    """The cells of a table row; a ``|`` inside backticks does not split."""
    cells, cur, ticked = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            ticked = not ticked
        if ch == "|" and not ticked:
            cells.append(cur)
            cur = ""
        else:
            cur += ch
    return [c.strip() for c in cells + [cur]]


def _read(text: str, where: str, kind: str, letters: dict[str, str]) -> list[Citation]:
    """The citations of one table cell (``kind`` "code" or "test") or prose line (``kind`` "prose")."""
    prose = kind == "prose"
    files: list[Citation] = []
    loose = Citation(where, None)  # names before the cell's first file or in a cell without one: package-wide
    current: Citation | None = None
    chained, prev_end = False, 0
    test_file: str | None = None
    for m in TICKED.finditer(text):
        token, gap = m.group(1).strip(), text[prev_end: m.start()]
        prev_end = m.end()
        adjacent = chained and CHAIN_GAP.fullmatch(gap) is not None
        chained = False
        if letter := re.search(r"\b([A-Z]{1,2})\s*$", gap):  # "F `test_x`": the section's letter for a test file
            test_file = letters.get(letter[1], test_file)
        f = FILE.match(token)
        if f and prose and f["path"].split("/")[0] not in PROSE_TOPS:
            current = None  # prose citing a reference's file: what follows it is not prismdd's
            continue
        if f:
            current = Citation(where, f["path"], _ranges(f["lines"]) if f["lines"] else [])
            if f["test"]:
                current.tests.append((f["test"], f["path"]))
            if f["path"].split("/")[-1].startswith("test_"):
                test_file = f["path"]
            files.append(current)
            chained = True
        elif c := CONTINUED.match(token):
            if current is None:
                if not prose:
                    loose.orphan_lines.append(token)
                continue
            current.lines += _ranges(c["lines"])
            chained = True
        elif (name := _name(token)) is not None:
            if _is_test(name):
                (current or loose).tests.append((name, test_file))
            elif kind == "test":
                continue  # a test cell's other names are what the test compares with (torch's, the reference's)
            elif adjacent or (not prose and _code_like(token, name)):  # prose: only names right after a file
                (current or loose).names.append(name)
                chained = adjacent
    return files + ([loose] if loose.names or loose.tests or loose.orphan_lines else [])


def citations(doc: Path = DOC) -> list[Citation]:
    """Every prismdd-side citation of ``doc``: table cells under a ``prismdd`` or ``test`` header, and prose."""
    out: list[Citation] = []
    lines = doc.read_text().splitlines()
    top = _letters("\n".join(lines[: next((i for i, s in enumerate(lines) if s.startswith("## ")), len(lines))]))
    letters, header, fenced = dict(top), None, False
    for i, line in enumerate(lines, 1):
        if line.startswith("```"):
            fenced = not fenced
        if fenced or line.startswith("```"):
            continue
        if line.startswith("## "):  # a section's letters: its own, over the document's (F, P)
            end = next((j for j in range(i, len(lines)) if lines[j].startswith("## ")), len(lines))
            letters = {**top, **_letters("\n".join(lines[i - 1: end]))}
        if not line.startswith("|"):
            header = None
            out += _read(line, f"{doc.name}:{i}", "prose", letters)
            continue
        cells = _split_row(line)
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if all(set(c) <= set("-: ") for c in cells):
            continue
        for col, cell in zip(header, cells):
            kind = "test" if col.startswith("test") else "code" if "prismdd" in col else None
            if kind:
                out += _read(cell, f"{doc.name}:{i} ({col})", kind, letters)
    return out


def _letters(text: str) -> dict[str, str]:
    """letter -> test file, from "`tests/x.py` (X)" and "X = `tests/x.py`"."""
    after, before = LETTER_DEFS
    return {**{letter: path for path, letter in after.findall(text)}, **dict(before.findall(text))}


# ----------------------------------------------------------------------------- what the code defines
@functools.lru_cache(maxsize=None)
def named_files() -> dict[str, list[Path]]:
    """file name -> the package's files, test files and top-level documents of that name."""
    out: dict[str, list[Path]] = {}
    for p in [*PKG.rglob("*"), *TESTS.rglob("test_*.py"), *ROOT.glob("*.md")]:
        if p.is_file() and "__pycache__" not in p.parts:
            out.setdefault(p.name, []).append(p)
    return out


def _expand(path: str) -> list[str]:
    m = re.search(r"\{([^}]*)\}", path)
    if not m:
        return [path]
    return [x for alt in m[1].split(",") for x in _expand(path[: m.start()] + alt + path[m.end():])]


def resolve(path: str) -> list[Path]:
    """The files ``path`` may name: under src/prismdd/ or the repository; a bare name, every file so named."""
    found = []
    for p in _expand(path):
        if "/" in p:
            found += [c for c in (PKG / p, ROOT / p) if c.is_file()]
        else:
            found += named_files().get(p, [])
    return found


@functools.lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text())
    except SyntaxError:  # a file that does not parse defines nothing (its own tests fail on it)
        return None


def _targets(stmt) -> list[str]:
    """The names a statement binds at its own level: def/class, ``NAME =``, ``name: type [= ...]``."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return [stmt.target.id]
    if isinstance(stmt, ast.Assign):
        return [t.id for t in stmt.targets if isinstance(t, ast.Name)]
    return []


@functools.lru_cache(maxsize=None)
def definitions(path: Path) -> frozenset[str]:
    """Names ``path`` defines: YAML keys; for Python every def/class at any depth, module- and class-level assignment
    targets (dataclass fields included) and ``Class.member`` for each class's members."""
    if path.suffix in (".yaml", ".yml"):
        return frozenset(re.findall(r"^\s*([A-Za-z_]\w*)\s*:", path.read_text(), re.M))
    tree = _tree(path) if path.suffix == ".py" else None
    if tree is None:
        return frozenset()
    names = {n for stmt in tree.body for n in _targets(stmt)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            members = [m for stmt in node.body for m in _targets(stmt)]
            names.update(members)
            names.update(f"{node.name}.{m}" for m in members)
    return frozenset(names)


@functools.lru_cache(maxsize=None)
def package() -> tuple[frozenset[str], dict[str, list[Path]], dict[str, list[Path]], frozenset[str]]:
    """(every name the package defines, class -> its files, module name -> its files, the words it uses as values:
    the stage config fields (options, cited by name wherever they are used) and identifier-like string constants
    (option values such as `half_cosine`, keys of the records and files it writes such as `rded_patches`))."""
    names, classes, modules, values = set(), {}, {}, set()
    for p in PKG.rglob("*.py"):
        names |= definitions(p)
        modules.setdefault(p.stem, []).append(p)
        if p.name == "__init__.py":  # a package (`artifacts`, `core.data`): its modules define its names
            modules.setdefault(p.parent.name, []).extend(sorted(p.parent.glob("*.py")))
        for node in ast.walk(_tree(p) or ast.Module(body=[], type_ignores=[])):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"[A-Za-z_]\w*",
                                                                                                 node.value):
                values.add(node.value)
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, []).append(p)
                if node.name.endswith(("Config", "Options")):  # a config, or a method's option group (methods/)
                    values.update(n for stmt in node.body if isinstance(stmt, ast.AnnAssign) for n in _targets(stmt))
    return frozenset(names), classes, modules, frozenset(values)


def _defined(name: str, pool: frozenset[str]) -> bool:
    if name.startswith("..."):  # an elided name (`..._reference_accumulators`): the end of one
        return any(n.endswith(name[3:]) for n in pool)
    return name in pool


def _name_problem(name: str, files: list[Path] | None, cited: str | None) -> str | None:
    names, classes, modules, values = package()
    if name in values:
        return None
    if "." in name and not name.startswith("..."):
        owner, member = name.split(".")
        if owner in classes:
            return None if any(name in definitions(p) for p in classes[owner]) else f"`{name}` is not defined"
        if owner in modules and owner != "__init__":
            found = any(member in definitions(p) for p in modules[owner])
            return None if found else f"`{member}` is not defined in module `{owner}`"
        return None  # another library's name (`torch.randperm`, `TF.resized_crop`)
    if files is None:
        return None if _defined(name, names) else f"`{name}` is defined nowhere in src/prismdd"
    defined = frozenset().union(*(definitions(f) for f in files))
    return None if _defined(name, defined) else f"`{name}` is not defined in `{cited}`"


@functools.lru_cache(maxsize=None)
def _all_tests() -> frozenset[str]:
    return frozenset().union(*(definitions(p) for p in TESTS.rglob("test_*.py")))


def problems(cites: list[Citation]) -> list[str]:
    out = []
    for c in cites:
        files = None
        if c.path is not None:
            if any(ch in c.path for ch in "<*"):  # a pattern (`presets/validate/<method>.yaml`), not one file
                continue
            files = resolve(c.path)
            if not files:
                out.append(f"{c.where}: `{c.path}` does not exist (under src/prismdd/ or the repository)")
            else:
                length = max(len(f.read_text().splitlines()) for f in files)
                out += [f"{c.where}: `{c.path}:{a}-{b}` lies outside the file ({length} lines)"
                        for a, b in c.lines if not 1 <= a <= b <= length]
        out += [f"{c.where}: `{t}` continues no file" for t in c.orphan_lines]
        out += [f"{c.where}: {p}" for n in c.names  # a missing file's bare names: the file is reported
                if (files or "." in n or files is None) and (p := _name_problem(n, files, c.path))]
        for t, test_file in c.tests:
            where = resolve(test_file) if test_file else []
            pool = frozenset().union(*(definitions(f) for f in where)) if where else _all_tests()
            if not _defined(t, pool):
                out.append(f"{c.where}: test `{t}` is not defined in `{test_file or 'tests/'}`")
    return out


# ----------------------------------------------------------------------------- the tests
def test_every_prismdd_citation_in_fidelity_md_resolves():
    cites = citations()
    assert sum(c.path is not None for c in cites) > 100  # the parser still finds the document's citations
    found = problems(cites)
    assert not found, "FIDELITY.md cites prismdd code that is not there:\n" + "\n".join(found)


def _problems(tmp_path, text: str) -> list[str]:
    path = tmp_path / "FIDELITY.md"
    path.write_text(text)
    return problems(citations(path))


def test_the_check_finds_stale_citations(tmp_path):
    """The check itself, on a small document: a name that moved to another file, a removed class, ranges past the
    end of a file (also in prose), a missing file, a renamed test (under its section letter and after ``::``) and a
    name cited without a file are each reported once; the same citations made right pass; the reference column,
    values and other libraries' names are not read."""
    n = len((PKG / "methods" / "edc.py").read_text().splitlines())
    past = len((PKG / "methods" / "gvbsm.py").read_text().splitlines()) + 1
    intro = "Tests: `tests/stages/test_fidelity.py` (F).\n\n## A section\n\nT = `tests/methods/test_dwa_edc.py`.\n\n"
    head = "| element | reference | prismdd | test |\n|---|---|---|---|\n"
    good = (intro + head
            + f"| a | `recover.py:386` `not_in_prismdd` | `EDC.pick_teachers` `methods/edc.py:1-{n}`, `:3` "
              "`layer_term`; field `edc_round_robin`; `torch.randperm` (`auto`) | T `test_edc_recover_end_to_end` |\n"
            + "| b | - | `category_target`; `stats.py:1` (`hooked_layers`), `artifacts.save_image` | "
              "`tests/methods/test_gvbsm.py::test_round_robin_counter_carries_across_batches`, "
              "F `test_one_crop_and_one_flip_per_batch` |\n"
            + "\nProse: `methods/stats.py:5` (`smoothed`), the reference's `recover/utils.py:999` (`BNFeatureHook`).\n")
    assert _problems(tmp_path, good) == []
    bad = (intro + head
           + f"| a | - | `methods/gvbsm.py:1-{past}` `hooked_layers`, `_Collect`, `EDC.pick_teacher` | "
             "T `test_one_crop_and_one_flip_per_batch` |\n"
           + "| b | - | `methods/nope.py:3`; `artifacts.save_images` | "
             "`tests/methods/test_gvbsm.py::test_round_robin` |\n"
           + "| c | - | `renamed_helper` | - |\n"
           + "\nProse: `methods/stats.py:5000` (`smoothed`).\n")
    found = _problems(tmp_path, bad)
    for needle in (f"`methods/gvbsm.py:1-{past}` lies outside", "`hooked_layers` is not defined in `methods/gvbsm",
                   "`_Collect` is not defined", "`EDC.pick_teacher` is not defined",
                   "test `test_one_crop_and_one_flip_per_batch` is not defined in `tests/methods/test_dwa_edc.py`",
                   "`methods/nope.py` does not exist", "`save_images` is not defined in module `artifacts`",
                   "test `test_round_robin` is not defined", "`renamed_helper` is defined nowhere",
                   "`methods/stats.py:5000-5000` lies outside"):
        assert sum(needle in p for p in found) == 1, (needle, found)
    assert len(found) == 10, found


@pytest.mark.parametrize("token,name", [('sample_views(per="batch")', "sample_views"),
                                        ("GVBSM.prepare", "GVBSM.prepare"), ("gvbsm_stats.safetensors", None),
                                        ("True", None), ("pack: ipc", None),
                                        ("..._reference_accumulators", "..._reference_accumulators"),
                                        ("test_each_protocol_builds[edc]", "test_each_protocol_builds")])
def test_names_are_read_from_their_backticks(token, name):
    assert _name(token) == name
