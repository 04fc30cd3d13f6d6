"""prismdd: dataset distillation with PRISM and the SRe2L family.

Layout (each layer imports only the ones above it):

- ``core``: errors, file I/O, registries, configs and presets, data (a package: the dataset registry and loaders,
  image decoding, the ImageFolder scan, the decode cache, sampling), models, BN statistics, views, the training loop;
- ``artifacts``: every on-disk format, one module per concern (manifests and provenance, the folder lock, model
  cards and teachers, distilled sets, soft labels); a method's own files live in its module under ``methods``;
- ``stages``: squeeze, recover, relabel, validate, metrics: each a function from a dataclass config to an
  output folder, importing ``core`` and ``artifacts`` only;
- ``pipeline`` (``prismdd run``, the main job), ``audit`` (the privacy audit), ``report``, ``cli``.

::

    import prismdd
    prismdd.squeeze.squeeze(prismdd.SqueezeConfig(dataset="digits", arch="convnet", out="runs/t"))
    prismdd.recover.recover(prismdd.recover_config("prism", dataset="digits", teachers="runs/t", out="runs/p"))
    ds = prismdd.load_distilled("runs/p")
    results = prismdd.run(prismdd.run_config(dataset="digits", quick=True, out="runs/demo"))
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# The public names, imported on first use (PEP 562): `prismdd --help` and the listings must not wait for torch,
# which almost every module below imports (cli.py, BENCHMARKS.md section 11).
_PUBLIC = {
    "audit": "prismdd.audit",
    "find_teachers": "prismdd.artifacts", "load_distilled": "prismdd.artifacts", "load_model": "prismdd.artifacts",
    "load_teacher": "prismdd.artifacts",
    "build_config": "prismdd.core.config",
    "DATASETS": "prismdd.core.data", "list_datasets": "prismdd.core.data", "load_dataset": "prismdd.core.data",
    "ARCHS": "prismdd.core.models", "create_model": "prismdd.core.models", "list_models": "prismdd.core.zoo",
    "METHODS": "prismdd.core.presets", "PROTOCOLS": "prismdd.core.presets", "list_presets": "prismdd.core.presets",
    "RunConfig": "prismdd.pipeline", "run": "prismdd.pipeline", "run_config": "prismdd.pipeline",
    "MetricsConfig": "prismdd.stages.metrics",
    "RecoverConfig": "prismdd.stages.recover", "recover_config": "prismdd.stages.recover",
    "RelabelConfig": "prismdd.stages.relabel",
    "SqueezeConfig": "prismdd.stages.squeeze",
    "ValidateConfig": "prismdd.stages.validate", "validate_config": "prismdd.stages.validate",
}
# `prismdd.recover` & co. were top-level modules before the stages moved into `prismdd.stages`: the attribute is
# the stage module, and `from prismdd.recover import recover` keeps working (_OldStageNames)
_STAGE_MODULES = ("metrics", "recover", "relabel", "squeeze", "validate")


def __getattr__(name: str):
    if name in _STAGE_MODULES:
        return importlib.import_module(f"prismdd.stages.{name}")
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name) if name != "audit" else \
            importlib.import_module(_PUBLIC[name])
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prismdd' has no attribute {name!r}")


class _OldStageNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``prismdd.<stage>`` as the module ``prismdd.stages.<stage>`` itself (not a copy)."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, tail = fullname.partition(".")
        if head == __name__ and tail in _STAGE_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(f"prismdd.stages.{spec.name.rsplit('.', 1)[1]}")

    def exec_module(self, module):
        pass  # already executed as prismdd.stages.<stage>


sys.meta_path.append(_OldStageNames())


def list_methods() -> list[dict]:
    """The recovery presets (``prismdd methods``)."""
    return importlib.import_module("prismdd.core.presets").list_presets("recover")


__all__ = ["ARCHS", "DATASETS", "METHODS", "MetricsConfig", "PROTOCOLS", "RecoverConfig", "RelabelConfig",
           "RunConfig", "SqueezeConfig", "ValidateConfig", "audit", "build_config", "create_model", "find_teachers",
           "list_datasets", "list_methods", "list_models", "load_dataset", "load_distilled", "load_model",
           "load_teacher", "metrics", "recover", "recover_config", "relabel", "run", "run_config", "squeeze",
           "validate", "validate_config"]
