"""Which train pod holds a session, model or sampler: the pod's ordinal is part of every id it issues.

A train service with several replicas (the StatefulSet's pods `bios-train-<k>`) issues the ids
`session-p<k>-<hex>`, `model-p<k>-<hex>` and `sampler-p<k>-<hex>`, so a checkpoint path
`bios://model-p<k>-<hex>/state/<name>` names its pod too. A client given a pod address template
(`BIOS_TRAIN_POD_ADDRESS=bios-train-{pod}.bios-train-headless.<namespace>.svc:50052`) opens its session
through the placement address (the Service: any ready pod, so sessions spread) and then talks to that
session's pod alone. No routing table or proxy has to stay up: ids are opaque to users, so the ordinal in
them costs nothing. A train service outside a StatefulSet issues ids without an ordinal.
"""

from __future__ import annotations

import re
import uuid

_PLACED_ID = re.compile(r"(?:^|/)(?:session|model|sampler)-p(\d+)-[0-9a-f]+")
_POD_NAME = re.compile(r"-(\d+)$")


def new_id(prefix: str, pod: int | None = None) -> str:
    tail = uuid.uuid4().hex[:12]
    return f"{prefix}-{tail}" if pod is None else f"{prefix}-p{pod}-{tail}"


def pod_of(id_or_path: str) -> int | None:
    """The ordinal of the pod that issued an id, or that holds a `bios://` checkpoint path; None if unplaced."""
    found = _PLACED_ID.search(id_or_path)
    return int(found.group(1)) if found else None


def pod_ordinal(pod_name: str | None) -> int | None:
    """A StatefulSet pod's ordinal from its name (`bios-train-3` -> 3); None for any other name."""
    found = _POD_NAME.search(pod_name or "")
    return int(found.group(1)) if found else None


def pod_address(template: str, pod: int) -> str:
    """`template` with `{pod}` replaced by the ordinal: the address of that one pod."""
    if "{pod}" not in template:
        raise ValueError(f"train_pod_address: {template!r} has no {{pod}} placeholder")
    return template.replace("{pod}", str(pod))
