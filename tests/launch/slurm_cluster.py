"""Slurm clusters on this machine for tests, stopped again afterwards; their sockets,
state and logs live in a temporary directory. Slurm and munge come from Debian's
packages (slurm-wlm, munge); :func:`ensure_slurm` installs them when missing and it
can (root with apt-get).

* :class:`SlurmCluster`: one node, this host: munged, slurmctld and slurmd.
* :class:`TwoNodeSlurmCluster`: two nodes that Slurm, torchrun and gloo see as two
  hosts: each slurmd runs in its own network namespace (only ``lo`` and one end of a
  veth pair, address 10.251.0.1 or .2) and UTS namespace (hostname ``lpr-n0`` /
  ``lpr-n1``), with its own ``/etc/hosts`` (``ip netns exec`` mounts
  ``/etc/netns/<ns>/hosts``). The controller runs on the first node, the head node;
  client commands (:meth:`run`, :attr:`prefix`) run there too. Every socket a job
  opens can only reach the two nodes' addresses: the namespaces have no other
  interface. The filesystem is shared, as on a cluster.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged")


def ensure_slurm() -> str | None:
    """None when Slurm is usable, else the reason it is not."""
    if all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists() for b in BINARIES):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm / munge are not installed and cannot be installed here (needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], capture_output=True, text=True,
                       env=env, timeout=900)
    if r.returncode != 0:
        return f"apt-get install slurm-wlm munge failed: {r.stderr[-500:]}"
    return None


def netns_unavailable() -> str | None:
    """None when this machine can make network and UTS namespaces (root, iproute2,
    util-linux), else the reason it cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for b in ("ip", "unshare", "nsenter"):
        if not shutil.which(b):
            return f"{b} is not installed (iproute2 / util-linux)"
    probe = f"lprprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    r = subprocess.run(["unshare", "--uts", "true"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"unshare --uts failed: {r.stderr.strip()}"
    return None


