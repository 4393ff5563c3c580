"""The kill drill: the train service as its own process, killed with SIGKILL while it writes checkpoints.

Each trial starts `python -m train_service` on one checkpoint directory, checks what the previous (killed) process
left there, resumes training from the last `latest` state (with its optimizer), then sends training steps and
checkpoint saves back to back without waiting and kills the process at a random moment of that burst. Claims:

* no corrupt or half-listed checkpoint: every listed checkpoint has all its files and loads;
* the hidden leftovers of a write the kill cut short are gone once the service has started again;
* resume reproduces the loss: the loss of every checkpoint at step s equals the loss of an uninterrupted run at s.

    .venv/bin/python tests/reliability/kill_drill.py --trials 10     # the figures in docs/reliability.md
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bios.channel import CHANNEL_OPTIONS
from bios.v1 import train_pb2 as T
from bios.v1 import train_pb2_grpc
from bios.v1 import types_pb2 as Y

REPO = Path(__file__).resolve().parents[2]
MODEL = "ultrasafe/usf-mini"
STEPS_PER_TRIAL = 10  # submitted per trial; the kill comes after 1 to 8 of them
SAVES_OF_LATEST = 5  # overwrites of `latest` after each step: most of the engine's time goes to writes
LOADED_PER_TRIAL = 3  # of a trial's checkpoints, loaded and their loss compared (all are checked for completeness)
TOKENS = list(range(100, 164))
STATE_FILES = {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "meta.json"}


def tensor(values, dtype=Y.DTYPE_INT64):
    import numpy as np

    array = np.asarray(values, dtype=np.int64 if dtype == Y.DTYPE_INT64 else np.float32)
    return Y.Tensor(dtype=dtype, shape=[len(values)], data=array.tobytes())


DATUM = Y.Datum(
    model_input=Y.ModelInput(chunks=[Y.Chunk(encoded_text=Y.EncodedTextChunk(tokens=TOKENS))]),
    loss_fn_inputs={
        "target_tokens": tensor([t + 1 for t in TOKENS]),
        "weights": tensor([1.0] * len(TOKENS), Y.DTYPE_FLOAT32),
    },
)
STEP = [
    dict(forward_backward=T.ForwardBackwardInput(data=[DATUM])),
    dict(optim_step=T.OptimStepRequest(adam_params=Y.AdamParams(learning_rate=2e-3, beta1=0.9, beta2=0.95, eps=1e-8))),
]
LORA = Y.LoraConfig(rank=8, seed=11, train_attn=True, train_mlp=True)


@dataclass
class Report:
    trials: int = 0
    kills_inside_a_write: int = 0  # the killed process left a hidden temporary behind
    leftovers_removed: int = 0  # hidden directories found after a kill and gone after the restart
    checkpoints_verified: int = 0  # listed, complete, loaded, loss compared
    loss_checks: list[tuple[int, float]] = field(default_factory=list)  # (step, loss of a loaded checkpoint)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m train_service` on loopback; started, waited for, killed."""

    def __init__(self, checkpoints: Path):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("BIOS_")} | {"HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "train_service",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--checkpoint-dir",
                str(checkpoints),
                "--metrics-port",
                "0",
                "--device",
                "cpu",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=CHANNEL_OPTIONS)
        self.stub = train_pb2_grpc.TrainServiceStub(self.channel)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=180)
        except grpc.FutureTimeoutError:
            self.process.kill()
            raise RuntimeError(f"train service did not start: {self.process.communicate()[1][-2000:]}") from None
        self.session = self.stub.CreateSession(T.CreateSessionRequest(), timeout=60).session_id

    def operate(self, model_id: str, ops: list[dict], first_seq: int = 0) -> list[T.OperationEvent]:
        requests = [T.OperationRequest(seq=first_seq + k, model_id=model_id, **op) for k, op in enumerate(ops)]
        events = list(self.stub.Operate(iter(requests), timeout=120))
        errors = [e.error.message for e in events if e.WhichOneof("event") == "error"]
        assert not errors, errors
        return events

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)


def hidden_leftovers(checkpoints: Path) -> list[Path]:
    return [p for p in checkpoints.glob("*/*/.*") if p.is_dir()]


def verify(server: Server, checkpoints: Path, report: Report, trial: int) -> None:
    """Every listed checkpoint is complete; the newest `latest` and some of `trial`'s are loaded, their loss noted."""
    listed = server.stub.ListCheckpoints(T.ListCheckpointsRequest(), timeout=60).checkpoints
    mine = sorted(c.path for c in listed if c.name.startswith(f"t{trial}-"))
    chosen = set(random.Random(trial).sample(mine, min(LOADED_PER_TRIAL, len(mine))))
    if latest := newest_latest(listed):
        chosen.add(latest.path)
    for checkpoint in listed:
        model_id, kind, name = checkpoint.path.removeprefix("bios://").split("/")
        files = {p.name for p in (checkpoints / model_id / kind / name).iterdir()}
        if kind == "state" and files != STATE_FILES:
            report.problems.append(f"{checkpoint.path}: files {sorted(files)}")
        if checkpoint.path not in chosen:
            continue
        try:
            model = server.stub.CreateModel(
                T.CreateModelRequest(session_id=server.session, from_state=checkpoint.path, load_optimizer=True),
                timeout=60,
            )
            (event,) = server.operate(model.model_id, [dict(forward=T.ForwardBackwardInput(data=[DATUM]))])
            server.stub.DeleteModel(T.DeleteModelRequest(model_id=model.model_id), timeout=60)
        except (grpc.RpcError, AssertionError) as exc:
            report.problems.append(f"{checkpoint.path}: does not load: {exc}")
            continue
        if model.step != checkpoint.step:
            report.problems.append(f"{checkpoint.path}: listed at step {checkpoint.step}, loads at {model.step}")
        report.loss_checks.append((model.step, event.forward_backward.metrics["loss:sum"]))
        report.checkpoints_verified += 1


