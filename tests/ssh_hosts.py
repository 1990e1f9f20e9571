"""Real ssh "hosts" on this machine for multi-node launch tests: one sshd per loopback address
(127.0.0.2, 127.0.0.3, ...), a key made for the test, and a client config scoped to those
addresses, so `deepspeed --hostfile` reaches them over pdsh/ssh exactly as it reaches real nodes.

Everything started is stopped by PID, and every file written (including the client config drop-in
under /etc/ssh/ssh_config.d/) is removed on exit. Needs root, Debian's openssh-server and pdsh;
:func:`missing` says why the harness cannot run here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
CLIENT_CONFIG_DIR = Path("/etc/ssh/ssh_config.d")


def missing() -> str | None:
    """Why the harness cannot run on this machine (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (an sshd per loopback address)"
    for tool, package in ((SSHD, "openssh-server"), ("pdsh", "pdsh"), ("ssh", "openssh-client"),
                          ("ssh-keygen", "openssh-client")):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install {package})"
    if not CLIENT_CONFIG_DIR.is_dir():
        return f"{CLIENT_CONFIG_DIR} does not exist (the client config drop-in goes there)"
    if "Include /etc/ssh/ssh_config.d/*.conf" not in Path("/etc/ssh/ssh_config").read_text():
        return "/etc/ssh/ssh_config does not include /etc/ssh/ssh_config.d/*.conf"
    return None


def _free_port(addresses) -> int:
    """A TCP port free on every given address."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        try:
            for addr in addresses[1:]:
                with socket.socket() as s:
                    s.bind((addr, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


def _wait_listening(addr: str, port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd on {addr} exited with {proc.returncode}: {proc.stderr.read()}")
        with socket.socket() as s:
            if s.connect_ex((addr, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"sshd on {addr}:{port} did not start listening")


@contextlib.contextmanager
def ssh_hosts(addresses: list[str], workdir: Path, unreachable: list[str] = ()):
    """Start one sshd per address; ``ssh ADDR cmd`` then works without a password or prompt.

    ``unreachable`` addresses get the same client settings but no sshd (connections are refused).
    Yields the port. Stops every sshd by PID and removes the client config on exit."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    key = workdir / "client_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    host_key = workdir / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    (workdir / "authorized_keys").write_text((workdir / "client_key.pub").read_text())
    os.chmod(workdir / "authorized_keys", 0o600)
    port = _free_port(addresses)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    client_config = CLIENT_CONFIG_DIR / f"lamm-ds-test-{os.getpid()}.conf"
    procs: list[subprocess.Popen] = []
    try:
        client_config.write_text(
            f"Host {' '.join([*addresses, *unreachable])}\n"
            f"    Port {port}\n    IdentityFile {key}\n    IdentitiesOnly yes\n    BatchMode yes\n"
            "    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n"
            "    ConnectTimeout 5\n")
        for addr in addresses:
            cfg = workdir / f"sshd_{addr}.conf"
            cfg.write_text(
                f"ListenAddress {addr}\nPort {port}\nHostKey {host_key}\n"
                f"AuthorizedKeysFile {workdir / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                f"PidFile {workdir / f'sshd_{addr}.pid'}\nSubsystem sftp internal-sftp\nLogLevel ERROR\n")
            proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            procs.append(proc)
            _wait_listening(addr, port, proc)
        yield port
    finally:
        for proc in procs:  # the listeners; their session children end with their connections
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        client_config.unlink(missing_ok=True)
