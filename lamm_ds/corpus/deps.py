"""The optional chemistry tools the corpus needs, with one clear error when they are missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

INSTALL_HINT = ('pip install -e ".[corpus]" && pip install --no-deps molsets   '
                "(RDKit and tblite from the extra; molsets without its dependencies, which pin old "
                "packages: only its SMILES file is read)")


class MissingExtraError(RuntimeError):
    """A corpus recipe needs a package of the ``corpus`` extra that is not installed."""


def require(*modules: str) -> None:
    """Raise :class:`MissingExtraError` naming every missing module and the install command."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"lamm-ds make-corpus needs {', '.join(missing)} (the `corpus` extra): "
                                f"{INSTALL_HINT}")


def moses_train_file() -> Path:
    """``moses/dataset/data/train.csv.gz`` of the installed ``molsets`` wheel, found without importing
    ``moses`` (its import pulls in torch extensions and packages we never install)."""
    require("moses")
    spec = importlib.util.find_spec("moses")
    for root in spec.submodule_search_locations or []:
        f = Path(root) / "dataset" / "data" / "train.csv.gz"
        if f.is_file():
            return f
    raise MissingExtraError(f"the installed molsets package has no dataset/data/train.csv.gz under "
                            f"{list(spec.submodule_search_locations or [])}: reinstall it ({INSTALL_HINT})")
