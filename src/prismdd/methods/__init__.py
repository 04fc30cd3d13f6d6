"""Method plug-ins for recovery (see ``base.py``); importing this package registers every plug-in."""
from .base import PLUGINS, Plugin
from .params import PARAMS, Param
from . import rded  # noqa: F401  (registers the plug-in)
from . import gvbsm  # noqa: F401  (registers the plug-in)
from . import dwa  # noqa: F401  (registers the plug-in)
from . import edc  # noqa: F401  (registers the plug-in)
from . import d4m  # noqa: F401  (registers the plug-in; diffusers is imported only when it runs)
from . import t2i  # noqa: F401  (registers the plug-in; diffusers is imported only when it runs)
from . import frepo  # noqa: F401  (registers the plug-in)

__all__ = ["PARAMS", "PLUGINS", "Param", "Plugin"]
