"""Checkpoints on disk, written atomically (the layout: train_service.checkpoint_layout).

A checkpoint is built in a hidden temporary directory and renamed into place, so a reader sees the
old one or the new one, never half of one. A process killed part-way leaves hidden directories behind;
the next store opened on the root removes them (and puts back a checkpoint whose overwrite was cut short
between its two renames), unless another live process still uses the root.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from peft import LoraConfig as PeftLoraConfig
from safetensors.torch import load_file, save_file

from bios import types, wire
from bios.errors import FailedPreconditionError, NotFoundError
from bios.v1 import train_pb2
from train_service import checkpoint_layout as layout
from train_service.checkpoint_layout import validate_name  # noqa: F401 - re-exported for callers

log = logging.getLogger("bios.checkpoints")


class CheckpointStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / layout.LOCK_FILE, "a")  # noqa: SIM115 - held (flocked) for the store's lifetime
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another live store writes here: its hidden directories may be in progress
            pass
        else:
            self.recover()
        fcntl.flock(self._lock, fcntl.LOCK_SH)

    def recover(self) -> list[Path]:
        """Undo what killed writes left: temporaries and trash go, an overwrite cut short between its two
        renames gets its previous checkpoint back. Only safe while no other process writes to the root."""
        cleaned = []
        for entry in layout.hidden_entries(self.root):
            name = layout.unhidden_name(entry)
            final = entry.with_name(name)
            if entry.name.startswith(".old-") and layout.NAME.match(name) and not final.exists():
                os.rename(entry, final)
                log.warning("checkpoints: restored %s (its overwrite was interrupted)", final)
                continue
            shutil.rmtree(entry, ignore_errors=True)
            cleaned.append(entry)
        if cleaned:
            log.warning(
                "checkpoints: removed %d directories left by interrupted writes under %s", len(cleaned), self.root
            )
        return cleaned

    def directory(self, model_id: str, kind: str, name: str) -> Path:
        return layout.directory(self.root, model_id, kind, name)

    def locate(self, path: str, tenant: str, field: str = "path") -> tuple[Path, dict[str, Any]]:
        """The directory and metadata of an existing checkpoint of `tenant` (others' are invisible)."""
        directory = self.directory(*layout.parse(path, field))
        meta_file = directory / layout.META
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
        if meta is None or meta.get("tenant") != tenant:
            raise NotFoundError(f"{field}: no checkpoint at {path}")
        return directory, meta

    def write(
        self,
        model_id: str,
        tenant: str,
        kind: str,
        name: str,
        meta: dict[str, Any],
        fill: Callable[[Path], None],
        replace: bool = True,
    ) -> train_pb2.Checkpoint:
        """Run `fill(tmpdir)` to write the files, then publish the directory atomically. `replace=False`:
        FAILED_PRECONDITION when a checkpoint of this name exists."""
        final = self.directory(model_id, kind, name)
        if not replace and (final / layout.META).is_file():
            raise FailedPreconditionError(
                f"name: a {kind} checkpoint named {name!r} exists on model {model_id} "
                "(save it under another name, or overwrite it)"
            )
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=final.parent))
        try:
            fill(tmp)
            path = layout.path(model_id, kind, name)
            meta = {
                **meta,
                "id": path,
                "path": path,
                "kind": kind,
                "name": name,
                "model_id": model_id,
                "tenant": tenant,
                "created_unix_ms": int(time.time() * 1000),
            }
            meta["size_bytes"] = sum(f.stat().st_size for f in tmp.iterdir())
            (tmp / layout.META).write_text(json.dumps(meta))
            for f in tmp.iterdir():  # durable before it becomes visible
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            old = None
            if final.exists():
                old = layout.hidden(final, ".old", uuid.uuid4().hex[:8])
                os.rename(final, old)
            os.rename(tmp, final)
            _fsync_directory(final.parent)  # the rename itself survives a crash
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return to_pb(meta)

    def list(self, tenant: str, model_ids: set[str] | None = None) -> list[train_pb2.Checkpoint]:
        out = []
        for meta_file in layout.meta_files(self.root):
            meta = json.loads(meta_file.read_text())
            if meta.get("tenant") == tenant and (model_ids is None or meta["model_id"] in model_ids):
                out.append(to_pb(meta))
        return out

    def delete(self, path: str, tenant: str) -> None:
        directory, _ = self.locate(path, tenant)
        trash = layout.hidden(directory, ".del", uuid.uuid4().hex[:8])
        os.rename(directory, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def to_pb(meta: dict[str, Any]) -> train_pb2.Checkpoint:
    return wire.checkpoint_to_pb(
        types.Checkpoint(
            id=meta["id"],
            path=meta["path"],
            kind=meta["kind"],
            name=meta["name"],
            model_id=meta["model_id"],
            base_model=meta.get("base_model", ""),
            step=meta.get("step", 0),
            metadata=meta.get("metadata", {}),
            size_bytes=meta.get("size_bytes", 0),
            created_unix_ms=meta.get("created_unix_ms", 0),
        )
    )


# ---- the files inside a checkpoint directory ----------------------------------------------------------


def write_adapter(directory: Path, config: PeftLoraConfig, state: dict[str, torch.Tensor]) -> None:
    """PEFT format: `PeftModel.from_pretrained(base, directory)` loads it."""
    save_file(state, str(directory / layout.ADAPTER_WEIGHTS))
    config.save_pretrained(str(directory))


def read_adapter(directory: Path, field: str) -> tuple[PeftLoraConfig, dict[str, torch.Tensor]]:
    try:
        config = PeftLoraConfig.from_pretrained(str(directory))
        return config, load_file(str(directory / layout.ADAPTER_WEIGHTS), device="cpu")
    except (OSError, ValueError, TypeError) as exc:
        raise FailedPreconditionError(f"{field}: the checkpoint's adapter files cannot be read: {exc}") from None


def write_optimizer(directory: Path, optimizer: torch.optim.Optimizer, step: int) -> None:
    state = optimizer.state_dict()
    cpu = {
        k: {n: v.detach().cpu() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in state["state"].items()
    }
    torch.save(
        {"optimizer": {"state": cpu, "param_groups": state["param_groups"]}, "step": step}, directory / layout.OPTIMIZER
    )


def read_optimizer(directory: Path, field: str) -> dict:
    if not (directory / layout.OPTIMIZER).is_file():
        raise FailedPreconditionError(f"{field}: the checkpoint holds no optimizer state (a sampler checkpoint?)")
    return torch.load(directory / layout.OPTIMIZER, map_location="cpu", weights_only=True)
