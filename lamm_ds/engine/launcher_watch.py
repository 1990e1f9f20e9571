"""A rank stops when the launcher that started it dies.

``deepspeed`` starts ``deepspeed.launcher.launch``, which starts the ranks; ``torchrun`` starts them
itself. If the launcher is killed (SIGKILL, an OOM kill, a lost ssh session) its children are not
told: without this watch they train on to the end as orphans and keep writing into the run
directory. Each rank remembers the chain of launcher processes above it at start-up and, from a
daemon thread, checks them once a second; when one is gone the rank terminates itself.

Over ssh (``deepspeed --hostfile`` through pdsh) the rank also watches its ssh session, so killing
the launching side, or losing the connection, stops the remote ranks too.

Set ``LAMM_DS_WATCH_LAUNCHER=0`` to turn the watch off.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import psutil

log = logging.getLogger("lamm_ds")
POLL_S = 1.0
_LAUNCHER_MODULES = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
                     "torch.distributed.launch")
_LAUNCHER_SCRIPTS = ("deepspeed", "torchrun", "ds")


def is_launcher(cmdline: list[str]) -> bool:
    """Whether a process's argv is a deepspeed / torchrun launcher (by its program or ``-m`` module)."""
    for k, arg in enumerate(cmdline[:3]):  # interpreter, then the script or "-m module"
        if arg == "-m" and k + 1 < len(cmdline) and cmdline[k + 1] in _LAUNCHER_MODULES:
            return True
        if os.path.basename(arg) in _LAUNCHER_SCRIPTS:
            return True
        if arg.endswith(("torch/distributed/run.py", "deepspeed/launcher/launch.py", "deepspeed/launcher/runner.py")):
            return True
    return False


_SHELLS = ("sh", "bash", "dash", "zsh", "ksh")


def _is_sshd(p: psutil.Process | None) -> bool:
    try:
        return p is not None and (p.name() == "sshd" or " ".join(p.cmdline()[:1]).startswith("sshd"))
    except psutil.Error:
        return False


def launcher_chain(process: psutil.Process | None = None) -> list[psutil.Process]:
    """The launcher processes directly above ``process`` (default: this one), nearest first.

    Climbing stops at the first ancestor that is not a launcher (the user's shell, a job script),
    so only the launcher's own lifetime is watched. One exception: a launcher started over ssh
    (``deepspeed --hostfile`` runs ``deepspeed.launcher.launch`` on each node through pdsh) also
    depends on its ssh session, whose sshd process ends when the launching side dies or the
    connection drops; that process (above the session's shell, if any) is watched too."""
    chain = []
    parent = (process or psutil.Process()).parent()
    while parent is not None and parent.pid > 1:
        try:
            cmdline = parent.cmdline()
        except psutil.Error:
            break
        if not is_launcher(cmdline):
            break
        chain.append(parent)
        parent = parent.parent()
    if chain and parent is not None:
        try:
            # only a shell ssh started to run the launcher (`bash -c "... deepspeed.launcher.launch
            # ..."`, as pdsh does): a user's login shell over ssh must not tie a nohup'd job to it
            args = parent.cmdline()
            ran_launcher = parent.name() in _SHELLS and "-c" in args and "deepspeed.launcher.launch" in " ".join(args)
            session = parent.parent() if ran_launcher else parent
        except psutil.Error:
            session = None
        if _is_sshd(session):
            chain.append(session)
    return chain


def _describe(p: psutil.Process) -> str:
    try:
        return f"pid {p.pid} ({' '.join(p.cmdline()[:4])})"
    except psutil.Error:
        return f"pid {p.pid}"


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch_launcher(rank: int, poll_s: float = POLL_S) -> list[psutil.Process]:
    """Start the watch thread (no-op when no launcher is above us or the watch is disabled)."""
    if os.environ.get("LAMM_DS_WATCH_LAUNCHER", "1") == "0":
        return []
    chain = launcher_chain()
    if not chain:
        return []
    names = [_describe(p) for p in chain]

    def watch() -> None:
        event = threading.Event()
        while not event.wait(poll_s):
            for proc, name in zip(chain, names):
                if not _alive(proc):
                    log.error("rank %d: the launcher %s has exited; stopping this rank (pid %d) so it does "
                              "not run on as an orphan", rank, name, os.getpid())
                    logging.shutdown()
                    os.kill(os.getpid(), signal.SIGTERM)
                    return

    threading.Thread(target=watch, name="lamm-ds-launcher-watch", daemon=True).start()
    return chain
