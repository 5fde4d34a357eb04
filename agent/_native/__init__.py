"""Native (Cython) extensions, built from ext/ by setup.py, and the choice between each one
and its pure-Python twin."""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

log = logging.getLogger(__name__)

PURE_PYTHON_ENV = "FERRY_PURE_PYTHON"
"""Set to 1 to run every twin instead of the native code (tests compare the two)."""


def select(name: str, twin: str) -> tuple[str, ModuleType]:
    """("native", agent._native.NAME) unless FERRY_PURE_PYTHON=1 asks for the twin or the
    extension is not built (then a warning: the twin is some hundred times slower)."""
    if os.environ.get(PURE_PYTHON_ENV) != "1":
        try:
            return "native", importlib.import_module(f"agent._native.{name}")
        except ImportError as exc:
            log.warning("native %s not built (%s); using the pure-Python twin", name, exc)
    return "python", importlib.import_module(twin)
