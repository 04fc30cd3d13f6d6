"""Method plug-ins for recovery (see ``base.py``); importing this package registers every plug-in."""
from .base import PLUGINS, Plugin

__all__ = ["PLUGINS", "Plugin"]
