"""A run directory belongs to one job at a time, and remembers the config it was started with."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import yaml

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.yaml"
DS_CONFIG_FILE = "deepspeed_config.json"
CHANGES_FILE = "config_changes.jsonl"
# Keys that change how a run is operated, not what it computes: a resume may change them freely.
OPERATIONAL_KEYS = ("log_every", "keep_host_memory", "data.num_workers", "checkpoint.every", "checkpoint.keep_last",
                    "faults.collective_timeout_s", "faults.nan_abort_after", "faults.inject_nan_steps")


class RunDirBusyError(RuntimeError):
    """Another live job holds the run directory."""


class ConfigChangedError(ValueError):
    """A resume asked for a config that differs from the one the run was started with."""


class RunDirLock:
    """An exclusive ``flock`` on ``<run_dir>/run.lock``, held for the life of the process.

    The kernel drops the lock when its holder exits, however it dies (SIGKILL included), so a
    stale lock never blocks a resume; a live holder is named in the error.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fh = None

    def acquire(self) -> None:
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown process"
            fh.close()
            raise RunDirBusyError(
                f"{self.path.parent} is in use by another job ({holder}); two jobs must not write one run "
                "directory. Wait for it to finish or stop it (the lock is released when it exits), or "
                "choose another --run-dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                 f"{' '.join(sys.argv[:3])}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def _fill_items(tree: dict, item_defaults: dict[str, dict]) -> dict:
    """A copy of ``tree`` whose record lists (dotted path -> field defaults) have every field."""
    import copy

    tree = copy.deepcopy(tree)
    for path, fields in item_defaults.items():
        node = tree
        *parents, last = path.split(".")
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        items = node.get(last) if isinstance(node, dict) else None
        if isinstance(items, list):
            node[last] = [{**fields, **item} if isinstance(item, dict) else item for item in items]
    return tree


def _flatten(tree, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): tree}


def config_changes(stored: dict, current: dict, ignore: tuple[str, ...] = (),
                   defaults: dict | None = None,
                   item_defaults: dict[str, dict] | None = None) -> list[tuple[str, object, object]]:
    """(dotted key, stored value, current value) for every key whose value differs.

    ``defaults``: a default config. A key the stored config lacks (a field added by a later lamm-ds)
    whose current value is its default is no change: new fields default to the old behaviour.
    ``item_defaults``: for lists of records (``data.datasets``), the default of each record field;
    stored records get the fields they lack filled in from it before comparing."""
    if item_defaults:
        stored = _fill_items(stored, item_defaults)
    a, b = _flatten(stored), _flatten(current)
    d = _flatten(defaults) if defaults is not None else {}
    changes = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        old, new = a.get(key, "<absent>"), b.get(key, "<absent>")
        if old == "<absent>" and key in d and new == d[key]:
            continue
        if old != new:
            changes.append((key, old, new))
    return changes


def check_resume_config(run_dir: Path, config_yaml: str, ds_config: dict, allow_change: bool,
                        step: int, defaults: dict | None = None,
                        item_defaults: dict[str, dict] | None = None) -> list[tuple[str, object, object]]:
    """Compare a resume's config with the one stored at the run's start.

    Differences outside :data:`OPERATIONAL_KEYS` raise :class:`ConfigChangedError` unless
    ``allow_change``; allowed ones are appended to ``config_changes.jsonl``. The stored files are
    never overwritten, so the run keeps the record of what it was started with."""
    run_dir = Path(run_dir)
    changes = []
    for name, current in ((CONFIG_FILE, yaml.safe_load(config_yaml)), (DS_CONFIG_FILE, ds_config)):
        path = run_dir / name
        if not path.is_file():
            continue  # a run from before configs were stored: nothing to compare against
        text = path.read_text()
        stored = yaml.safe_load(text) if name == CONFIG_FILE else json.loads(text)
        prefix = "" if name == CONFIG_FILE else "deepspeed_config:"
        changes += [(prefix + k, old, new) for k, old, new in
                    config_changes(stored, current, OPERATIONAL_KEYS if name == CONFIG_FILE else (),
                                   defaults if name == CONFIG_FILE else None,
                                   item_defaults if name == CONFIG_FILE else None)]
    if changes and not allow_change:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes[:12])
        more = f" (and {len(changes) - 12} more)" if len(changes) > 12 else ""
        raise ConfigChangedError(
            f"--resume: the config differs from the one {run_dir} was started with ({run_dir / CONFIG_FILE}): "
            f"{listed}{more}. Resume with the same settings, or pass --allow-config-change to continue with the "
            f"new ones (the original {CONFIG_FILE} is kept and the changes are logged in {CHANGES_FILE})")
    if changes:
        with open(run_dir / CHANGES_FILE, "a") as fh:
            fh.write(json.dumps({"resumed_at_step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "changes": [{"key": k, "was": old, "now": new} for k, old, new in changes]},
                                default=str) + "\n")
    return changes


def add_resume_arguments(p: argparse.ArgumentParser) -> None:
    """``--resume`` and the two flags that only apply with it (launch scripts and ``lamm-ds train``)."""
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoints/latest")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept a config that differs from the run's config.yaml (changes are "
                        "logged in config_changes.jsonl; config.yaml keeps the original)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="with --resume: unpickle the DeepSpeed checkpoint fully (can run code from the file); "
                        "by default only tensors and a short list of DeepSpeed's own classes are loaded")


def check_resume_arguments(args: argparse.Namespace) -> None:
    if (args.allow_config_change or args.trust_pickle) and not args.resume:
        raise SystemExit("--allow-config-change and --trust-pickle only apply with --resume")
