"""tinker-cookbook 0.6.1 recipes, unmodified, on bios: `python -m tinker_cookbook.recipes...` pointed at the gateway
by TINKER_BASE_URL and TINKER_API_KEY, on the tiny stand-in served under a cookbook model name. Bounded: a few
steps, small batches, short samples."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tinker_stack import MODEL, start_stack, tinker_environment, write_registry

from bios.futures import LoopThread

pytest.importorskip("tinker_cookbook")
pytestmark = pytest.mark.timeout(900)
REPO = Path(__file__).resolve().parents[1]


def conversations() -> str:
    import tinker_cookbook

    return str(Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl")


def recipe_env(directory: Path, base_url: str, api_key: str = "tml-bios-test") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINKER_", "HF_"))}
    env.update(tinker_environment(directory, base_url, api_key))
    env["TINKER_COOKBOOK_RUNS_DIR"] = str(directory / "runs")
    return env


def chat_sl(log_path: Path, env: dict[str, str], max_steps: int, resume: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tinker_cookbook.recipes.chat_sl.train",
            f"log_path={log_path}",
            f"model_name={MODEL}",
            f"dataset={conversations()}",
            "batch_size=4",
            f"max_steps={max_steps}",
            "save_every=1",
            "eval_every=0",
            "infrequent_eval_every=0",
            "lora_rank=8",
            "learning_rate=1e-2",
            "lr_schedule=constant",
            "max_length=512",
            f"behavior_if_log_dir_exists={'resume' if resume else 'delete'}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def math_rl(log_path: Path, env: dict[str, str], loss_fn: str, steps: int = 3) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tinker_cookbook.recipes.math_rl.train",
            f"log_path={log_path}",
            f"model_name={MODEL}",
            "env=arithmetic",
            f"loss_fn={loss_fn}",
            "group_size=4",
            "groups_per_batch=4",
            "max_tokens=5",
            f"max_steps={steps}",
            "lora_rank=8",
            "learning_rate=1e-4",
            "eval_every=0",
            "save_every=0",
            "behavior_if_log_dir_exists=delete",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def finished(process: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def metrics(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoints(log_path: Path) -> list[dict]:
    path = log_path / "checkpoints.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cookbook")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BIOS_MODEL_REGISTRY", str(write_registry(directory)))
        loop = LoopThread.named("tinker-cookbook-tests")
        train, gateway = start_stack(loop, str(directory / "checkpoints"))
        yield f"http://127.0.0.1:{gateway.port}"
        loop.run(gateway.stop())
        loop.run(train.stop(None, checkpoint=False))


def test_chat_sl_trains_checkpoints_each_step_and_resumes(gateway_url, tmp_path):
    env, log_path = recipe_env(tmp_path, gateway_url), tmp_path / "chat_sl"
    # First run: stopped (SIGKILL, as a lost machine) once it has saved three steps' checkpoints.
    first = chat_sl(log_path, env, max_steps=30)
    deadline = time.monotonic() + 300
    while len(checkpoints(log_path)) < 3 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    saved = checkpoints(log_path)
    assert len(saved) >= 3 and all(c["state_path"].startswith("tinker://") for c in saved), saved
    assert [c["batch"] for c in saved[:3]] == [1, 2, 3]  # one checkpoint after each step
    resume_at = saved[-1]["batch"]
    before = {m["step"]: m["train_mean_nll"] for m in metrics(log_path) if "train_mean_nll" in m}

    # Second run, same log directory: continues from the last saved step with its weights and Adam state.
    output = finished(chat_sl(log_path, env, max_steps=resume_at + 2, resume=True))
    assert f"Resumed training from {saved[-1]['state_path']}" in output
    after = {m["step"]: m["train_mean_nll"] for m in metrics(log_path) if "train_mean_nll" in m}
    assert sorted(after) == list(range(resume_at + 2))  # steps before the resume point kept, then two more
    assert all(after[s] == before[s] for s in range(resume_at))
    assert after[resume_at + 1] < after[0] * 0.9, after  # the loss falls
    assert checkpoints(log_path)[-1]["name"] == "final"


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo"])
def test_math_rl_arithmetic_runs_with_reward_and_kl_metrics(gateway_url, tmp_path, loss_fn):
    log_path = tmp_path / f"math_rl-{loss_fn}"
    done = math_rl(log_path, recipe_env(tmp_path, gateway_url), loss_fn)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    steps = [m for m in metrics(log_path) if "env/all/reward/total" in m]
    assert [m["step"] for m in steps] == [0, 1, 2]
    for m in steps:
        assert {"optim/kl_sample_train_v1", "optim/kl_sample_train_v2", "grad_norm:mean"} <= set(m)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-4000:]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port} after {seconds} s")


def test_recipes_with_separate_processes_and_api_keys(tmp_path):
    """`python -m train_service` and `python -m tinker_gateway` as their own processes, with API keys."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": {"tml-carol": "carol"}}))
    env = {
        **os.environ,
        "BIOS_MODEL_REGISTRY": str(write_registry(tmp_path)),
        "BIOS_API_KEYS_FILE": str(keys),
        "PYTHONPATH": str(REPO),
    }
    train_port, gateway_port = free_port(), free_port()
    services = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "train_service",
                "--host",
                "127.0.0.1",
                "--port",
                str(train_port),
                "--metrics-port",
                "0",
                "--checkpoint-dir",
                str(tmp_path / "checkpoints"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    ]
    try:
        wait_for_port(train_port, services[0])
        services.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tinker_gateway",
                    "--host",
                    "127.0.0.1",
                    "--tinker-port",
                    str(gateway_port),
                    "--train-address",
                    f"127.0.0.1:{train_port}",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        wait_for_port(gateway_port, services[1])
        url = f"http://127.0.0.1:{gateway_port}"

        output = finished(chat_sl(tmp_path / "chat_sl", recipe_env(tmp_path, url, "tml-carol"), max_steps=3))
        assert "Training completed successfully" in output
        assert [c["name"] for c in checkpoints(tmp_path / "chat_sl")] == ["000001", "000002", "final"]
        done = math_rl(tmp_path / "math_rl", recipe_env(tmp_path, url, "tml-carol"), "importance_sampling", steps=2)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        assert [m["step"] for m in metrics(tmp_path / "math_rl") if "env/all/reward/total" in m] == [0, 1]

        # a key the gateway does not know: the recipe stops at once with the gateway's answer
        refused = chat_sl(tmp_path / "refused", recipe_env(tmp_path, url, "tml-unknown"), max_steps=1)
        output, _ = refused.communicate(timeout=300)
        assert refused.returncode != 0 and "X-API-Key: missing or unknown API key" in output
    finally:
        for process in reversed(services):
            process.send_signal(signal.SIGTERM)
        for process in reversed(services):
            try:
                process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
