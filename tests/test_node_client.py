"""The Node.js client (clients/node) against both services on loopback: one training step, one rejection."""

from __future__ import annotations

import json
import math
import subprocess

from conftest import NODE_DIR

CONV = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}]


def run_demo(node: str, services, *extra: str) -> dict:
    render_address, train_address, _ = services
    done = subprocess.run(
        [node, str(NODE_DIR / "demo.js"), "--render", render_address, "--train", train_address, *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"demo.js exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line, got:\n{done.stdout}"
    return json.loads(lines[0])


def test_node_demo_trains_one_step(node_client, services):
    from bios_cookbook import renderers, tokenizer_utils

    renderer = renderers.get_renderer("ultrasafe", tokenizer_utils.get_tokenizer("ultrasafe/usf-mini"))
    tokens, _ = renderer.build_supervised_example(CONV)

    result = run_demo(node_client, services)
    assert result["tokens"] == len(tokens)
    assert math.isfinite(result["loss"]) and result["loss"] > 0
    assert result["step"] == 1
    assert result["logprobs"] == len(tokens) - 1  # one logprob per target token


def test_node_demo_rejects_short_weights(node_client, services):
    result = run_demo(node_client, services, "--bad")
    assert result["rejected"] is True
    assert result["code"] == 3  # INVALID_ARGUMENT
    assert "weights" in result["message"]
