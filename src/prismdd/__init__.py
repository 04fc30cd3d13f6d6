"""prismdd: dataset distillation with PRISM and the SRe2L family.

Each stage is a module with a function of the same name, from a dataclass config to an output folder
with a manifest (the stage modules keep their names, so ``prismdd.recover`` is the module)::

    import prismdd
    prismdd.squeeze.squeeze(prismdd.SqueezeConfig(dataset="digits", arch="convnet", out="runs/t"))
    prismdd.recover.recover(prismdd.recover_config("prism", dataset="digits", teachers="runs/t", out="runs/p"))
    ds = prismdd.load_distilled("runs/p")
    results = prismdd.run(prismdd.run_config(dataset="digits", quick=True, out="runs/demo"))
"""
__version__ = "0.1.0"

from . import audit, metrics, recover, relabel, squeeze, validate  # noqa: E402,F401  (stage modules)
from .config import build_config  # noqa: E402
from .data import DATASETS, list_datasets, load_dataset  # noqa: E402
from .methods import METHODS, list_methods  # noqa: E402
from .models import ARCHS, create_model, list_models  # noqa: E402
from .pipeline import RunConfig, run, run_config  # noqa: E402
from .recover import RecoverConfig, load_distilled, recover_config  # noqa: E402
from .relabel import RelabelConfig  # noqa: E402
from .squeeze import SqueezeConfig, load_teacher  # noqa: E402
from .validate import ValidateConfig, validate_config  # noqa: E402

__all__ = ["ARCHS", "DATASETS", "METHODS", "RecoverConfig", "RelabelConfig", "RunConfig", "SqueezeConfig",
           "ValidateConfig", "audit", "build_config", "create_model", "list_datasets", "list_methods", "list_models",
           "load_dataset", "load_distilled", "load_teacher", "metrics", "recover", "recover_config", "relabel", "run",
           "run_config", "squeeze", "validate", "validate_config"]
