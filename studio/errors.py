"""User-facing errors and warnings: one clear message naming the input and the fix (CLI exit code 2, no
traceback); :func:`warn_once` for a fallback worth one warning per process."""
from __future__ import annotations

import warnings

_warned: set[str] = set()


class UserError(ValueError):
    """Bad input from a user (file, prompt, option). Its message names the input and the fix."""


def warn_once(key: str, msg: str) -> None:
    """Warn once per process and ``key`` (a backend falling back, e.g. the native extension failing to build)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
