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


# `make test-fast` leaves these out (-m "not slow and not network"); `make test` runs everything.
SLOW = {  # module: why it takes long
    "test_docs": "runs every guide page's commands, each in fresh processes",
    "test_cli": "every CLI command in a subprocess, each starting the services",
    "test_tinker_cookbook": "tinker-cookbook recipes end to end, in separate processes",
    "test_tinker_gateway": "the tinker SDK against a gateway and a train service",
    "test_distributed": "torchrun with two ranks, killed and drained",
    "test_gpu_check": "the GPU check script on CPU, once alone and once under torchrun",
    "test_kill_drill": "kill -9 trials of a train service process",
    "test_exit_drill": "scripts that exit with work unawaited, in subprocesses",
    "test_render_load": "32 clients against a render service",
    "test_seeds": "every seed example, on the embedded default and on separate services",
    "test_operate": "SIGTERM and restart of service processes",
    "test_training_semantics": "training runs to convergence on the tiny model",
    "test_tiny_model": "training runs to convergence on the tiny model",
    "test_train_service": "training and sampling through a train service",
    "test_coalescing": "many sessions' passes through the engine",
    "test_isolation": "interleaved sessions and tenants, each against a reference run",
    "test_engine": "the engine's passes on the tiny model",
    "test_sampler": "decoding on the tiny model",
    "test_losses": "every loss against a reference, through the engine",
    "test_client": "the client against both services, retries and restarts",
    "test_render_service": "render worker processes",
    "test_fast_tokenize": "every BMP code point and random corpora, through each fixture tokenizer",
    "test_bridge": "full renders against the bridge, per family",
    "test_builtin_tokenizer": "builds the Qwen3 tokenizer from its BPE ranks, fresh and cached",
    "test_k8s": "kubectl renders every overlay; strict schema validation",
    "test_placement": "the Node client routing calls by id",
    "test_bad_inputs": "242 bad requests against live services",
    "test_typed_errors": "a render worker process killed and replaced",
    "test_cancel": "cancelled operations against a live train service",
}
NETWORK = {"test_node_client": "npm installs the Node client's dependencies"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SLOW:
            item.add_marker(pytest.mark.slow)
        if module in NETWORK:
            item.add_marker(pytest.mark.network)


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
            pytest.skip(
                f"`{' '.join(command[1:])}` in {NODE_DIR} timed out after 180 s: is the npm registry reachable?"
            )
        if done.returncode != 0:
            pytest.skip(
                f"`{' '.join(command[1:])}` in {NODE_DIR} failed (npm registry unreachable?):\n{done.stderr[-2000:]}"
            )
    return node
