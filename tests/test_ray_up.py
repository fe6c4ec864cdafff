"""``ray up -y deploy/cluster.yaml`` for real: the cluster launcher (local provider) reaches 127.0.0.1 over SSH,
starts Ray and the whole system with the YAML's own commands; a prompt goes through the client; ``ray down -y``
stops it all.

Setup, done here because CI is a fresh Debian machine where the test runs as root: Debian's openssh-server,
rsync and netcat-openbsd (apt-get, without letting the package start a service); a throw-away account
``moeray`` with a generated key; a private sshd on a free port bound to 127.0.0.1 (``ssh_proxy_command`` makes
Ray's ssh and rsync use that port). Ray runs as ``moeray``, so the ``ray stop`` that ``ray up``/``ray down``
run over SSH can only stop that account's processes, never another Ray on the machine. Only the test's copy
of the YAML differs from deploy/cluster.yaml: the ``auth`` section, a unique cluster name; the model, ports
and bits come through the YAML's documented ``MOE_*`` knobs in the account's ~/.bashrc.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from client import Client
from conftest import REPO
from coordinator.reference import greedy, reference_model
from deploy.local_ray import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
USER = "moeray"
PACKAGES = {"/usr/sbin/sshd": "openssh-server", "/usr/bin/rsync": "rsync", "/usr/bin/nc": "netcat-openbsd",
            "/usr/bin/setfacl": "acl"}
PROMPT_IDS = [5, 9, 33, 70, 100]


def _run(cmd: list[str], timeout: float = 600, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


def _launcher(args: list[str], log: Path, timeout: float, **kw: object) -> tuple[int, str]:
    """Runs ``ray <args>`` with its output in ``log`` (readable while it runs); returns (status, output)."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    with open(log, "w") as f:
        proc = subprocess.Popen([ray_cli, *args], stdout=f, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, **kw)  # type: ignore[call-overload]
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)
            code = -9
    return code, log.read_text()


def _apt_install(packages: list[str]) -> None:
    """apt-get install without starting services (a policy-rc.d that forbids it, if none is in place)."""
    policy = Path("/usr/sbin/policy-rc.d")
    added = not policy.exists()
    if added:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        out = _run(["apt-get", "install", "-y", "-q", *packages], env=env)
        if out.returncode != 0:  # a fresh machine may need its package lists first
            _run(["apt-get", "update", "-q"], env=env)
            out = _run(["apt-get", "install", "-y", "-q", *packages], env=env)
        assert out.returncode == 0, f"apt-get install {packages} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
    finally:
        if added:
            policy.unlink()


def _user_processes() -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter(["username"]):
        if p.info["username"] == USER:
            procs.append(p)
    return procs


def _kill_user_processes() -> None:
    """Ends what the test account still runs, by pid (only processes this test started)."""
    procs = _user_processes()
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _grant_traverse(paths: list[Path]) -> list[tuple[Path, str]]:
    """Lets the account reach the venv's interpreter and the checkout: an ACL ``u:moeray:x`` (traverse only, no
    listing) on each parent directory it cannot pass (e.g. /root when the venv's Python lives in ~/.pyenv).
    Returns the directories changed, for ``_revoke_traverse``."""
    changed: list[tuple[Path, str]] = []
    for path in paths:
        for parent in reversed(path.parents):
            if _run(["runuser", "-u", USER, "--", "test", "-x", str(parent)]).returncode != 0:
                before = _run(["getfacl", "-p", "--skip-base", str(parent)]).stdout
                assert _run(["setfacl", "-m", f"u:{USER}:x", str(parent)]).returncode == 0
                changed.append((parent, before))
    return changed


