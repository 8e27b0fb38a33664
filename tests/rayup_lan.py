"""A throwaway LAN of "hosts" on this machine, for `ray up` with Ray's local (on-prem) provider.

Each host is what Ray's launcher expects of an edge box, made from Linux namespaces (root only):
- its own network namespace with one address on a private /24, wired to a bridge (the "switch");
  the machine itself is the operator's laptop at .1, so `ray up` runs unchanged from here;
- its own sshd (Debian's openssh-server) on port 22 of that address, in the foreground (``-D -e``),
  with host keys and the client key made here; no port clashes with anything else on the machine;
- its own PID namespace, whose init is that sshd: `ray stop` (which Ray runs on every host) only
  sees that host's processes, and ending the sshd by PID ends every process the host started;
- its own home (a folder bound over /root) and /tmp/ray, as separate machines have.

Nothing here is edgebatch: the test drives Ray's own `ray up`, `ray exec`, `ray down` against it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
NEEDED = ("ip", "unshare", "nsenter", "ssh", "ssh-keygen", "rsync")


def missing_tools() -> list[str]:
    """What this machine lacks to build the LAN (root, sshd, iproute2, rsync...)."""
    missing = [] if os.geteuid() == 0 else ["root"]
    if not os.access(SSHD, os.X_OK):
        missing.append("sshd (apt-get install openssh-server)")
    missing += [t for t in NEEDED if shutil.which(t) is None]
    if not missing and subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount", "--mount-proc", "true"],
                                      capture_output=True).returncode != 0:
        missing.append("network, PID and mount namespaces (CAP_SYS_ADMIN, CAP_NET_ADMIN)")
    return missing


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


@dataclass
class Host:
    name: str  # network namespace name
    ip: str
    home: Path
    root: Path
    process: subprocess.Popen | None = None  # `unshare`: its child, the sshd, is the host's PID 1

    @property
    def init_pid(self) -> int:
        """The host's PID 1 (its sshd), as seen from the machine."""
        import psutil

        assert self.process is not None
        children = psutil.Process(self.process.pid).children()
        if not children:
            raise RuntimeError(f"host {self.ip} has no init process (see {self.root / 'sshd.log'})")
        return children[0].pid

    def run(self, command: str, timeout_s: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """A login shell on the host, as an operator logged in there would have (not through SSH, so
        the output is only the command's)."""
        exports = "".join(f"export {k}={_quote(v)}; " for k, v in (env or {}).items())
        return subprocess.run(["nsenter", "-t", str(self.init_pid), "-n", "-m", "-p", "--",
                               "env", "-i", "HOME=/root", "USER=root", "LOGNAME=root", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                               "bash", "-lc", exports + command],
                              capture_output=True, text=True, timeout=timeout_s)


def _quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


@dataclass
class Lan:
    """``size`` hosts at 10.213.N.2 .. 10.213.N.(size+1); ``client_ip`` is this machine."""

    workdir: Path
    size: int
    hosts: list[Host] = field(default_factory=list)
    subnet: int = 0
    key: Path = field(init=False)

    def __post_init__(self) -> None:
        self.key = self.workdir / "client_key"

    @property
    def bridge(self) -> str:
        return f"rayup{self.subnet}br"

    @property
    def client_ip(self) -> str:
        return f"10.213.{self.subnet}.1"

    def _pick_subnet(self) -> int:
        taken = _run("ip", "-4", "-o", "addr").stdout + _run("ip", "-4", "route").stdout
        free = [n for n in range(20, 250) if f"10.213.{n}." not in taken and not Path(f"/run/netns/rayup{n}h2").exists()]
        if not free:
            raise RuntimeError("no free 10.213.N.0/24 subnet for the test LAN")
        return random.choice(free)

    def start(self, deadline_s: float = 30) -> Lan:
        self.workdir.mkdir(parents=True, exist_ok=True)
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        self.subnet = self._pick_subnet()
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.client_ip}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
        Path("/tmp/ray").mkdir(exist_ok=True)  # the mount point of each host's own /tmp/ray
        for i in range(2, self.size + 2):
            self.hosts.append(self._start_host(i))
        deadline = time.monotonic() + deadline_s
        for host in self.hosts:
            while not _answers(host.ip, 22):
                if time.monotonic() > deadline or host.process.poll() is not None:
                    raise RuntimeError(f"sshd of host {host.ip} did not start: {(host.root / 'sshd.log').read_text()[-800:]}")
                time.sleep(0.1)
        return self

    def _start_host(self, i: int) -> Host:
        ns, ip = f"rayup{self.subnet}h{i}", f"10.213.{self.subnet}.{i}"
        root = self.workdir / ip
        home, raytmp = root / "home", root / "tmp-ray"
        shutil.copytree("/etc/skel", home, symlinks=True)  # what a new user's home holds (.bashrc, .profile)
        raytmp.mkdir()
        (home / ".ssh").mkdir(mode=0o700)
        shutil.copy(self.key.with_suffix(".pub"), home / ".ssh" / "authorized_keys")
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "host_key"))
        (root / "sshd_config").write_text(
            f"ListenAddress {ip}:22\nHostKey {root / 'host_key'}\nAuthorizedKeysFile {root / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nUseDNS no\nPidFile none\nMaxStartups 100\nMaxSessions 100\n"
            "Subsystem sftp internal-sftp\n")
        shutil.copy(self.key.with_suffix(".pub"), root / "authorized_keys")
        _run("ip", "netns", "add", ns)
        veth = f"rayup{self.subnet}v{i}"
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "link", "set", veth, "master", self.bridge, "up")
        for cmd in (("addr", "add", f"{ip}/24", "dev", "eth0"), ("link", "set", "eth0", "up"),
                    ("link", "set", "lo", "up"), ("route", "add", "default", "via", self.client_ip)):
            _run("ip", "-n", ns, *cmd)
        # the machine's Python stays installed on every host where it lives under /root (pyenv)
        carried = [_top_under_root(Path(sys.base_prefix).resolve())]
        binds = "".join(f"mkdir -p {home / c} && mount --bind /root/{c} {home / c} && " for c in carried if c)
        boot = (f"{binds}mount --rbind {home} /root && mount --bind {raytmp} /tmp/ray && "
                f"exec {SSHD} -D -e -f {root / 'sshd_config'}")
        log = open(root / "sshd.log", "w")  # the sshd child keeps writing it
        process = subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount",
             "--mount-proc", "--propagation", "private", "sh", "-c", boot],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_end_with_parent)
        return Host(name=ns, ip=ip, home=home, root=root, process=process)

    def stop(self) -> None:
        """End each host's PID 1 (by PID: the kernel ends every process of that host with it), then
        remove the namespaces and the bridge."""
        for host in self.hosts:
            if host.process is not None and host.process.poll() is None:
                try:
                    os.kill(host.init_pid, signal.SIGKILL)
                except (RuntimeError, ProcessLookupError, Exception):
                    pass
                host.process.send_signal(signal.SIGTERM)
                try:
                    host.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    host.process.kill()
                    host.process.wait(timeout=10)
            _run("ip", "netns", "del", host.name, check=False)
        if self.subnet:
            _run("ip", "link", "del", self.bridge, check=False)


def _end_with_parent() -> None:
    """SIGTERM to `unshare` if the test process dies (even by SIGKILL): it then ends the host."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _top_under_root(path: Path) -> str | None:
    """``.pyenv`` for /root/.pyenv/versions/3.11.7; None outside /root."""
    parts = path.parts
    return parts[2] if len(parts) > 2 and parts[:2] == ("/", "root") else None


def _answers(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=0.5):
            return True
    except OSError:
        return False
