"""Ray's cluster launcher (`ray up`, `ray submit`, `ray down`) used for real on this machine,
over SSH to a loopback address, without touching anything outside the test.

`ray up` and `ray down` run `ray stop` on the node, which stops every Ray process it can see, and
the launcher always connects on port 22 and starts the head on Ray's fixed ports (6379, 8265,
...). So the sandbox is a set of Linux namespaces of its own (:func:`start_sandbox`):

- a PID namespace: `ray stop` sees only the sandbox's processes; its first process (an init that
  reaps orphans) takes every other one with it when it is killed;
- a network namespace with only a loopback interface: sshd listens on 127.0.0.3:22 and the head
  on its usual ports without meeting anyone else's;
- a mount namespace: a fresh /tmp (Ray's /tmp/ray, the launcher's SSH control sockets and
  config cache), in which only the test's own folder is the host's, and an /etc/passwd with one
  more user, the SSH user, whose home is a folder of the test (uid 0: the cluster runs as root).

Commands run inside it through `nsenter`, with that home as HOME; the test's process keeps its
own view and reads what the cluster wrote in the test's folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pipeline.cluster_harness import FOREIGN_ENV, VENV_BIN, Deadline, Processes, tail

SSH_HOST = "127.0.0.3"
SSH_USER = "frnet-launcher"
SSHD = Path("/usr/sbin/sshd")
TOOLS = ("unshare", "nsenter", "ip", "mount", "rsync", "ssh", "ssh-keygen")
SANDBOX_UP_S = 30

# The sandbox's first process: mounts, loopback, sshd, then reaping until it is killed.
INIT = r'''
import os, subprocess, sys, time
shown, passwd, sshd_config = sys.argv[1:4]
held = os.open(shown, os.O_PATH | os.O_DIRECTORY)
def run(*command):
    subprocess.run(command, check=True)
run("mount", "-t", "tmpfs", "frnet-sandbox-tmp", "/tmp")
os.makedirs(shown, exist_ok=True)
run("mount", "--no-canonicalize", "--bind", f"/proc/{os.getpid()}/fd/{held}", shown)
run("mount", "--bind", passwd, "/etc/passwd")
run("ip", "link", "set", "lo", "up")
os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", sshd_config])
print("sandbox ready", flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.5)
'''


def missing() -> str | None:
    """Why the sandbox cannot run here, or None."""
    if not sys.platform.startswith("linux"):
        return "needs Linux namespaces"
    if os.geteuid() != 0:
        return "needs root (unshare --pid --net --mount)"
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not SSHD.exists():
        absent.append(str(SSHD))
    if absent:
        return f"needs {', '.join(absent)} (Debian: apt-get install openssh-server rsync)"
    return None


@dataclass(frozen=True)
class Sandbox:
    init_pid: int  # the sandbox's first process, as this test's PID namespace numbers it
    home: Path  # SSH_USER's home: the head node's home folder
    key: Path  # SSH_USER's private key
    env: dict[str, str]

    def command(self, args: list[str], cwd: Path) -> list[str]:
        """``args`` run inside the sandbox from ``cwd``."""
        return ["nsenter", "--target", str(self.init_pid), "--pid", "--net", "--mount",
                f"--wd={cwd}", "--", *args]

    def ray(self, processes: Processes, name: str, args: list[str], cwd: Path,
            timeout: float) -> tuple[int, str]:
        """The venv's `ray ARGS` inside the sandbox: (exit status, output)."""
        command = self.command([str(VENV_BIN / "ray"), *args], cwd)
        return processes.run(name, command, self.env, timeout)


def start_sandbox(processes: Processes, folder: Path, deadline: Deadline) -> Sandbox:
    """The namespaces described above, with sshd for SSH_USER running. ``folder`` (the test's)
    is what the sandbox sees of the host's /tmp; SSH_USER's home is FOLDER/sandbox/home."""
    root = folder / "sandbox"
    home, sshd_dir = root / "home", root / "sshd"
    (home / ".ssh").mkdir(parents=True)
    sshd_dir.mkdir()
    (home / ".bashrc").touch()
    key = home / ".ssh" / "id_ed25519"
    for path in (key, sshd_dir / "host_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    shutil.copy(key.with_suffix(".pub"), sshd_dir / "authorized_keys")
    (sshd_dir / "sshd_config").write_text("\n".join([
        f"ListenAddress {SSH_HOST}:22", f"HostKey {sshd_dir / 'host_key'}",
        f"AuthorizedKeysFile {sshd_dir / 'authorized_keys'}", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "StrictModes no",
        "UsePAM no", "PidFile none", "AcceptEnv none", ""]))
    passwd = root / "passwd"
    passwd.write_text(Path("/etc/passwd").read_text().rstrip("\n")
                      + f"\n{SSH_USER}:x:0:0:cluster launcher test:{home}:/bin/bash\n")
    init = root / "sandbox_init.py"
    init.write_text(INIT)
    popen, log_path = processes.start("sandbox", [
        "unshare", "--pid", "--fork", "--mount", "--mount-proc", "--net", "--propagation", "private",
        "--", sys.executable, str(init), str(folder), str(passwd), str(sshd_dir / "sshd_config")],
        {key: value for key, value in os.environ.items() if key not in FOREIGN_ENV})
    up_by = deadline.within(SANDBOX_UP_S, "starting the launcher sandbox")
    while "sandbox ready" not in log_path.read_text(errors="replace"):
        if popen.poll() is not None or up_by.left() < 0.5:
            pytest.fail(f"the sandbox did not start:\n{tail(log_path)}")
        time.sleep(0.2)
    children = Path(f"/proc/{popen.pid}/task/{popen.pid}/children").read_text().split()
    env = {key: value for key, value in os.environ.items() if key not in FOREIGN_ENV}
    env.update(HOME=str(home), USER=SSH_USER, LOGNAME=SSH_USER, RAY_USAGE_STATS_ENABLED="0",
               PATH=os.pathsep.join([str(VENV_BIN), env.get("PATH", "")]))
    return Sandbox(int(children[0]), home, key, env)
