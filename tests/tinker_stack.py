"""What the Tinker tests share: a cookbook model name mapped to the tiny stand-in, an offline HF cache holding
its tokenizer (the SDK and the cookbook load tokenizers on the client), and the train service + gateway."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MODEL = "Qwen/Qwen3-8B"  # a name the cookbook knows (renderer qwen3); served by the tiny random stand-in
FIXTURE_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tokenizers" / "Qwen--Qwen3-8B"
API_KEY = "tml-bios-test"


def write_registry(directory: Path) -> Path:
    path = directory / "models.json"
    path.write_text(
        json.dumps(
            {"models": [{"name": MODEL, "weights": "tiny:qwen3", "tokenizer": "builtin:qwen3", "renderer": "qwen3"}]}
        )
    )
    return path


def fill_hf_cache(hub_cache: Path, name: str = MODEL) -> None:
    """An offline HF hub cache entry for `name`: the shared Qwen3 fixture, or the built-in Qwen3 tokenizer."""
    snapshot = hub_cache / f"models--{name.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    if FIXTURE_TOKENIZER.is_dir():
        for f in FIXTURE_TOKENIZER.iterdir():
            shutil.copy(f, snapshot / f.name)
    else:
        from render_service.builtin_tokenizers import qwen3_tokenizer

        qwen3_tokenizer().save_pretrained(str(snapshot))
    # AutoTokenizer reads the model config to find the tokenizer class, as a hub repo has it
    (snapshot / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    (snapshot.parents[1] / "refs").mkdir(exist_ok=True)
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)


def tinker_environment(directory: Path, base_url: str, api_key: str = API_KEY) -> dict[str, str]:
    """The environment a Tinker program needs to run on bios: the two variables, plus the offline HF cache."""
    hub = directory / "hf" / "hub"
    if not hub.is_dir():
        fill_hf_cache(hub)
    return {
        "TINKER_BASE_URL": base_url,
        "TINKER_API_KEY": api_key,
        "HF_HOME": str(directory / "hf"),
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_OFFLINE": "1",
        "TINKER_TELEMETRY": "0",
    }


def apply_environment(monkeypatch, env: dict[str, str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # transformers and huggingface_hub read the cache location once, at import: point them there too
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def start_stack(loop, checkpoint_dir: str, api_keys=None, **gateway_options):
    """Train service and gateway on free loopback ports, on `loop` (a bios LoopThread)."""
    from tinker_gateway import server as gateway_server
    from train_service import server as train_server

    train = loop.run(train_server.start("127.0.0.1", 0, checkpoint_dir, api_keys))
    gateway = loop.run(gateway_server.start("127.0.0.1", 0, f"127.0.0.1:{train.port}", api_keys, **gateway_options))
    return train, gateway


def environ_copy(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env
