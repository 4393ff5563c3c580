"""The train service on two CPU ranks (torchrun, gloo): FSDP2-sharded base, data-parallel passes. Through the client
it computes what one rank computes; checkpoints move between layouts; a dead rank stops the group within seconds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import REPO

import bios
from bios import types
from bios.v1 import train_pb2, train_pb2_grpc
from train_service import launch

MODEL = "ultrasafe/usf-mini"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_args(port: int, checkpoints: Path) -> list[str]:
    return [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--checkpoint-dir",
        str(checkpoints),
        "--device",
        "cpu",
    ]


def start(ranks: int, checkpoints: Path, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {"HF_HUB_OFFLINE": "1", "BIOS_DRAIN_SECONDS": "5", "OMP_NUM_THREADS": "1"}
    proc = launch.spawn(ranks, server_args(port, checkpoints), open(log, "w"), env, cwd=REPO)
    launch.wait_serving(f"127.0.0.1:{port}", proc)
    return proc, port


stop = launch.stop


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A two-rank and a one-rank train service over one checkpoint directory: {ranks: client}."""
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    logs = tmp_path_factory.mktemp("logs")
    procs, clients = [], {}
    try:
        for ranks in (2, 1):
            proc, port = start(ranks, checkpoints, logs / f"ranks{ranks}.log")
            procs.append(proc)
            clients[ranks] = bios.ServiceClient(train_address=f"127.0.0.1:{port}", render_address="unused:0")
        yield clients
    finally:
        for client in clients.values():
            client.close()
        for proc in procs:
            stop(proc)


def data(seed: int, n: int = 3, length: int = 24) -> list[types.Datum]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(150_000) for _ in range(length + 1)]
        weights = [rng.random() for _ in range(length)]
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(ids[:-1]),
                loss_fn_inputs={"target_tokens": ids[1:], "weights": weights},
            )
        )
    return out


def train_two_sessions(client) -> dict[int, list[float]]:
    """Two sessions training at once (threads), each 4 steps on its own data; then a forward of each."""
    models = {seed: client.create_lora_training_client(base_model=MODEL, rank=4, seed=seed) for seed in (1, 2)}
    out: dict[int, list[float]] = {}

    def run(seed: int) -> None:
        losses = [models[seed].train(data(seed), learning_rate=1e-2).loss for _ in range(4)]
        forward = models[seed].forward(data(seed)).result()
        out[seed] = losses + [x for o in forward.loss_fn_outputs for x in o["logprobs"].data]

    threads = [threading.Thread(target=run, args=(seed,)) for seed in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


def test_two_ranks_train_two_concurrent_sessions_as_one_rank_does(servers):
    two, one = train_two_sessions(servers[2]), train_two_sessions(servers[1])
    for seed in (1, 2):
        assert len(two[seed]) == 4 + 3 * 24
        assert two[seed] == pytest.approx(one[seed], rel=1e-5, abs=1e-4)
        assert two[seed][3] < two[seed][0]  # it learns


@pytest.mark.parametrize("saved_on,loaded_on", [(2, 1), (1, 2)])
def test_a_checkpoint_moves_between_one_and_two_ranks(servers, saved_on, loaded_on):
    source = servers[saved_on].create_lora_training_client(base_model=MODEL, rank=4, seed=7)
    for _ in range(2):
        source.train(data(7), learning_rate=1e-2)
    state = source.save_state(name=f"from-{saved_on}-ranks").result()
    weights = source.save_weights_for_sampler(name=f"weights-from-{saved_on}-ranks").result()
    want = [o["logprobs"].data for o in source.forward(data(8)).result().loss_fn_outputs]

    loaded = servers[loaded_on].create_training_client_from_state_with_optimizer(state.path)
    assert loaded.get_info().step == 2
    got = [o["logprobs"].data for o in loaded.forward(data(8)).result().loss_fn_outputs]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-5, abs=1e-5)
    # the optimizer state came along: one more step is the same step on both
    assert loaded.train(data(7), learning_rate=1e-2).loss == pytest.approx(
        source.train(data(7), learning_rate=1e-2).loss, rel=1e-5
    )

    prompt = types.ModelInput.from_ints(data(9)[0].model_input.to_ints()[:10])
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=4)
    sampled = {
        ranks: servers[ranks]
        .create_sampling_client(model_path=weights.path)
        .sample(prompt, params, num_samples=2)
        .result()
        for ranks in (1, 2)
    }
    assert [s.tokens for s in sampled[1].sequences] == [s.tokens for s in sampled[2].sequences]
    for a, b in zip(sampled[1].sequences, sampled[2].sequences):
        assert a.logprobs == pytest.approx(b.logprobs, rel=1e-4, abs=1e-4)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for proc_dir in Path("/proc").iterdir():
        if proc_dir.name.isdigit():
            try:
                ppid = int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc_dir.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def rank_pids(group: subprocess.Popen) -> dict[int, int]:
    """RANK -> pid of the worker processes under a torchrun (read from their environment)."""
    out = {}
    for pid in descendants(group.pid):
        try:
            env = dict(
                line.split("=", 1)
                for line in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
                if "=" in line
            )
        except (OSError, UnicodeDecodeError):
            continue
        if "RANK" in env and "LOCAL_RANK" in env:
            out[int(env["RANK"])] = pid
    return out


