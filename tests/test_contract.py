"""The contract compiles from scratch, and the stubs in use are exactly what protos/ describes."""

from __future__ import annotations

import importlib
import subprocess
import sys

from conftest import REPO


def test_protos_compile_from_scratch(tmp_path):
    protos = sorted(str(p.relative_to(REPO / "protos")) for p in (REPO / "protos").rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(REPO / "protos"),
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            *protos,
        ],
        check=True,
        cwd=REPO / "protos",
    )
    # Import the fresh modules in a clean interpreter and compare descriptors with the installed stubs.
    names = [p.removeprefix("bios/v1/").removesuffix(".proto") for p in protos]
    probe = f"""
import sys
sys.path.insert(0, {str(tmp_path)!r})
import importlib
fresh = {{n: importlib.import_module(f"bios.v1.{{n}}_pb2").DESCRIPTOR.serialized_pb for n in {names!r}}}
importlib.import_module("bios.v1.train_pb2_grpc")
print(sorted(importlib.import_module("bios.v1.train_pb2").DESCRIPTOR.services_by_name))
print(repr({{k: len(v) for k, v in fresh.items()}}))
sys.stdout.write(repr({{k: v.hex() for k, v in fresh.items()}}))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "TrainService" in out.stdout
    from bios.v1 import render_pb2, train_pb2, types_pb2

    sizes = eval(out.stdout.splitlines()[-2])  # noqa: S307 - our own probe's repr of a dict of ints
    assert sizes == {
        "types": len(types_pb2.DESCRIPTOR.serialized_pb),
        "render": len(render_pb2.DESCRIPTOR.serialized_pb),
        "train": len(train_pb2.DESCRIPTOR.serialized_pb),
    }
    # The whole FileDescriptorProto, byte for byte: any drift between protos/ and the stubs in use fails.
    fresh = {k: bytes.fromhex(v) for k, v in eval(out.stdout.splitlines()[-1]).items()}  # noqa: S307 - as above
    installed = {n: importlib.import_module(f"bios.v1.{n}_pb2").DESCRIPTOR.serialized_pb for n in names}
    assert set(fresh) == {"types", "render", "train"} and fresh == installed
    # The generated Python (messages, stubs, type hints) is what this protoc writes today, file for file.
    for generated in sorted((tmp_path / "bios" / "v1").iterdir()):
        assert (REPO / "clients/python/bios/v1" / generated.name).read_bytes() == generated.read_bytes(), generated.name


def test_generated_code_is_not_committed():
    tracked = subprocess.run(
        ["git", "ls-files", "clients/python/bios/v1"], capture_output=True, text=True, cwd=REPO
    ).stdout.split()
    assert tracked in ([], ["clients/python/bios/v1/__init__.py"])


def test_every_service_method_is_documented_in_the_contract():
    from bios.v1 import render_pb2, train_pb2

    render = render_pb2.DESCRIPTOR.services_by_name["RenderService"]
    train = train_pb2.DESCRIPTOR.services_by_name["TrainService"]
    assert {m.name for m in render.methods} >= {
        "Render",
        "RenderBatch",
        "BuildGenerationPrompt",
        "BuildSupervisedExample",
        "ParseResponse",
        "GetStopSequences",
        "ListRenderers",
    }
    operate = train.methods_by_name["Operate"]
    assert operate.client_streaming and operate.server_streaming
    sample = train.methods_by_name["Sample"]
    assert sample.server_streaming and not sample.client_streaming


def test_tensor_round_trip_is_little_endian_row_major():
    import numpy as np

    from bios import wire

    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    pb = wire.array_to_tensor(array)
    assert pb.data == array.astype("<f4").tobytes() and list(pb.shape) == [3, 4]
    assert (wire.tensor_to_array(pb) == array).all()
    big_endian = array.astype(">f4")
    assert wire.array_to_tensor(big_endian).data == pb.data
