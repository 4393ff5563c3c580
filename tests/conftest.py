"""Shared fixtures: real gRPC servers on loopback, the shared fixtures directory, clients."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"
SEEDS = SHARED / "seeds"
NODE_DIR = REPO / "clients" / "node"


def need_fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES}: parity tests need ../shared/fixtures")
    return FIXTURES


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return need_fixtures()


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    """Both services started once on loopback ports in a background loop: (render_address, train_address)."""
    from bios.futures import LoopThread
    from render_service import server as render_server
    from train_service import server as train_server

    loop = LoopThread.named("test-services")
    render = loop.run(render_server.start("127.0.0.1", 0))
    train = loop.run(train_server.start("127.0.0.1", 0, str(tmp_path_factory.mktemp("checkpoints"))))
    yield f"127.0.0.1:{render.port}", f"127.0.0.1:{train.port}", train
    loop.run(render.stop(None))
    loop.run(train.stop(None))


@pytest.fixture(scope="session")
def client(services):
    import bios

    render_address, train_address, _ = services
    service_client = bios.ServiceClient(train_address=train_address, render_address=render_address)
    yield service_client
    service_client.close()


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    from bios_cookbook import tokenizer_utils

    return tokenizer_utils.get_tokenizer("ultrasafe/usf-mini")


@pytest.fixture(scope="session")
def node_client() -> str:
    """The node executable, with clients/node/node_modules installed (npm ci from the lock when present)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are needed on PATH for the Node.js client test")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        command = [npm, "ci" if (NODE_DIR / "package-lock.json").exists() else "install", "--no-audit", "--no-fund"]
        try:
            done = subprocess.run(command, cwd=NODE_DIR, capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            pytest.skip(f"`{' '.join(command[1:])}` in {NODE_DIR} timed out after 180 s: is the npm registry reachable?")
        if done.returncode != 0:
            pytest.skip(f"`{' '.join(command[1:])}` in {NODE_DIR} failed (npm registry unreachable?):\n"
                        f"{done.stderr[-2000:]}")
    return node
