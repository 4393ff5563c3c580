"""bios: a self-hostable training API for language models (client).

    import bios
    service_client = bios.ServiceClient()          # embedded services when no address is configured
    training_client = service_client.create_lora_training_client(base_model="ultrasafe/usf-mini")
"""

from bios import types
from bios.errors import BiosError, InvalidArgumentError, NotFoundError
from bios.futures import APIFuture
from bios.render_client import RenderClient
from bios.sampling_client import SamplingClient
from bios.service_client import ServiceClient
from bios.training_client import TrainingClient

__version__ = "0.1.0"
__all__ = ["APIFuture", "BiosError", "InvalidArgumentError", "NotFoundError", "RenderClient", "SamplingClient",
           "ServiceClient", "TrainingClient", "types"]
