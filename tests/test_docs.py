"""Every `bash` block of the user guide (docs/guide/*.md) runs, page by page, in order, as one shell script in a
fresh directory, with the repository's virtualenv first on PATH and no bios service configured (each page starts
what it needs). Blocks of other languages (json, console, python) are illustrations and do not run. Each page's
output is then checked for what the page says happens."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

GUIDE = REPO / "docs" / "guide"
PAGES = sorted(GUIDE.glob("*.md"))
BLOCK = re.compile(r"^```bash\n(.*?)^```$", re.M | re.S)


def script_of(page: Path) -> str:
    blocks = BLOCK.findall(page.read_text())
    assert blocks, f"{page.name} has no bash block"
    return "set -euo pipefail\n" + "\n".join(blocks)


def run_page(page: Path, directory: Path) -> subprocess.CompletedProcess:
    (directory / "examples").symlink_to(REPO / "examples")
    venv = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BIOS_", "TINKER_"))}
    env.update(
        PATH=f"{venv}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        BIOS_CHECKPOINT_DIR=str(directory / "embedded-checkpoints"),
        PYTHONWARNINGS="default",
    )
    proc = subprocess.Popen(
        ["bash", "-c", script_of(page)],
        cwd=directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=1150)
    finally:
        try:  # a server a failed page started in the background goes with the page's process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def check_fine_tune(out: str, err: str) -> None:
    assert "⟦Seven.<|im_end|>⟧" in out and "legend: " in out
    assert "tools: the ultrasafe renderer cannot represent tools" in err and out.count("exit status 2") == 2
    epochs = [(int(n), float(m)) for n, m in re.findall(r"^epoch (\d+)/16: loss:mean (\d+\.\d+)", out, re.M)]
    first, resumed = epochs[:16], epochs[16:]
    assert [n for n, _ in first] == list(range(1, 17)) and first[-1][1] < first[0][1] / 5, epochs
    # the numbering goes on from the state, and so do the losses (to the printed digits)
    assert [n for n, _ in resumed] == list(range(9, 17)), resumed
    assert all(abs(a - b) <= 1e-4 + 1e-3 * b for (_, a), (_, b) in zip(resumed, first[8:])), (resumed, first)
    assert re.search(r"^Seven\.$", out, re.M) and "assistant: Teal." in out
    assert re.search(r"resumed bios://\S+/state/sft-step8: step 8, epoch 9 of 16", err)
    assert len(re.findall(r"^step 16/16 ", out, re.M)) == 2  # each run's last step
    assert re.search(r"^saved sampler \S+/sampler/more-step16 ", out, re.M)
    assert re.search(r"bad\.jsonl:1: messages\[1\]\.role: unknown role 'bot'", err)


def check_rl(out: str, err: str) -> None:
    rewards = [float(r) for r in re.findall(r"^iteration +\d+: reward (\d\.\d+)", out, re.M)]
    assert len(rewards) == 12
    assert max(rewards[:2]) <= 0.6 and sum(rewards[-3:]) / 3 >= 0.85, rewards  # from chance to (nearly) always right


def check_serve(out: str, err: str) -> None:
    assert re.search(r"^render service on 127\.0\.0\.1:51051, metrics off", out, re.M)
    assert "4 tokens sampled" in out and "loss:mean [" in out
    assert "models: ['ultrasafe/usf-conversation', 'ultrasafe/usf-healthcare', 'ultrasafe/usf-mini']" in out
    assert re.search(r"^tinker loss:sum \d", out, re.M)


def check_export(out: str, err: str) -> None:
    assert re.search(r"^peft: Seven\.$", out, re.M) and re.search(r"^merged: Seven\.$", out, re.M)
    assert "vllm serve me/tiny-chat --enable-lora --max-lora-rank 16 --lora-modules vllm-adapter=" in err
    assert re.search(
        r"^16 32\.0 \['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]$", out, re.M
    )


def check_model_registry(out: str, err: str) -> None:
    assert re.search(r"^  acme/helper +renderer qwen3 ", out, re.M) and "me/tiny-chat" in out
    assert "saved sampler" in out and re.search(r"^\d+ tokens$", out, re.M)


def check_operating(out: str, err: str) -> None:
    assert re.search(r"^bios://\S+/state/alice-run-step1", out, re.M)
    assert "no checkpoints yet" in err  # bob sees none of alice's
    assert "UNAUTHENTICATED" in err and "exit status 2" in out
    for address in ("127.0.0.1:51152", "127.0.0.1:51153"):
        assert f"{address} bios.v1.TrainService SERVING" in out
    assert "'bios.v1.RenderService'" in out and "'grpc.health.v1.Health'" in out
    assert re.search(r"^bios_train_tokens_total\{kind=\"forward_backward\"\} \d", out, re.M)
    assert "alice-run-step1" in out.split("ls checkpoints")[0] or re.search(r"^alice-run-step1$", out, re.M)


CHECKS = {
    "fine-tune": check_fine_tune,
    "rl": check_rl,
    "serve": check_serve,
    "export": check_export,
    "model-registry": check_model_registry,
    "operating": check_operating,
}


def test_every_page_is_checked():
    assert sorted(CHECKS) == sorted(p.stem for p in PAGES)


@pytest.mark.timeout(1200)  # the RL page trains for ~3 minutes on a quiet 2-core machine; far more when loaded
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_page_runs_as_written(page, tmp_path):
    done = run_page(page, tmp_path)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    CHECKS[page.stem](done.stdout, done.stderr)


def test_readme_example_runs(tmp_path):
    """The README's usage snippet, as written, on the embedded default."""
    (snippet,) = re.findall(r"^```python\n(.*?)^```$", (REPO / "README.md").read_text(), re.M | re.S)
    script = snippet + "print('loss:mean', training_client.forward([datum]).result().metrics['loss:mean'])\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BIOS_", "TINKER_"))}
    env.update(HF_HUB_OFFLINE="1", BIOS_CHECKPOINT_DIR=str(tmp_path / "checkpoints"))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^loss:mean \d+\.\d+$", done.stdout, re.M), done.stdout
