"""ASE LMDB databases (``*.aselmdb``: OMat24, OMol25, ...) through the ``ase-db-backends`` package.

Each record is an ASE database row stored as zlib-compressed JSON (no pickle), so no --trust-pickle
is needed. Rows become structures as ASE SQLite rows do (readers.py): the calculator results are
the standard labels, key-value pairs go to ``info``, per-atom ``data`` arrays can be named with
--forces-key. OMat24 stores total energies (eV), forces (eV/Å) and stress (eV/Å^3, ASE sign).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from lamm_ds.ingest.readers import IngestError, LabelKeys, _row_atoms, atoms_to_structure
from lamm_ds.structure import Structure


def _connect(path: Path):
    try:
        import ase_db_backends.aselmdb  # noqa: F401 - ase.db.connect imports it for type="aselmdb"
    except ImportError:
        raise IngestError("reading *.aselmdb needs the ase-db-backends package: pip install 'lamm-ds[aselmdb]'") \
            from None
    import ase.db

    if not path.is_file() or os.path.getsize(path) == 0:
        raise IngestError(f"{path}: {'the file is empty' if path.is_file() else 'not a file'}")
    try:  # read-only and without a lock file: the source is never modified
        return ase.db.connect(str(path), type="aselmdb", readonly=True, use_lock_file=False)
    except Exception as exc:
        raise IngestError(f"{path}: cannot open as an ASE LMDB database: {exc}") from exc


def iter_aselmdb(path: Path, ctx, spec) -> Iterator[Structure]:
    """Rows in id order; ``--format omat24`` reads the standard labels, ``aselmdb`` honours --energy-key etc."""
    keys = ctx.keys if spec.label_keys else LabelKeys(allow_missing=ctx.keys.allow_missing,
                                                      unlabelled=ctx.keys.unlabelled)
    db = _connect(path)
    count = 0
    try:
        for row in db.select():
            count += 1
            yield atoms_to_structure(_row_atoms(row), str(path), int(row.id), keys)
    except IngestError:
        raise
    except Exception as exc:
        raise IngestError(f"{path}: cannot read row {count + 1}: {type(exc).__name__}: {exc}") from exc
    finally:
        db.close()
    if count == 0:
        raise IngestError(f"{path}: the ASE LMDB database holds no rows")
