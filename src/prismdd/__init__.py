"""prismdd: dataset distillation with PRISM and the SRe2L family.

Layout (each layer imports only the ones above it):

- ``core``: errors, file I/O, registries, configs and presets, data (a package: the dataset registry and loaders,
  image decoding, the ImageFolder scan, the decode cache, sampling), models, BN statistics, views, the training loop;
- ``artifacts``: every on-disk format, one module per concern (manifests and provenance, the folder lock, model
  cards and teachers, distilled sets, soft labels); a method's own files live in its module under ``methods``;
- ``stages``: squeeze, score, recover, relabel, validate, metrics: each a function from a dataclass config to an
  output folder, importing ``core`` and ``artifacts`` only;
- ``pipeline`` (``prismdd run``, the main job), ``audit`` (the privacy audit), ``report``, ``cli``.

::

    import prismdd
    from prismdd.stages import recover, squeeze
    squeeze.squeeze(prismdd.SqueezeConfig(dataset="digits", arch="convnet", out="runs/t"))
    recover.recover(prismdd.recover_config("prism", dataset="digits", teachers="runs/t", out="runs/p"))
    ds = prismdd.load_distilled("runs/p")
    results = prismdd.run(prismdd.run_config(dataset="digits", quick=True, out="runs/demo"))
"""
from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"

# messages go to the `prismdd` logger tree (prismdd.core.log); a library caller routes or silences them, and gets
# nothing printed until it configures logging (the `prismdd` command installs its terminal handler)
logging.getLogger("prismdd").addHandler(logging.NullHandler())

# The public names, imported on first use (PEP 562): `prismdd --help` and the listings must not wait for torch,
# which almost every module below imports (cli.py, BENCHMARKS.md section 11).
_PUBLIC = {
    "audit": "prismdd.audit",
    "find_teachers": "prismdd.artifacts", "load_distilled": "prismdd.artifacts", "load_model": "prismdd.artifacts",
    "build_config": "prismdd.core.config",
    "DATASETS": "prismdd.core.data", "list_datasets": "prismdd.core.data", "load_dataset": "prismdd.core.data",
    "ARCHS": "prismdd.core.models", "create_model": "prismdd.core.models", "list_models": "prismdd.core.zoo",
    "METHODS": "prismdd.core.presets", "PROTOCOLS": "prismdd.core.presets", "list_presets": "prismdd.core.presets",
    "RunConfig": "prismdd.pipeline", "run": "prismdd.pipeline", "run_config": "prismdd.pipeline",
    "MetricsConfig": "prismdd.stages.metrics",
    "RecoverConfig": "prismdd.stages.recover", "recover_config": "prismdd.stages.recover",
    "RelabelConfig": "prismdd.stages.relabel",
    "ScoreConfig": "prismdd.stages.score",
    "SqueezeConfig": "prismdd.stages.squeeze",
    "ValidateConfig": "prismdd.stages.validate", "validate_config": "prismdd.stages.validate",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name) if name != "audit" else \
            importlib.import_module(_PUBLIC[name])
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prismdd' has no attribute {name!r}")


def list_methods() -> list[dict]:
    """The recovery presets (``prismdd methods``)."""
    return importlib.import_module("prismdd.core.presets").list_presets("recover")


__all__ = ["ARCHS", "DATASETS", "METHODS", "MetricsConfig", "PROTOCOLS", "RecoverConfig", "RelabelConfig",
           "RunConfig", "ScoreConfig", "SqueezeConfig", "ValidateConfig", "audit", "build_config", "create_model",
           "find_teachers",
           "list_datasets", "list_methods", "list_models", "load_dataset", "load_distilled", "load_model",
           "recover_config", "run", "run_config", "validate_config"]
