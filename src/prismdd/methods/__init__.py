"""Method plug-ins for recovery (see ``base.py``). Importing this package imports every module in it, which
registers every plug-in, its options and its label source (``labels.py``): a new method is one new module here
(docs/PLUGINS.md), with no line to add elsewhere. diffusers and transformers are imported only when their plug-in
runs."""
import importlib
import pkgutil

from .base import ENGINE_OPTION_KINDS, OPTIONS, Options, PLUGINS, Plugin, option_groups, options
from .labels import LABEL_SOURCES, LabelSource, label_source, sources_text
from .params import PARAMS, Param

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ENGINE_OPTION_KINDS", "LABEL_SOURCES", "OPTIONS", "PARAMS", "PLUGINS", "LabelSource", "Options", "Param",
           "Plugin", "label_source", "option_groups", "options", "sources_text"]