def _revoke_traverse(changed: list[tuple[Path, str]]) -> None:
    """Puts the ACLs back as they were (``-b`` when there was none: no leftover mask entry)."""
    for parent, before in changed:
        if before.strip():
            _run(["setfacl", "-x", f"u:{USER}", str(parent)])
        else:
            _run(["setfacl", "-b", str(parent)])


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs root on Linux (installs sshd, creates a throw-away account)")
    missing = sorted({pkg for path, pkg in PACKAGES.items() if not Path(path).exists()})
    if missing:
        _apt_install(missing)
    tmp = tmp_path_factory.mktemp("ray-up")
    tmp.chmod(0o755)
    if _run(["id", USER]).returncode != 0:
        # password "*": no password login, but not a locked account (sshd refuses locked ones without PAM)
        out = _run(["useradd", "--create-home", "--shell", "/bin/bash", "--password", "*", USER])
        assert out.returncode == 0, out.stderr
    home = Path(f"/home/{USER}")
    key = tmp / "id_ed25519"
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], timeout=30)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host_ed25519")], timeout=30)
    (home / ".ssh").mkdir(mode=0o700, exist_ok=True)
    (home / ".ssh" / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    ports = {"ssh": free_port(), "ray": free_port(), "dashboard": free_port(), "coordinator": free_port()}
    # The YAML's knobs, read by the SSH shell Ray uses (it sources ~/.bashrc before every command). One expert
    # worker, not the default 2: each is an actor process that imports torch on CI's 2 cores, and sharding is
    # test_deploy's subject; a non-default value also shows the knob reaches `deploy up`.
    (home / ".bashrc").write_text(
        f"export RAY_TMPDIR=$HOME/raytmp MOE_MODEL=tiny-random MOE_WORKERS=1 MOE_EXPERT_BITS=16\n"
        f"export MOE_RAY_PORT={ports['ray']} MOE_DASHBOARD_PORT={ports['dashboard']} "
        f"MOE_PORT={ports['coordinator']} MOE_EXPERT_SLOTS=2\nmkdir -p $RAY_TMPDIR\n")
    _run(["chown", "-R", f"{USER}:{USER}", str(home)])
    (home / ".ssh" / "authorized_keys").chmod(0o600)
    config = tmp / "sshd_config"
    config.write_text(f"Port {ports['ssh']}\nListenAddress 127.0.0.1\nHostKey {tmp / 'host_ed25519'}\n"
                      f"PidFile {tmp / 'sshd.pid'}\nAllowUsers {USER}\nPasswordAuthentication no\n"
                      "KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin no\nStrictModes no\n"
                      "Subsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    granted = _grant_traverse([Path(sys.executable).resolve(), REPO / ".venv" / "bin" / "ray"])
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "sshd.log", "w"))
    try:
        _wait_port(ports["ssh"])
        yield {"tmp": tmp, "key": key, "ports": ports}
    finally:
        _kill_user_processes()
        proc.terminate()
        proc.wait(10)
        _revoke_traverse(granted)
        _run(["userdel", "--remove", USER])


def test_ray_up_serves_a_prompt_and_ray_down_stops_everything(sshd: dict, tiny_ckpt: Path) -> None:
    tmp, ports = sshd["tmp"], sshd["ports"]
    assert _run(["make", "-s", "deploy/.generated/repo.env"], cwd=REPO).returncode == 0
    config = yaml.safe_load((REPO / "deploy" / "cluster.yaml").read_text())
    config["cluster_name"] = f"moe-serving-test-{os.getpid()}"
    config["auth"] = {"ssh_user": USER, "ssh_private_key": str(sshd["key"]),
                      "ssh_proxy_command": f"nc 127.0.0.1 {ports['ssh']}"}
    cluster_yaml = tmp / "cluster.yaml"
    cluster_yaml.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    try:
        code, up = _launcher(["up", "-y", "--no-config-cache", str(cluster_yaml)], tmp / "ray-up.log", 600,
                             cwd=REPO, env=env)
        assert code == 0, f"ray up failed ({code}):\n{up[-8000:]}"
        assert f"coordinator: 127.0.0.1:{ports['coordinator']}" in up
        assert "starting 1 x 1 expert workers (16-bit)" in up  # the knobs reached `deploy up`
        with Client(f"127.0.0.1:{ports['coordinator']}", timeout_s=120) as c:
            assert c.health() == "SERVING"
            r = c.generate(prompt_token_ids=PROMPT_IDS, max_new_tokens=8)
        assert r.token_ids == greedy(reference_model(tiny_ckpt), PROMPT_IDS, 8)
        assert any("raylet" in " ".join(p.cmdline()) for p in _user_processes())  # Ray runs as the account
    finally:
        code, down = _launcher(["down", "-y", str(cluster_yaml)], tmp / "ray-down.log", 300, cwd=REPO, env=env)
        for suffix in ("state", "lock"):  # the launcher's local bookkeeping of this throw-away cluster
            Path(f"/tmp/ray/cluster-{config['cluster_name']}.{suffix}").unlink(missing_ok=True)
    assert code == 0, f"ray down failed ({code}):\n{down[-6000:]}"
    deadline = time.monotonic() + 60
    while any(p.name() != "sshd" for p in _user_processes()):
        assert time.monotonic() < deadline, [" ".join(p.cmdline()) for p in _user_processes()]
        time.sleep(0.2)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", ports["coordinator"])) != 0  # the coordinator is gone too
