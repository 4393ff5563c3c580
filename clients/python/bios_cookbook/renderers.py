"""The render service's renderer library, in-process: `renderers.get_renderer(name, tokenizer)`."""

from render_service.renderers import *  # noqa: F401,F403
from render_service.renderers import __all__  # noqa: F401
