"""`ray up` + `ray submit` + `ray down` with cluster_configs/ray/local_cluster.yaml, for real.

Ray's local provider launches a one-machine cluster on this host through an sshd of the test's own
(127.0.0.1, a free port, its own host key and authorized_keys in a temp dir). That sshd runs in a
new PID namespace, with HOME and RAY_TMPDIR set to temp dirs: `ray down` runs a bare `ray stop`,
which stops every Ray process it can see, and inside the namespace it sees only this cluster's, so
other Ray instances on a shared machine are safe; killing the namespace ends whatever is left.
Needs sshd, ssh, rsync and `unshare --pid` (root); skipped with the reason otherwise.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
RAY_DIR = REPO / "cluster_configs" / "ray"
TEMPLATE = RAY_DIR / "local_cluster.yaml"
JOB = RAY_DIR / "hybrid_ray_job.py"
PROXY = RAY_DIR / "tcp_proxy.py"
VENV = Path(sys.prefix)
RAY_BIN = VENV / "bin" / "ray"
LIMIT = 40
STEP_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sshd_path() -> str | None:
    found = shutil.which("sshd")
    if found:
        return found
    return "/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else None


def _pid_ns(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _cmdline(pid: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def _processes(ns: str | None = None) -> list[str]:
    """``pid cmdline`` of every process (in PID namespace ``ns`` if given)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and (ns is None or _pid_ns(pid) == ns):
            cmd = _cmdline(pid)
            if cmd is not None:
                out.append(f"{pid} {cmd}")
    return out


@dataclass
class LoopbackNode:
    """An sshd on 127.0.0.1 in its own PID namespace, and what a launcher config needs to reach it."""

    root: Path
    port: int
    key: Path
    home: Path            # HOME of every ssh session (bootstrap config, ~/.bashrc, outputs)
    head_tmp: Path        # RAY_TMPDIR of every ssh session: the head's Ray sessions
    env: dict[str, str]   # environment for the launcher commands run here
    unshare: subprocess.Popen
    ns: str               # the sshd's PID namespace
    cluster_name: str

    def ssh_ok(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ssh", "-i", str(self.key), "-o", f"ProxyCommand={sys.executable} {PROXY} %h {self.port}",
             "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={os.devnull}",
             "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
             f"{getpass.getuser()}@127.0.0.1", "echo $HOME"],
            capture_output=True, text=True, timeout=30)


def _start_node() -> LoopbackNode:
    for tool in ("ssh", "ssh-keygen", "rsync", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not installed (apt-get install openssh-client rsync util-linux)")
    sshd = _sshd_path()
    if sshd is None:
        pytest.skip("sshd is not installed (apt-get install openssh-server)")
    if not RAY_BIN.exists():
        pytest.skip(f"no `ray` in this venv ({RAY_BIN})")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"`unshare --pid` failed ({probe.stderr.strip()}): without a PID namespace `ray down` "
                    "would stop every Ray process on this machine")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # sshd's privilege separation dir
    # short path: Ray's Unix sockets live under RAY_TMPDIR and must stay under 108 bytes
    root = Path(tempfile.mkdtemp(prefix="hrl-", dir="/tmp"))
    home, head_tmp, launcher_tmp = root / "home", root / "head", root / "launcher"
    for d in (home, head_tmp, launcher_tmp):
        d.mkdir()
    for name in ("host_key", "key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    shutil.copy(root / "key.pub", root / "authorized_keys")
    port = _free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPidFile {root / 'sshd.pid'}\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nAllowTcpForwarding no\n"
        "X11Forwarding no\nPrintMotd no\n"
        f"SetEnv HOME={home} RAY_TMPDIR={head_tmp} RAY_USAGE_STATS_ENABLED=0\n")
    check = subprocess.run([sshd, "-t", "-f", str(root / "sshd_config")], capture_output=True, text=True)
    if check.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"sshd rejects the test's config: {check.stderr.strip()}")
    log = open(root / "sshd.log", "w")
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                             sshd, "-D", "-e", "-f", str(root / "sshd_config")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_TMPDIR=str(launcher_tmp), TMPDIR=str(launcher_tmp), RAY_USAGE_STATS_ENABLED="0")
    node = LoopbackNode(root, port, root / "key", home, head_tmp, env, proc, ns="",
                        cluster_name=f"hrl-{os.getpid()}-{port}")
    deadline = time.monotonic() + 20
    while True:
        res = node.ssh_ok()
        if res.returncode == 0 and res.stdout.strip() == str(home):
            break
        if time.monotonic() > deadline or proc.poll() is not None:
            _stop_node(node)
            pytest.skip(f"ssh to 127.0.0.1:{port} with a generated key failed: "
                        f"{(res.stderr or res.stdout).strip()[-300:]}; sshd: "
                        f"{(root / 'sshd.log').read_text()[-300:]}")
        time.sleep(0.5)
    node.ns = _pid_ns(_child_of(proc.pid)) or ""
    assert node.ns and node.ns != _pid_ns("self"), "sshd is not in a PID namespace of its own"
    return node


def _child_of(pid: int) -> int:
    """The one child of ``pid`` (unshare's: the namespace's sshd)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                return int(entry)
    raise AssertionError(f"unshare {pid} has no child")


def _stop_node(node: LoopbackNode) -> None:
    """SIGKILL unshare: --kill-child kills the namespace's init (sshd), the kernel kills the rest."""
    if node.unshare.poll() is None:
        node.unshare.send_signal(signal.SIGKILL)
        node.unshare.wait(timeout=30)
    # Ray keeps ssh ControlMaster sockets in /tmp/ray_ssh_<user hash>/<cluster hash>
    user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    cluster = hashlib.sha256(node.cluster_name.encode()).hexdigest()[:10]
    shutil.rmtree(f"/tmp/ray_ssh_{user}/{cluster}", ignore_errors=True)
    shutil.rmtree(node.root, ignore_errors=True)


