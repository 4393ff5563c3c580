"""bios: a self-hostable training API for language models (client).

import bios
service_client = bios.ServiceClient()          # embedded services when no address is configured
training_client = service_client.create_lora_training_client(base_model="ultrasafe/usf-mini")
"""

import importlib
import importlib.metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any


def _version() -> str:
    """The installed distribution's version (the full install is `bios`, the light client `bios-client`); both
    read it from bios/VERSION when built, which is also the answer where bios runs uninstalled (the images)."""
    for distribution in ("bios", "bios-client"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return (Path(__file__).with_name("VERSION")).read_text().strip()


__version__ = _version()
# Exports load on first use: `import bios.errors` (the train engine's core does) pulls in no client or gRPC code.
_EXPORTS = {
    "APIFuture": "bios.futures",
    "BiosError": "bios.errors",
    "InvalidArgumentError": "bios.errors",
    "NotFoundError": "bios.errors",
    "RenderClient": "bios.render_client",
    "SamplingClient": "bios.sampling_client",
    "ServiceClient": "bios.service_client",
    "TrainingClient": "bios.training_client",
    "types": "bios.types",
}
__all__ = [
    "APIFuture",
    "BiosError",
    "InvalidArgumentError",
    "NotFoundError",
    "RenderClient",
    "SamplingClient",
    "ServiceClient",
    "TrainingClient",
    "types",
]  # = _EXPORTS, spelled out for linters and type checkers

if TYPE_CHECKING:
    from bios import types
    from bios.errors import BiosError, InvalidArgumentError, NotFoundError
    from bios.futures import APIFuture
    from bios.render_client import RenderClient
    from bios.sampling_client import SamplingClient
    from bios.service_client import ServiceClient
    from bios.training_client import TrainingClient


assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bios' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if name == "types" else getattr(module, name)
    globals()[name] = value
    return value
