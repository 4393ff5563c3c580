"""`bios info`: the models this installation knows (the embedded stand-ins and $BIOS_MODEL_REGISTRY's entries),
the renderer families, the devices the train service could use, and where the services and checkpoints are."""

from __future__ import annotations

import json
import os
from typing import Any

from bios import __version__
from bios_server.cli.output import Console
from render_service.model_registry import registered
from render_service.renderers import list_renderers


def register(command, common) -> None:
    p = command("info", "models, renderers, devices and where things are", __doc__)
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(run=run, fields={})


def gather() -> dict[str, Any]:
    models = [
        {
            "name": e.name,
            "renderer": e.renderer,
            "weights": e.weights,
            "tokenizer": e.tokenizer,
            "description": e.description,
        }
        for e in registered().values()
    ]
    renderers = [
        {"name": name, "aliases": aliases, "description": description}
        for name, aliases, description in list_renderers()
    ]
    return {
        "version": __version__,
        "models": models,
        "renderers": renderers,
        "devices": devices(),
        "model_registry": os.environ.get("BIOS_MODEL_REGISTRY"),
        "models_dir": os.environ.get("BIOS_MODELS_DIR"),
        "render_address": os.environ.get("BIOS_RENDER_ADDRESS") or "embedded (in each command's process)",
        "train_address": os.environ.get("BIOS_TRAIN_ADDRESS") or "embedded (in each command's process)",
        "checkpoint_dir": os.environ.get("BIOS_CHECKPOINT_DIR") or os.path.expanduser("~/.cache/bios/checkpoints"),
    }


def devices() -> dict[str, Any]:
    """What `--device auto` resolves to here, and the CUDA devices torch sees."""
    import torch  # noqa: PLC0415 - the one part of `bios info` that needs torch (seconds to load)

    cuda = (
        [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return {
        "auto": cuda[0].split(" ")[0] if cuda else "cpu",
        "cuda": cuda,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }


def run(args: Any, console: Console) -> int:
    facts = gather()
    if args.json:
        console.print(json.dumps(facts))
        return 0
    bold = lambda text: console.paint(text, "bold")  # noqa: E731
    console.print(f"{bold('bios')} {facts['version']}")
    console.print(
        bold("\nmodels")
        + (f" (registry: {facts['model_registry']})" if facts["model_registry"] else "")
        + ("" if not facts["models_dir"] else f" (+ directories under {facts['models_dir']})")
    )
    width = max(len(m["name"]) for m in facts["models"])
    for m in facts["models"]:
        console.print(f"  {m['name'].ljust(width)}  renderer {m['renderer']:<12} {m['description'] or m['weights']}")
    console.print(bold("\nrenderers") + " (--renderer NAME; by default the model's own)")
    for r in facts["renderers"]:
        aliases = f" ({', '.join(r['aliases'])})" if r["aliases"] else ""
        console.print(f"  {r['name']}{aliases}: {r['description']}")
    d = facts["devices"]
    console.print(
        bold("\ndevices")
        + f" (torch {d['torch']}): --device auto = {d['auto']}; "
        + (", ".join(d["cuda"]) if d["cuda"] else f"no CUDA device; cpu with {d['cpu_threads']} threads")
    )
    console.print(bold("\nservices") + f": render {facts['render_address']}; train {facts['train_address']}")
    console.print(f"{bold('checkpoints')}: {facts['checkpoint_dir']} (embedded default)")
    return 0
