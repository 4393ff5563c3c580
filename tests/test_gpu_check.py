"""benchmarks/gpu_check.py, the prepared GPU check, on CPU: every device-dependent path it takes runs here too, and it
needs nothing beyond torch, transformers and peft (a bare GPU machine has no gRPC and no generated stubs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

BLOCKED = ("grpc", "google.protobuf", "bios.v1", "render_service", "pydantic")


def test_gpu_check_runs_on_cpu_without_grpc_or_the_services(tmp_path):
    out = tmp_path / "gpu_check.json"
    code = (
        "import runpy, sys\n"
        f"for name in {BLOCKED!r}:\n"
        "    sys.modules[name] = None  # importing any of these now fails\n"
        f"sys.argv = ['gpu_check', '--device', 'cpu', '--small', '--out', {str(out)!r}]\n"
        "runpy.run_module('benchmarks.gpu_check', run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["forward_backward"]["tokens"] == 128 and report["forward_backward"]["mfu"] > 0
    assert report["coalescing"]["sessions"] == 8 and report["coalescing"]["coalesced_tokens_per_s"] > 0
    assert report["sampling"]["rows"] == 32 and report["sampling"]["bios_tokens_per_s"] > 0
    # On one device in fp32 both runs are the same computation: equal to float32 rounding.
    assert report["agreement"]["agree"] and report["agreement"]["relative_difference"] < 1e-6


def test_gpu_check_on_two_cpu_ranks(tmp_path):
    """The multi-GPU variant (torchrun): sharded base, data-parallel passes, lockstep decoding, on two gloo ranks."""
    from pathlib import Path

    out = tmp_path / "gpu_check.json"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    done = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "benchmarks.gpu_check",
            "--device",
            "cpu",
            "--small",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ranks"] == 2 and report["forward_backward"]["ranks"] == 2
    assert report["coalescing"]["coalesced_tokens_per_s"] > 0 and report["sampling"]["bios_tokens_per_s"] > 0
    assert "agreement" not in report  # one rank only