@pytest.fixture
def loopback_node():
    node = _start_node()
    try:
        yield node
    finally:
        _stop_node(node)


def _cluster_yaml(node: LoopbackNode, name: str) -> Path:
    """The bundled local-provider config with the lines marked EDIT filled in, as a user would."""
    text = TEMPLATE.read_text()
    edits = [
        ("cluster_name: hybrid-ray-local", f"cluster_name: {name}"),
        ("ssh_user: root", f"ssh_user: {getpass.getuser()}"),
        ("ssh_private_key: ~/.ssh/id_ed25519", f"ssh_private_key: {node.key}"),
        ("# ssh_proxy_command: python3 cluster_configs/ray/tcp_proxy.py %h 2222",
         f"ssh_proxy_command: {sys.executable} {PROXY} %h {node.port}"),
        ("/opt/hybrid-ray/.venv", str(VENV)),
        # free ports: other Ray instances on this machine may hold the defaults
        ("--port=6379 ", f"--port={_free_port()} --dashboard-port={_free_port()} "
                         f"--dashboard-agent-listen-port={_free_port()} "),
    ]
    for old, new in edits:
        assert old in text, f"{TEMPLATE.name} no longer contains {old!r}"
        text = text.replace(old, new)
    path = node.root / "cluster.yaml"
    path.write_text(text)
    return path


def _ray(node: LoopbackNode, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([str(RAY_BIN), *args], env=node.env, cwd=node.root, capture_output=True,
                              text=True, timeout=STEP_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`ray {' '.join(args)}` took over {STEP_TIMEOUT_S} s: {str(e.stdout)[-2000:]}")


def _tail(res: subprocess.CompletedProcess) -> str:
    return (res.stdout + res.stderr)[-3000:]


@pytest.mark.parametrize("name", ["ray_cluster.yaml", "local_cluster.yaml"])
def test_launcher_configs_pass_rays_schema(name):
    """Both launcher configs are valid for Ray's launcher, and every node runs a venv's Ray."""
    yaml = pytest.importorskip("yaml")
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = yaml.safe_load((RAY_DIR / name).read_text())
    util.validate_config(util.prepare_config(config))
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert all("venv/bin/ray " in cmd for cmd in config[key]), (key, config[key])
    assert any("venv/bin:$PATH" in cmd and "~/.bashrc" in cmd for cmd in config["setup_commands"])
    for local in config.get("file_mounts", {}).values():
        assert (REPO / local).exists(), local     # relative to the checkout's root


@pytest.mark.slow
@pytest.mark.ray
def test_ray_up_submit_down_local_provider(loopback_node):
    from hybrid_ray.workload import load_gsm8k

    node = loopback_node
    cfg = _cluster_yaml(node, node.cluster_name)
    try:
        up = _ray(node, "up", "-y", "--no-config-cache", str(cfg))
        assert up.returncode == 0, f"ray up failed:\n{_tail(up)}"
        # the head runs Ray from this venv, inside the test's namespace and temp dir
        head_procs = _processes(node.ns)
        assert any("gcs_server" in p and str(VENV) in p and str(node.head_tmp) in p for p in head_procs), head_procs

        job = _ray(node, "submit", str(cfg), str(JOB), "--",
                   "run", "--address", "auto", "--config", "local", "--policy", "hybrid",
                   "--limit", str(LIMIT), "--cpus-per-replica", "0.25", "--no-progress",
                   "--output", "~/results.jsonl", "--json", "~/metrics.json")
        assert job.returncode == 0, f"ray submit failed:\n{_tail(job)}"
        assert "on Ray (auto)" in job.stdout and f"{LIMIT}/{LIMIT} completed" in job.stdout, _tail(job)

        for remote in ("results.jsonl", "metrics.json"):
            down = _ray(node, "rsync-down", str(cfg), f"~/{remote}", str(node.root / remote))
            assert down.returncode == 0, f"ray rsync-down {remote} failed:\n{_tail(down)}"
    finally:
        teardown = _ray(node, "down", "-y", str(cfg))

    records = [json.loads(line) for line in (node.root / "results.jsonl").read_text().splitlines()]
    expected = {r.id: r for r in load_gsm8k(LIMIT)}
    ids = [r["id"] for r in records]
    assert len(ids) == LIMIT and set(ids) == set(expected)          # each request exactly once
    assert all(r["output_tokens"] == expected[r["id"]].output_tokens for r in records)
    assert all(r["prompt_tokens"] == expected[r["id"]].prompt_tokens for r in records)
    assert {r["replica"] for r in records} <= {f"llama7b-{i}" for i in range(4)}
    metrics = json.loads((node.root / "metrics.json").read_text())
    assert metrics["requests_completed"] == metrics["requests_total"] == LIMIT
    assert metrics["failed_replicas"] == 0

    assert teardown.returncode == 0, f"ray down failed:\n{_tail(teardown)}"
    assert "Stopped all" in teardown.stdout + teardown.stderr, _tail(teardown)
    # nothing of that cluster is left: only sshd remains in the namespace (ssh sessions may linger
    # for a moment after `ray down` returns)
    deadline = time.monotonic() + 30
    while True:
        left = [p for p in _processes(node.ns) if not p.partition(" ")[2].startswith("sshd")]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert left == [], left
    assert not [p for p in _processes() if str(node.head_tmp) in p]

