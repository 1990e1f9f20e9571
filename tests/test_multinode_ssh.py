"""`deepspeed --hostfile` the way users type it: pdsh/ssh to real sshd "hosts" on loopback addresses
(tests/ssh_hosts.py), 2 hosts x 1 rank. Losses equal the 1-host 2-rank run, `.deepspeed_env`
reaches the remote ranks, a killed remote rank or an unreachable host ends the job with a non-zero
exit naming the host, and `--resume` after a whole-job kill continues exactly."""

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

import ssh_hosts
from run_helpers import BIN, REPO, TINY, child_env, complete_checkpoint, free_port
from run_helpers import alive as _alive
from run_helpers import wait_for as _wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(ssh_hosts.missing() is not None,
                                 reason=f"ssh test hosts unavailable: {ssh_hosts.missing()}")]

HOSTS = ["127.0.0.2", "127.0.0.3"]
STEPS = ["--max-steps", "60", "checkpoint.every=2", "checkpoint.keep_last=2"]  # long enough to kill mid-run


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with ssh_hosts.ssh_hosts(HOSTS, tmp_path_factory.mktemp("ssh")) as port:
        yield port


def _hostfile(path: Path, names) -> Path:
    path.write_text("".join(f"{h} slots=1\n" for h in names))
    return path


def _env_file(path: Path) -> Path:
    path.write_text("OMP_NUM_THREADS=1\nDS_ACCELERATOR=cpu\nLAMM_DS_PROBE=travelled-over-ssh\n")
    return path


def _command(hostfile, run_dir, demo, *args):
    return [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--master_addr", HOSTS[0], "--master_port",
            str(free_port()), str(REPO / "launch" / "pretrain.py"), "--run-dir", str(run_dir), "--quiet", *TINY,
            f"data.demo_dir={demo['demo_metals'].parent}", *args]


def _launch(tmp_path, run_dir, demo, *args, names=HOSTS, timeout=300, **popen):
    env = child_env()
    env["DS_ENV_FILE"] = str(_env_file(tmp_path / "ds_env"))  # DeepSpeed's .deepspeed_env, kept out of the repo
    cmd = _command(_hostfile(tmp_path / "hostfile", names), run_dir, demo, *args)
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, **popen)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ssh_run(hosts, demo_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ssh_run")
    proc = _ok(_launch(tmp, tmp / "run", demo_data, *STEPS))
    return tmp / "run", proc


def test_two_hosts_over_ssh_match_one_host_two_ranks(ssh_run, demo_data, tmp_path):
    run_dir, proc = ssh_run
    local = tmp_path / "local"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "launch" / "pretrain.py"), "--run-dir", str(local), "--quiet", *TINY,
           f"data.demo_dir={demo_data['demo_metals'].parent}", *STEPS]
    _ok(subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300))
    assert _losses(run_dir) == pytest.approx(_losses(local), rel=1e-6)
    out = proc.stdout + proc.stderr
    assert "WORLD INFO DICT: {'127.0.0.2': [0], '127.0.0.3': [0]}" in out
    assert "127.0.0.3: " in out  # pdsh prefixes the remote node's lines with its name


def test_deepspeed_env_reaches_the_remote_rank(ssh_run):
    run_dir, _ = ssh_run
    remote = json.loads((run_dir / "ranks" / "rank00001.json").read_text())
    assert remote["env"]["LAMM_DS_PROBE"] == "travelled-over-ssh"
    assert remote["env"]["OMP_NUM_THREADS"] == "1" and remote["torch_threads"] == 1
    assert remote["env"]["PYTHONPATH"].split(":")[0] == str(REPO)  # the launcher exports PYTHON* with cwd first
    assert HOSTS[1] in remote["env"]["SSH_CONNECTION"]  # rank 1 really ran in an ssh session to 127.0.0.3
    assert HOSTS[0] in json.loads((run_dir / "ranks" / "rank00000.json").read_text())["env"]["SSH_CONNECTION"]


def test_a_killed_remote_rank_ends_the_job_naming_its_host(hosts, demo_data, tmp_path):
    run_dir = tmp_path / "killed"
    proc = _launch(tmp_path, run_dir, demo_data, "--max-steps", "100000", "checkpoint.every=0",
                   "faults.collective_timeout_s=30", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                   start_new_session=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        assert _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 240)
        pids = [int((run_dir / "pids" / f"rank{r:05d}.pid").read_text().split()[0]) for r in (0, 1)]
        os.kill(pids[1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert _wait_for(lambda: not _alive(pids[0]), 30), "rank 0 ran on after its peer died"
    assert "pdsh@" in out and f"{HOSTS[1]}: ssh exited with exit code" in out
    assert f"{HOSTS[1]}: " in out and "exits with return code = -9" in out  # the host and its dead rank


def test_an_unreachable_host_is_a_clear_error_before_training(hosts, demo_data, tmp_path):
    run_dir = tmp_path / "unreachable"
    start = time.time()
    proc = _launch(tmp_path, run_dir, demo_data, "--max-steps", "4", "faults.collective_timeout_s=15",
                   names=[HOSTS[0], "127.0.0.9"])  # no sshd there: connection refused
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and time.time() - start < 120
    assert "127.0.0.9: ssh exited with exit code 255" in out
    assert "the 2 ranks did not all reach the rendezvous at 127.0.0.2:" in out
    assert "A host in the hostfile may be unreachable over ssh" in out and "no training step was run" in out
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def test_resume_after_a_whole_job_kill_continues_exactly(ssh_run, hosts, demo_data, tmp_path):
    reference, _ = ssh_run
    run_dir = tmp_path / "resumed"
    proc = _launch(tmp_path, run_dir, demo_data, *STEPS, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   start_new_session=True)
    # killed as soon as one checkpoint is complete: the earliest point a resume can start from (a
    # later trigger let this tiny run finish first once the model got faster)
    assert _wait_for(lambda: complete_checkpoint(run_dir), 240)
    pids = [int((run_dir / "pids" / f"rank{r:05d}.pid").read_text().split()[0]) for r in (0, 1)]
    # The launching side dies whole (as when its node fails or its batch job is cancelled): deepspeed,
    # pdsh and pdsh's ssh clients, which pdsh puts in process groups of their own.
    launching_side = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in launching_side:
        with contextlib.suppress(psutil.Error):
            child.kill()
    proc.wait()
    # the ranks on both "hosts" see their ssh session end and stop by themselves
    assert _wait_for(lambda: not any(_alive(p) for p in pids), 30), "remote ranks ran on after the job was killed"
    assert not (run_dir / "model.safetensors").exists(), "the run finished before it could be killed"
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert (run_dir / "checkpoints" / latest / "lamm_complete.json").is_file()
    _ok(_launch(tmp_path, run_dir, demo_data, *STEPS, "--resume"))
    ref, got = load_file(str(reference / "model.safetensors")), load_file(str(run_dir / "model.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert _losses(run_dir) == _losses(reference)
