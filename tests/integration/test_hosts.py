"""The test hosts (network namespaces) that the scale-out tests run servers and workers in."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_until
from tests.hosts import PREFIX, Host, network_hosts


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def links() -> str:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout


def reaches(host: Host, url: str, cwd: Path) -> bool:
    fetch = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=2)"
    return host.run([sys.executable, "-c", fetch], cwd=cwd, check=False).returncode == 0


def test_hosts_reach_each_other_keep_their_own_loopback_and_leave_nothing_behind(tmp_path: Path):
    port = free_port()
    server = [sys.executable, "-m", "http.server", str(port), "--directory", str(tmp_path)]
    (tmp_path / "hello.txt").write_text("hello")
    with pytest.raises(RuntimeError, match="a failing test"), network_hosts(["a", "b"]) as hosts:
        a, b = hosts["a"], hosts["b"]
        served = a.start([*server, "--bind", a.address], cwd=tmp_path, log=tmp_path / "a.log")
        url = f"http://{a.address}:{port}/hello.txt"
        wait_until(lambda: reaches(b, url, tmp_path), what="a's server from b", seconds=60, process=served,
                   log=tmp_path / "a.log")  # fmt: skip
        assert urllib.request.urlopen(url, timeout=5).read() == b"hello"  # and from the tests' own namespace
        # Each host's 127.0.0.1 is its own: b cannot reach a server on a's loopback.
        loopback = a.start([*server, "--bind", "127.0.0.1"], cwd=tmp_path, log=tmp_path / "lo.log")
        local = f"http://127.0.0.1:{port}/hello.txt"
        wait_until(lambda: reaches(a, local, tmp_path), what="a's loopback server", seconds=60, process=loopback,
                   log=tmp_path / "lo.log")  # fmt: skip
        assert not reaches(b, local, tmp_path)
        assert {served.pid, loopback.pid} <= set(a.pids())
        names, octet = [a.name, b.name], a.address.split(".")[2]
        raise RuntimeError("a failing test")  # cleanup must not depend on the test passing
    assert served.wait(timeout=10) == -9 and loopback.wait(timeout=10) == -9
    assert not [name for name in names if name in namespaces()]
    assert f"{PREFIX}{octet}" not in links()  # bridge and veths are gone
