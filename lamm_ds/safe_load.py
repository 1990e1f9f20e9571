"""Reading ``torch.save`` files without running code from them.

``torch.load(weights_only=True)`` rebuilds tensors and plain containers only; callers add a short,
explicit list of extra classes their files legitimately hold. A file that needs anything else is
refused with :class:`RefusedPickleError`, which names the globals it asked for, so the caller can
say what happened and that only a ``--trust-pickle`` flag unpickles it fully.
"""

from __future__ import annotations

import os
import pickle
import re

import torch


class RefusedPickleError(pickle.UnpicklingError):
    """Weights-only unpickling refused a file; ``globals`` are the names it asked for (may be empty
    when the unpickler stopped before reading one), ``detail`` the unpickler's own reason."""

    def __init__(self, path: str, globals_: list[str], detail: str) -> None:
        self.path, self.globals, self.detail = path, globals_, detail
        super().__init__(f"{path}: {', '.join(globals_) or detail}")


def _name(item) -> str:
    """Qualified name of an allow-list entry (a class, or a ``(class, "name")`` pair)."""
    return item[1] if isinstance(item, tuple) else f"{item.__module__}.{item.__qualname__}"


def _detail(text: str) -> str:
    """The unpickler's own reason, from torch's long weights-only error message."""
    marker = "WeightsUnpickler error:"
    if marker in text:
        for line in text.split(marker, 1)[1].splitlines():
            if line.strip():
                return line.strip()
    for line in text.splitlines():
        if line.strip().startswith(("Trying to load", "Unsupported", "Can only build")):
            return line.strip()
    return "see torch.load(weights_only=True)"


def _refused_globals(path: str, allowed: list, text: str) -> list[str]:
    """Every global a zip checkpoint needs beyond ``allowed`` (read without unpickling), else the
    one named in the unpickler's message (legacy pickles)."""
    found: list[str] = []
    with open(path, "rb") as fh:
        is_zip = fh.read(2) == b"PK"
    if is_zip:
        try:
            names = {_name(a) for a in allowed}
            found = sorted(g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in names)
        except Exception:  # a damaged archive: fall back to the message
            found = []
    if not found:
        m = re.search(r"GLOBAL ([\w.]+)", text)
        found = [m.group(1)] if m else []
    return found


def load_weights_only(path: str | os.PathLike, allowed: list, map_location=None):
    """``torch.load(path, weights_only=True)`` with ``allowed`` extra classes; a refused file raises
    :class:`RefusedPickleError` (other failures, e.g. a truncated file, propagate unchanged)."""
    path = str(path)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "eights only" not in text:  # not the weights-only unpickler's refusal
            raise
        raise RefusedPickleError(path, _refused_globals(path, allowed, text), _detail(text)) from None