def unavailable_within(port: int, seconds: float) -> float:
    """Calls a train RPC until it answers UNAVAILABLE; the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                train_pb2_grpc.TrainServiceStub(channel).ListCheckpoints(train_pb2.ListCheckpointsRequest(), timeout=2)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"train RPCs still answered {seconds} s after a rank died")


def no_process_left(group: subprocess.Popen, pids: list[int], seconds: float = 60) -> None:
    group.wait(seconds)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()], "a rank outlived its group"


def test_killing_rank_1_makes_calls_unavailable_within_seconds(tmp_path):
    proc, port = start(2, tmp_path / "ckpt", tmp_path / "log")
    try:
        client = bios.ServiceClient(train_address=f"127.0.0.1:{port}", render_address="unused:0")
        tc = client.create_lora_training_client(base_model=MODEL, rank=4)
        tc.train(data(1), learning_rate=1e-2)
        pids = rank_pids(proc)
        assert set(pids) == {0, 1}
        os.kill(pids[1], signal.SIGKILL)
        assert unavailable_within(port, 10) < 10
        no_process_left(proc, list(pids.values()))
        assert proc.returncode != 0
    finally:
        stop(proc)


def test_without_torchrun_rank_0_notices_a_dead_rank_itself(tmp_path):
    """Two ranks started by hand (no torchrun agent to tear the group down, as across nodes): rank 0's heartbeat
    finds the dead rank, it stops serving and exits, so the group can be restarted."""
    port, master = free_port(), free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(master),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
    }
    ranks = [
        subprocess.Popen(
            launch.command(1, server_args(port, tmp_path)),
            cwd=REPO,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=open(tmp_path / f"rank{r}.log", "w"),
            stderr=subprocess.STDOUT,
        )
        for r in (0, 1)
    ]
    try:
        launch.wait_serving(f"127.0.0.1:{port}", ranks[0])
        ranks[1].kill()
        assert unavailable_within(port, 10) < 10
        assert ranks[0].wait(30) == 1
    finally:
        for r in ranks:
            if r.poll() is None:
                r.kill()
                r.wait(10)


def test_sigterm_to_torchrun_drains_and_checkpoints_the_group(tmp_path):
    """What the kubelet does at a rollout: SIGTERM to torchrun, which forwards it to every rank. Rank 0 drains and
    checkpoints every open model, then stops the others; the group exits 0."""
    checkpoints = tmp_path / "ckpt"
    proc, port = start(2, checkpoints, tmp_path / "log")
    try:
        client = bios.ServiceClient(train_address=f"127.0.0.1:{port}", render_address="unused:0")
        tc = client.create_lora_training_client(base_model=MODEL, rank=4)
        tc.train(data(1), learning_rate=1e-2)
        pids = list(rank_pids(proc).values())
        proc.send_signal(signal.SIGTERM)  # torchrun alone, not its process group
        no_process_left(proc, pids)
        log = (tmp_path / "log").read_text()
        # torchrun itself exits 1 on SIGTERM (SignalException), whatever its ranks do; no rank may have failed.
        assert "drained: checkpointed 1 open models" in log and "ChildFailedError" not in log, log[-3000:]
        assert (checkpoints / tc.model_id / "state" / "drain-step1" / "adapter_model.safetensors").is_file()
    finally:
        stop(proc)
