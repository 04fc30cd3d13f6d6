"""prismdd: dataset distillation with PRISM and the SRe2L family.

Each stage is a function from a dataclass config to an output folder with a manifest::

    import prismdd
    prismdd.squeeze(prismdd.SqueezeConfig(dataset="digits", arch="convnet", out="runs/t"))
    prismdd.recover(prismdd.recover_config("prism", dataset="digits", teachers="runs/t", out="runs/p"))
    ds = prismdd.load_distilled("runs/p")
"""
__version__ = "0.1.0"

from .config import build_config  # noqa: E402
from .data import DATASETS, load_dataset, list_datasets  # noqa: E402
from .methods import METHODS, list_methods  # noqa: E402
from .models import ARCHS, create_model, list_models  # noqa: E402
from .pipeline import RunConfig, run, run_config  # noqa: E402
from .recover import RecoverConfig, load_distilled, recover, recover_config  # noqa: E402
from .relabel import RelabelConfig, relabel  # noqa: E402
from .squeeze import SqueezeConfig, load_teacher, squeeze  # noqa: E402
from .validate import ValidateConfig, validate, validate_config  # noqa: E402

__all__ = ["ARCHS", "DATASETS", "METHODS", "RecoverConfig", "RelabelConfig", "RunConfig", "SqueezeConfig",
           "ValidateConfig", "build_config", "create_model", "list_datasets", "list_methods", "list_models",
           "load_dataset", "load_distilled", "load_teacher", "recover", "recover_config", "relabel", "run",
           "run_config", "squeeze", "validate", "validate_config"]
