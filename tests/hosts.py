"""Test hosts as network namespaces: each host has its own network stack (its own 127.0.0.1 and one
address on a private bridge), and shares the file system and this environment with the tests.

    with network_hosts(["server", "worker1"]) as hosts:
        hosts["server"].start([...], log=...)        # runs inside the namespace
        urllib.request.urlopen(f"http://{hosts['server'].address}:4200/...")   # the tests reach every host

Addresses come from 10.213.0.0/16 and exist only in this sandbox. Every process started in a host
and every namespace, veth and bridge are removed on exit, also when a test fails; namespaces left
by a killed test session are swept at the next start.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PREFIX = "agt"  # namespaces agt-<owner pid>-<name>; links agt<octet>b (bridge), agt<octet>v<i> (veth)


@dataclass(frozen=True)
class Host:
    name: str  # the namespace
    address: str  # on the bridge; the tests (root namespace) and every other host reach it

    def command(self, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *map(str, args)]

    def run(self, args: list[str], *, cwd: Path, env: dict | None = None, check: bool = True, timeout: float = 600):
        result = subprocess.run(self.command(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{args} on {self.name} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def start(self, args: list[str], *, cwd: Path, env: dict | None = None, log: Path) -> subprocess.Popen:
        """A long-running process in this host, output to log, in a process group of its own."""
        with log.open("a") as handle:
            return subprocess.Popen(
                self.command(args), cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def kill_all(self) -> None:
        """SIGKILL every process in the namespace (a crashed host), until none is left."""
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        raise AssertionError(f"processes in {self.name} survived SIGKILL: {self.pids()}")


@contextlib.contextmanager
def network_hosts(names: list[str]) -> Iterator[dict[str, Host]]:
    sweep_leftovers()
    octet = free_octet()
    bridge = f"{PREFIX}{octet}b"
    created: list[Host] = []
    try:
        ip("link", "add", bridge, "type", "bridge")
        ip("link", "set", bridge, "alias", f"{PREFIX}-owner-{os.getpid()}")
        ip("addr", "add", f"10.213.{octet}.1/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for index, name in enumerate(names, start=1):
            host = Host(name=f"{PREFIX}-{os.getpid()}-{name}", address=f"10.213.{octet}.{10 + index}")
            outside, inside = f"{PREFIX}{octet}v{index}", f"{PREFIX}{octet}p{index}"
            ip("netns", "add", host.name)
            created.append(host)
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            ip("link", "set", outside, "master", bridge)
            ip("link", "set", outside, "up")
            ip("link", "set", inside, "netns", host.name)
            ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", inside)
            ip("-n", host.name, "link", "set", inside, "up")
            ip("-n", host.name, "link", "set", "lo", "up")
        yield {name: host for name, host in zip(names, created, strict=True)}
    finally:
        for index, host in enumerate(created, start=1):
            host.kill_all()
            ip("link", "del", f"{PREFIX}{octet}v{index}", check=False)  # both ends, now (the netns's own is lazy)
            ip("netns", "del", host.name, check=False)
        ip("link", "del", bridge, check=False)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def free_octet() -> int:
    """A third octet no interface of this machine uses yet (test sessions may run side by side)."""
    used = ip("-o", "-4", "addr", "show").stdout
    for _ in range(100):
        octet = random.randrange(1, 255)
        if f"10.213.{octet}." not in used:
            return octet
    raise AssertionError("no free 10.213.x.0/24 subnet")


def sweep_leftovers() -> None:
    """Remove the namespaces and bridges of test sessions that no longer run (killed before cleanup)."""
    for line in ip("netns", "list").stdout.splitlines():
        name = line.split()[0]
        parts = name.split("-", 2)
        if len(parts) == 3 and parts[0] == PREFIX and parts[1].isdigit() and not pid_alive(int(parts[1])):
            Host(name=name, address="").kill_all()
            ip("netns", "del", name, check=False)
    for line in ip("-o", "link", "show", "type", "bridge").stdout.splitlines():
        device = line.split(":")[1].strip()
        owner = line.partition(f"alias {PREFIX}-owner-")[2].split()
        if device.startswith(PREFIX) and owner and owner[0].isdigit() and not pid_alive(int(owner[0])):
            ip("link", "del", device, check=False)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
