"""`bios checkpoints list|delete` and `bios export`: what is saved, where, and taking it elsewhere.

Export formats:
  peft    the adapter as `peft.PeftModel.from_pretrained(base_model, DIR)` loads it
          (adapter_config.json + adapter_model.safetensors)
  vllm    the same files, checked against what vLLM's LoRA loader accepts (r, lora_alpha and target_modules set;
          no modules_to_save, DoRA or biases; only lora_A / lora_B weights of linear layers), then
          `vllm serve BASE --enable-lora --lora-modules NAME=DIR --max-lora-rank R`
  merged  the base model with the adapter merged in: a complete Hugging Face model directory (with tokenizer)
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from safetensors import safe_open

from bios.errors import InvalidArgumentError
from bios_server import embedded
from bios_server.cli.common import connect
from bios_server.cli.output import Console, UsageError, size
from train_service import checkpoint_layout as layout

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_[AB]\.weight$")
FIELDS = {"path": "CHECKPOINT"}


def register(command, common) -> None:
    p = command("checkpoints", "list or delete saved checkpoints", __doc__)
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=type(p))
    listing = verbs.add_parser(
        "list",
        help="saved checkpoints, newest last",
        formatter_class=p.formatter_class,
        parents=[common],
        description="Saved checkpoints (this API key's), newest last.",
    )
    listing.add_argument("--model-id", default="", help="only this model's (default: all)")
    listing.add_argument("--json", action="store_true", help="one JSON object per checkpoint")
    listing.set_defaults(run=run_list, fields=FIELDS)
    delete = verbs.add_parser(
        "delete",
        help="delete checkpoints",
        formatter_class=p.formatter_class,
        parents=[common],
        description="Delete checkpoints by path.",
    )
    delete.add_argument("paths", nargs="+", metavar="CHECKPOINT", help="bios://MODEL/state|sampler/NAME")
    delete.set_defaults(run=run_delete, fields=FIELDS)

    e = command("export", "write a checkpoint out as a PEFT adapter, a vLLM LoRA adapter or a merged model", __doc__)
    e.add_argument("path", metavar="CHECKPOINT", help="bios://MODEL/state|sampler/NAME (`bios checkpoints list`)")
    e.add_argument("directory", metavar="DIR", help="where to write the files (created; must be empty)")
    e.add_argument("--format", choices=("peft", "vllm", "merged"), default="peft", help="what to write")
    e.add_argument("--force", action="store_true", help="write into DIR even if it holds files (replacing them)")
    e.set_defaults(run=run_export, fields=FIELDS)


def is_checkpoint_path(path: str, kinds: tuple[str, ...]) -> bool:
    """A path the train service could have issued, of one of `kinds` (the service checks it again)."""
    try:
        return layout.parse(path)[1] in kinds
    except InvalidArgumentError:
        return False


def checked_path(path: str) -> str:
    if not is_checkpoint_path(path, layout.KINDS):
        raise UsageError(
            f"CHECKPOINT: {path!r} is not a checkpoint path (bios://<model_id>/state|sampler/<name>; "
            "`bios checkpoints list` shows them)"
        )
    return path


def run_list(args: Any, console: Console) -> int:
    checkpoints = sorted(connect(args, ("train",)).list_checkpoints(args.model_id), key=lambda c: c.created_unix_ms)
    for c in checkpoints:
        directory = embedded.checkpoint_directory(c.path)
        if args.json:
            console.print(json.dumps({**c.model_dump(), "directory": directory}))
    if args.json:
        return 0
    if not checkpoints:
        console.note("no checkpoints yet (`bios sft` saves them)")
        return 0
    rows = [
        (
            c.path,
            c.kind,
            str(c.step),
            size(c.size_bytes),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(c.created_unix_ms / 1000)),
            c.base_model,
        )
        for c in checkpoints
    ]
    header = ("CHECKPOINT", "KIND", "STEP", "SIZE", "CREATED", "BASE MODEL")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    console.print(console.paint("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), "bold"))
    for row in rows:
        console.print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    root = embedded.checkpoint_directory("bios://")
    console.note(f"on disk under {root}" if root else "on the train service's disk, under its --checkpoint-dir")
    return 0


def run_delete(args: Any, console: Console) -> int:
    client = connect(args, ("train",))
    for path in args.paths:
        client.delete_checkpoint(checked_path(path))
        console.print(f"deleted {path}")
    return 0


def run_export(args: Any, console: Console) -> int:
    path, out = checked_path(args.path), Path(args.directory)
    if out.exists() and not out.is_dir():
        raise UsageError(f"DIR: {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise UsageError(f"DIR: {out} holds files already (use --force to write into it anyway)")
    client = connect(args, ("train",))
    client.export_weights(path, out, merged=args.format == "merged")
    files = sorted(p for p in out.iterdir() if p.is_file())
    console.print(
        f"exported {path} as {args.format} to {out}: "
        + ", ".join(f"{p.name} ({size(p.stat().st_size)})" for p in files)
    )
    if args.format == "peft":
        console.note(
            f"load it: peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), {str(out)!r})"
        )
    elif args.format == "vllm":
        rank = check_vllm_adapter(out)
        base = _base_model(client, path)
        max_rank = next(r for r in VLLM_RANKS if r >= rank)
        console.note(
            f"serve it: vllm serve {base} --enable-lora --max-lora-rank {max_rank} "
            f"--lora-modules {out.name}={out.resolve()}"
        )
    else:
        console.note(f"load it: AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _base_model(client: Any, path: str) -> str:
    model_id = layout.split(path)[0]
    found = [c.base_model for c in client.list_checkpoints(model_id) if c.path == path]
    return found[0] if found else "BASE_MODEL"


def check_vllm_adapter(directory: Path) -> int:
    """The adapter's rank, after checking what vLLM's LoRA loader (PEFTHelper, parse_fine_tuned_lora_name) accepts;
    UsageError naming the first thing it would refuse."""
    config = json.loads((directory / layout.ADAPTER_CONFIG).read_text())
    for key in ("r", "lora_alpha", "target_modules"):
        if not config.get(key):
            raise UsageError(f"--format vllm: adapter_config.json has no {key}, which vLLM requires")
    refused = [
        (config.get("modules_to_save"), "modules_to_save (full copies of modules)"),
        (config.get("use_dora"), "DoRA"),
        (config.get("bias", "none") != "none", "LoRA biases"),
    ]
    for present, what in refused:
        if present:
            raise UsageError(
                f"--format vllm: the adapter uses {what}, which vLLM does not load; export --format merged instead"
            )
    targets = set(config["target_modules"]) if isinstance(config["target_modules"], list) else set()
    if targets & {"lm_head", "embed_tokens"}:
        raise UsageError(
            "--format vllm: the adapter trains the embeddings / LM head (train_unembed), which current "
            "vLLM LoRA does not load; export --format merged instead"
        )
    with safe_open(str(directory / layout.ADAPTER_WEIGHTS), "np") as weights:
        for key in weights.keys():
            match = LORA_KEY.match(key)
            if not match or match.group(1).rsplit(".", 1)[-1] not in targets:
                raise UsageError(
                    f"--format vllm: weight {key!r} is not a lora_A / lora_B weight of a target module "
                    "(vLLM refuses such adapters)"
                )
    if config["r"] > VLLM_RANKS[-1]:
        raise UsageError(
            f"--format vllm: rank {config['r']} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})"
        )
    return int(config["r"])


def remove_tree(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