def newest_latest(listed) -> T.Checkpoint | None:
    """`latest` of the model that got furthest (each trial's resumed model has a new id, so its own `latest`)."""
    return max((c for c in listed if c.name == "latest"), key=lambda c: c.step, default=None)


def trial(k: int, checkpoints: Path, report: Report, rng: random.Random) -> None:
    left = hidden_leftovers(checkpoints)
    report.kills_inside_a_write += any(p.name.startswith((".tmp-", ".old-")) for p in left)
    server = Server(checkpoints)
    try:
        if remaining := hidden_leftovers(checkpoints):
            report.problems.append(f"trial {k}: leftovers after the restart: {remaining}")
        report.leftovers_removed += len(left)
        verify(server, checkpoints, report, k - 1)
        latest = newest_latest(server.stub.ListCheckpoints(T.ListCheckpointsRequest(), timeout=60).checkpoints)
        request = T.CreateModelRequest(session_id=server.session, base_model=MODEL, lora=LORA)
        if latest:  # resume where the killed process last saved, optimizer included
            request = T.CreateModelRequest(session_id=server.session, from_state=latest.path, load_optimizer=True)
        model = server.stub.CreateModel(request, timeout=60)
        # The burst: steps, each followed by saves (a new name, then `latest` overwritten), none waited for;
        # the kill comes at a random moment of the saves after a random step.
        ops = []
        for s in range(model.step + 1, model.step + STEPS_PER_TRIAL + 1):
            names = (f"t{k}-s{s}", *["latest"] * SAVES_OF_LATEST)
            ops += [*STEP, *(dict(save_state=T.SaveStateRequest(name=name)) for name in names)]
        requests = iter([T.OperationRequest(seq=n, model_id=model.model_id, **op) for n, op in enumerate(ops)])
        kill_after, delay = rng.randint(1, 8), rng.uniform(0.0, 0.06)  # the saves after a step take ~0.1 s
        killed = threading.Event()

        def watch() -> None:
            steps = 0
            try:
                for event in server.stub.Operate(requests, timeout=120):
                    steps += event.WhichOneof("event") == "optim_step"
                    if steps == kill_after:
                        time.sleep(delay)
                        break
            except grpc.RpcError:
                pass
            server.kill()
            killed.set()

        threading.Thread(target=watch, daemon=True).start()
        killed.wait(120)
    finally:
        server.kill()
    report.trials += 1


def reference_losses(steps: int) -> dict[int, float]:
    """The loss after every step of an uninterrupted run of the same service."""
    with tempfile.TemporaryDirectory(prefix="kill-drill-reference-") as tmp:
        server = Server(Path(tmp))
        try:
            model = server.stub.CreateModel(
                T.CreateModelRequest(session_id=server.session, base_model=MODEL, lora=LORA), timeout=60
            ).model_id
            forward = dict(forward=T.ForwardBackwardInput(data=[DATUM]))
            events = server.operate(model, [forward] + [op for _ in range(steps) for op in (*STEP, forward)])
        finally:
            server.kill()
    losses = [e.forward_backward.metrics["loss:sum"] for e in events if e.WhichOneof("event") == "forward_backward"]
    return {s: losses[2 * s] for s in range(steps + 1)}  # forward after step 0, then per step: fb, forward


def drill(trials: int, seed: int = 0, cuts: int = 0, max_trials: int = 0) -> Report:
    """`trials` trials, then more (up to `max_trials`) until `cuts` kills have landed inside a write: where a kill
    lands depends on the machine's speed, and a drill whose kills all fell between writes proves little."""
    started = time.monotonic()
    report, rng = Report(), random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="bios-kill-drill-") as tmp:
        checkpoints = Path(tmp)
        k = 0
        while k < trials or (report.kills_inside_a_write < cuts and k < max_trials):
            trial(k, checkpoints, report, rng)
            k += 1
        left = hidden_leftovers(checkpoints)  # the last kill's, checked by one more start
        report.kills_inside_a_write += any(p.name.startswith((".tmp-", ".old-")) for p in left)
        server = Server(checkpoints)
        try:
            if remaining := hidden_leftovers(checkpoints):
                report.problems.append(f"final restart: leftovers {remaining}")
            report.leftovers_removed += len(left)
            verify(server, checkpoints, report, k - 1)
        finally:
            server.kill()
    reference = reference_losses(max((s for s, _ in report.loss_checks), default=0))
    for step, loss in report.loss_checks:
        if abs(loss - reference[step]) > 1e-5 * max(1.0, abs(reference[step])):
            report.problems.append(f"step {step}: a loaded checkpoint's loss {loss} != uninterrupted {reference[step]}")
    report.seconds = time.monotonic() - started
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report = drill(args.trials, args.seed)
    steps = sorted({s for s, _ in report.loss_checks})
    print(
        f"{report.trials} kill -9 trials in {report.seconds:.0f} s: {report.kills_inside_a_write} killed inside a "
        f"checkpoint write; {report.leftovers_removed} hidden leftovers, all removed at the restart; "
        f"{report.checkpoints_verified} checkpoints loaded (steps {steps[0] if steps else '-'}.."
        f"{steps[-1] if steps else '-'}), every loss equal to the uninterrupted run's; problems: "
        f"{len(report.problems)}"
    )
    for problem in report.problems:
        print("  ", problem)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
