"""A `foreseer serve` process on a free loopback port, for the benchmarks that measure a server from outside."""

from __future__ import annotations

import contextlib
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx


@dataclass
class ServerProcess:
    process: subprocess.Popen
    base_url: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(process: subprocess.Popen, base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ValueError(f"the server exited with status {process.returncode} before it was ready")
        try:
            if httpx.get(f"{base_url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise ValueError(f"the server was not ready after {timeout_s:.0f} s")


@contextlib.contextmanager
def serve(args: list[str], startup_timeout_s: float = 600.0, label: str = "server") -> Iterator[ServerProcess]:
    """`foreseer serve` with `args` (engine and server flags), ready to take requests; terminated on the way out."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "foreseer.cli", "serve", "--port", str(port), "--log-level", "warning", *args]
    print(f"{label}: {shlex.join(command)}", flush=True)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        wait_ready(process, base_url, startup_timeout_s)
        yield ServerProcess(process, base_url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
