"""Starting the train service as a process of its own, on one rank or several (torchrun), and waiting for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def command(ranks: int, args: list[str]) -> list[str]:
    """`python -m train_service ARGS`, or under torchrun with `ranks` processes on this machine."""
    if ranks <= 1:
        return [sys.executable, "-m", "train_service", *args]
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--standalone", f"--nproc-per-node={ranks}", "-m", "train_service", *args]


def spawn(
    ranks: int,
    args: list[str],
    log: IO | None = None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.Popen:
    """The service in a new process group (so `stop` reaches every rank)."""
    return subprocess.Popen(
        command(ranks, args),
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        start_new_session=True,
    )


def wait_serving(address: str, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    """Until the service's health check says SERVING; raises if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"train service exited with {proc.returncode}")
        try:
            with grpc.insecure_channel(address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"train service at {address} not serving after {timeout} s")


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM to the whole process group (a graceful drain), SIGKILL if it outlasts `timeout`."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode
