"""Where a checkpoint lies: its path bios://<model_id>/<kind>/<name> and its files on disk.

The one owner of the layout (no torch here, so the gateway and the CLI can use it too):
<root>/<model_id>/<kind>/<name>/ holds adapter_model.safetensors + adapter_config.json (plain PEFT format:
`PeftModel.from_pretrained(base, dir)` loads it), optimizer.pt for states, and meta.json. Writes in progress
live beside it in hidden directories (.tmp-, .old-, .del-<name>-<8 hex>).
"""

from __future__ import annotations

import re
from pathlib import Path

from bios.errors import InvalidArgumentError

SCHEME = "bios://"
STATE, SAMPLER = "state", "sampler"
KINDS = (STATE, SAMPLER)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER = "optimizer.pt"
META = "meta.json"
NOT_EXPORTED = (OPTIMIZER, META)  # the service's own files; an export is the plain PEFT adapter
LOCK_FILE = ".lock"  # every open store holds a shared flock on it; recovery needs it exclusive
HIDDEN_KINDS = (".tmp", ".old", ".del")  # write in progress, replaced checkpoint, deleted checkpoint
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PATH = re.compile(r"^bios://([A-Za-z0-9-]+)/(state|sampler)/(.+)$")


def validate_name(name: str, field: str = "name") -> str:
    if not NAME.match(name or "") or ".." in name:
        raise InvalidArgumentError(
            f"{field}: {name!r} is not a valid checkpoint name "
            "(1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit)"
        )
    return name


def path(model_id: str, kind: str, name: str) -> str:
    return f"{SCHEME}{model_id}/{kind}/{name}"


def parse(checkpoint_path: str, field: str = "path") -> tuple[str, str, str]:
    """(model_id, kind, name) of a valid path; INVALID_ARGUMENT naming `field` otherwise."""
    match = _PATH.match(checkpoint_path or "")
    if not match:
        raise InvalidArgumentError(
            f"{field}: {checkpoint_path!r} is not a checkpoint path (bios://<model_id>/<kind>/<name>)"
        )
    model_id, kind, name = match.groups()
    validate_name(name, field)
    return model_id, kind, name


def split(checkpoint_path: str) -> tuple[str, ...]:
    """The parts of a path the service issued (no validation): (model_id, kind, name)."""
    return tuple(checkpoint_path.removeprefix(SCHEME).split("/", 2))


def directory(root: Path, model_id: str, kind: str, name: str) -> Path:
    return root / model_id / kind / validate_name(name)


def hidden(final: Path, kind: str, tag: str) -> Path:
    """The hidden sibling of `final` for a write in progress (`kind` one of HIDDEN_KINDS)."""
    return final.with_name(f"{kind}-{final.name}-{tag}")


def unhidden_name(entry: Path) -> str:
    """The checkpoint name inside a hidden directory's name (.old-<name>-<8 hex>)."""
    return entry.name[len(".old-") : -len("-12345678")]


def hidden_entries(root: Path) -> list[Path]:
    """Hidden directories under `root` that interrupted writes may have left."""
    return [e for e in sorted(root.glob("*/*/.*")) if e.is_dir() and e.name.split("-", 1)[0] in HIDDEN_KINDS]


def meta_files(root: Path) -> list[Path]:
    """meta.json of every published checkpoint under `root`."""
    return [m for m in sorted(root.glob(f"*/*/*/{META}")) if not m.parent.name.startswith(".")]
