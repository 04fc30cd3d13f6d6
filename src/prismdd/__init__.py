"""prismdd: dataset distillation with PRISM and the SRe2L family.

Layout (each layer imports only the ones above it):

- ``core``: errors, file I/O, registries, configs and presets, data, models, BN statistics, views,
  the training loop;
- ``artifacts``: every on-disk format (manifests, the resume guard, model cards, distilled sets,
  soft-label files);
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
import sys

__version__ = "0.1.0"

from . import audit  # noqa: E402
from .artifacts import find_teachers, load_distilled, load_model, load_teacher  # noqa: E402
from .core.config import build_config  # noqa: E402
from .core.data import DATASETS, list_datasets, load_dataset  # noqa: E402
from .core.models import ARCHS, create_model, list_models  # noqa: E402
from .core.presets import METHODS, PROTOCOLS, list_presets  # noqa: E402
from .pipeline import RunConfig, run, run_config  # noqa: E402
from .stages import metrics, recover, relabel, squeeze, validate  # noqa: E402  (stage modules)
from .stages.metrics import MetricsConfig  # noqa: E402
from .stages.recover import RecoverConfig, recover_config  # noqa: E402
from .stages.relabel import RelabelConfig  # noqa: E402
from .stages.squeeze import SqueezeConfig  # noqa: E402
from .stages.validate import ValidateConfig, validate_config  # noqa: E402

# `prismdd.recover` & co. were top-level modules before the stages moved into `prismdd.stages`; these
# names keep `from prismdd.recover import recover` working in users' code.
for _stage in (metrics, recover, relabel, squeeze, validate):
    sys.modules[f"{__name__}.{_stage.__name__.rsplit('.', 1)[1]}"] = _stage


def list_methods() -> list[dict]:
    """The recovery presets (``prismdd methods``)."""
    return list_presets("recover")


__all__ = ["ARCHS", "DATASETS", "METHODS", "MetricsConfig", "PROTOCOLS", "RecoverConfig", "RelabelConfig",
           "RunConfig", "SqueezeConfig", "ValidateConfig", "audit", "build_config", "create_model", "find_teachers",
           "list_datasets", "list_methods", "list_models", "load_dataset", "load_distilled", "load_model",
           "load_teacher", "metrics", "recover", "recover_config", "relabel", "run", "run_config", "squeeze",
           "validate", "validate_config"]
