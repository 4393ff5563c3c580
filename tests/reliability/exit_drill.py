"""The exit drill: a script on the embedded default submits 20 training steps and a save_state without waiting
for any of them, and exits. Every run must exit with the script's own code and leave the state on disk at step 20,
with the weights a script that waited gets.

    .venv/bin/python tests/reliability/exit_drill.py --runs 20     # the figures in docs/reliability.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEPS = 20

SCRIPT = """
import sys
import bios
from bios import types

service_client = bios.ServiceClient()
training_client = service_client.create_lora_training_client(base_model="ultrasafe/usf-mini", rank=4, seed=7)
datum = types.Datum(model_input=types.ModelInput.from_ints(list(range(100, 132))),
                    loss_fn_inputs={"target_tokens": list(range(101, 133)), "weights": [1.0] * 32})
for _ in range(STEPS):
    training_client.forward_backward([datum], "cross_entropy")
    training_client.optim_step(types.AdamParams(learning_rate=1e-3))
saved = training_client.save_state("final")
if WAIT:
    print(saved.result().path)
END
"""
ENDINGS = {
    "exit": "",
    "exception": "raise RuntimeError('the script fails after submitting')",
    "sys.exit(3)": "sys.exit(3)",
}
EXPECTED_CODE = {"exit": 0, "exception": 1, "sys.exit(3)": 3}


@dataclass
class Run:
    code: int
    step: int | None  # of the "final" state on disk, None if there is none
    weights_match: bool  # the adapter equals the one of a run that waited for every operation
    seconds: float
    stderr: str


def script(wait: bool = False, ending: str = "exit") -> str:
    return SCRIPT.replace("STEPS", str(STEPS)).replace("WAIT", str(wait)).replace("END", ENDINGS[ending])


def env(checkpoints: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BIOS_")}
    return clean | {"BIOS_CHECKPOINT_DIR": str(checkpoints), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def final_state(checkpoints: Path) -> tuple[int | None, dict | None]:
    metas = list(checkpoints.glob("*/state/final/meta.json"))
    if not metas:
        return None, None
    from safetensors.numpy import load_file

    return json.loads(metas[0].read_text())["step"], load_file(str(metas[0].parent / "adapter_model.safetensors"))


def run_once(
    workdir: Path, reference: dict | None, wait: bool = False, ending: str = "exit", timeout: float = 300
) -> Run:
    checkpoints = Path(tempfile.mkdtemp(prefix="ckpt-", dir=workdir))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script(wait, ending)],
        env=env(checkpoints),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    step, weights = final_state(checkpoints)
    import numpy as np

    match = (
        reference is not None
        and weights is not None
        and weights.keys() == reference.keys()
        and all(np.allclose(weights[k], reference[k], rtol=0, atol=1e-6) for k in weights)
    )
    return Run(done.returncode, step, match, time.monotonic() - started, done.stderr[-3000:])


def reference_weights(workdir: Path) -> dict:
    """The adapter after 20 steps in a script that waits for its save: what every drill run must leave."""
    checkpoints = Path(tempfile.mkdtemp(prefix="reference-", dir=workdir))
    done = subprocess.run(
        [sys.executable, "-c", script(wait=True)],
        env=env(checkpoints),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    step, weights = final_state(checkpoints)
    assert step == STEPS, step
    return weights


def drill(runs: int, parallel: int = 2, ending: str = "exit") -> list[Run]:
    with tempfile.TemporaryDirectory(prefix="bios-exit-drill-") as tmp:
        reference = reference_weights(Path(tmp))
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            return list(pool.map(lambda _: run_once(Path(tmp), reference, ending=ending), range(runs)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()
    runs = drill(args.runs, args.parallel)
    for k, run in enumerate(runs, 1):
        print(
            f"run {k:2d}: exit code {run.code}, state on disk at step {run.step}, "
            f"weights {'equal' if run.weights_match else 'DIFFER from'} the waited run's, {run.seconds:.1f} s"
        )
    good = sum(r.code == 0 for r in runs), sum(r.step == STEPS for r in runs), sum(r.weights_match for r in runs)
    print(
        f"\n{len(runs)} runs: {good[0]} x exit code 0, {good[1]} x the state on disk at step {STEPS}, "
        f"{good[2]} x the waited run's weights"
    )
    for run in runs:
        if run.code != 0:
            print(run.stderr)
    return 0 if all(g == len(runs) for g in good) else 1


if __name__ == "__main__":
    sys.exit(main())