def start_or_skip(cluster: SlurmCluster, reason: str | None) -> SlurmCluster:
    """``cluster`` started, or the test skipped with ``reason`` (Slurm or namespaces unavailable)."""
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return cluster.start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """One node: this host."""

    def __init__(self, root: Path):
        self.root = root
        # the daemons' Unix sockets (munge's, slurmstepd's <spool>/<node>_<job>.<step>) must
        # fit 108 bytes: pytest's tmp_path under xdist does not, so they live in a short path
        self.sockets = Path(tempfile.mkdtemp(prefix="lpslurm", dir="/tmp"))
        self.procs: list[subprocess.Popen] = []
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.prefix: list[str] = []   # how client commands reach the controller

    def _write_conf(self, controller: str, nodes: list[str], ports: tuple[int, int]) -> None:
        r = self.root
        self.conf.write_text(f"""ClusterName=lpregtest
SlurmctldHost={controller}
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={self.sockets}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
KillWait=60
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
""" + "".join(f"NodeName={n} CPUs={os.cpu_count()} RealMemory=8000 State=UNKNOWN\n" for n in nodes)
            + f"PartitionName=debug Nodes={','.join(n.split()[0] for n in nodes)} Default=YES "
              "MaxTime=INFINITE State=UP\n")

    def _start_munge(self) -> None:
        r = self.root
        for d in ("state", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # a path socket: reachable from every network namespace
        self.procs.append(subprocess.Popen(
            [_sbin("munged"), "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={r}/munge/munged.pid", f"--log-file={r}/munge/munged.log", f"--seed-file={r}/munge/seed"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1)

    @property
    def munge_socket(self) -> Path:
        return self.sockets / "munge.socket"

    def start(self) -> SlurmCluster:
        self._start_munge()
        host = socket.gethostname()
        (self.sockets / f"spool-{host}").mkdir(parents=True, exist_ok=True)
        self._write_conf(host, [host], (_free_port(), _free_port()))
        for daemon in ("slurmctld", "slurmd"):
            self.procs.append(subprocess.Popen([_sbin(daemon), "-D", "-f", str(self.conf)], env=self.env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self._wait_idle(1)
        return self

    def _wait_idle(self, nodes: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if len(states) == nodes and all(s in ("idle", "mixed", "allocated") for s in states):
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"slurm did not come up; logs in {self.root / 'log'}")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([*self.prefix, *cmd], capture_output=True, text=True, env=self.env, timeout=60)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr}")
        return r

    def wait(self, pred, timeout: float, what: str) -> None:
        """Poll ``pred()`` every half second until it is true. AssertionError naming ``what``
        after ``timeout`` s, or at once when a Slurm daemon logged a fatal error (a job that
        cannot start is requeued forever otherwise)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            if fatal := self.daemon_fatal():
                raise AssertionError(f"while waiting for {what}: {fatal}")
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}")

    def daemon_fatal(self) -> str | None:
        """The first ``fatal`` line of this cluster's Slurm logs, with its file, or None."""
        for log in sorted((self.root / "log").glob("*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if "fatal:" in line:
                    return f"{log.name}: {line.strip()}"
        return None

    def job_state(self, job_id: str) -> str:
        return self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip()

    def stop(self) -> None:
        self.run("scancel", "--user", os.environ.get("USER", "root"), check=False)
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []
        shutil.rmtree(self.sockets, ignore_errors=True)


class TwoNodeSlurmCluster(SlurmCluster):
    """Two nodes, each in its own network and UTS namespace (module docstring)."""

    NAMES = ("lpr-n0", "lpr-n1")
    ADDRS = ("10.251.0.1", "10.251.0.2")
    IFNAME = "lpr0"   # the veth end inside each namespace (GLOO_SOCKET_IFNAME if needed)

    def __init__(self, root: Path):
        super().__init__(root)
        self.ns = [f"lpr{os.getpid()}n{i}" for i in range(2)]
        self.prefix = self.on_node(0)

    def on_node(self, i: int, *cmd: str) -> list[str]:
        """``cmd`` run on node ``i``: in its network namespace, with its hostname and its
        ``/etc/hosts`` (``nsenter`` rather than ``ip netns exec``, which would remount
        ``/sys`` and hide the cgroup mounts slurmd needs)."""
        hosts = Path("/etc/netns") / self.ns[i] / "hosts"
        script = f'hostname {self.NAMES[i]} && mount --bind {hosts} /etc/hosts && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.ns[i]}", "unshare", "--uts", "--mount", "--propagation",
                "private", "sh", "-c", script, "sh", *cmd]

    def _network_up(self) -> None:
        a, b = self.ns
        va, vb = f"{a}v", f"{b}v"  # unique names in this namespace until moved
        hosts = "127.0.0.1 localhost\n" + "".join(f"{ip} {n}\n" for ip, n in zip(self.ADDRS, self.NAMES, strict=True))
        cmds = [["ip", "netns", "add", a], ["ip", "netns", "add", b],
                ["ip", "link", "add", va, "type", "veth", "peer", "name", vb],
                ["ip", "link", "set", va, "netns", a], ["ip", "link", "set", vb, "netns", b]]
        for ns, v, ip in ((a, va, self.ADDRS[0]), (b, vb, self.ADDRS[1])):
            cmds += [["ip", "-n", ns, "link", "set", v, "name", self.IFNAME],
                     ["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", self.IFNAME],
                     ["ip", "-n", ns, "link", "set", self.IFNAME, "up"], ["ip", "-n", ns, "link", "set", "lo", "up"]]
        for cmd in cmds:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                self._network_down()
                raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
        for ns in self.ns:
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)

    def _network_down(self) -> None:
        for ns in self.ns:
            # whatever a job left running in the namespace was started by this cluster
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)

    def start(self) -> TwoNodeSlurmCluster:
        self._network_up()
        self._start_munge()
        for n in self.NAMES:
            (self.sockets / f"spool-{n}").mkdir(parents=True, exist_ok=True)
        nodes = [f"{n} NodeAddr={ip} NodeHostname={n}" for n, ip in zip(self.NAMES, self.ADDRS, strict=True)]
        self._write_conf(f"{self.NAMES[0]}({self.ADDRS[0]})", nodes, (_free_port(), _free_port()))
        quiet = dict(env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(subprocess.Popen(self.on_node(0, _sbin("slurmctld"), "-D", "-f", str(self.conf)), **quiet))
        for i, name in enumerate(self.NAMES):
            self.procs.append(subprocess.Popen(
                self.on_node(i, _sbin("slurmd"), "-D", "-N", name, "-f", str(self.conf)), **quiet))
        self._wait_idle(2)
        return self

    def stop(self) -> None:
        super().stop()
        self._network_down()
