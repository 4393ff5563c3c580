"""`bios sft FILE.jsonl`: supervised fine-tuning of a LoRA adapter on chat conversations.

Every conversation is rendered first (with its own tools, or --tools), so a bad line fails before any training.
Steps run in file order, batch after batch, for --epochs (or --steps in all); a state checkpoint is saved every
--checkpoint-every steps and at the end, with sampler weights for `bios sample` / `bios chat`. --resume continues
from a state checkpoint: its step and epoch numbering go on, up to the same --epochs / --steps in all.

Losses: loss:sum is the token-summed loss of a step (it grows with the batch); loss:mean = loss:sum / Σ weights,
the loss per trained token, is what to compare across batches and runs.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import deque
from typing import Any

from bios.compose import to_datum
from bios.errors import BiosError
from bios.training_client import loss_weight
from bios_server import embedded
from bios_server.cli.checkpoints import is_checkpoint_path
from bios_server.cli.common import connect, non_negative_int, positive_float, positive_int
from bios_server.cli.output import Console, Progress, UsageError
from bios_server.cli.records import at_line, read_records, read_tools
from bios_server.cli.render import DEFAULT_MODEL, add_data_arguments
from train_service import checkpoint_layout as layout

IN_FLIGHT = 4  # steps submitted ahead of the one being reported: the engine never waits for this process
CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$")  # the server's rule, with room for -stepN


def register(command, common) -> None:
    p = command("sft", "supervised fine-tuning on a chat JSONL file", __doc__)
    p.add_argument("file", metavar="FILE.jsonl", help='chat JSONL: one {"messages": [...], "tools"?: [...]} a line')
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="base model to put the LoRA adapter on (with --resume: the checkpoint's)"
    )
    p.add_argument("--renderer", default=None, metavar="NAME", help="renderer family (default: the model's own)")
    add_data_arguments(p)
    p.add_argument("--rank", type=positive_int, default=16, help="LoRA rank")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--batch-size", type=positive_int, default=8, help="conversations per step")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int, default=1, help="passes over the file")
    length.add_argument("--steps", type=positive_int, default=None, help="optimizer steps in all, instead of --epochs")
    p.add_argument(
        "--checkpoint-every",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="also save a state checkpoint every N steps (0: only at the end)",
    )
    p.add_argument("--name", default="sft", help="checkpoint names are NAME-stepN")
    p.add_argument(
        "--resume",
        default=None,
        metavar="bios://MODEL/state/NAME",
        help="continue from this state checkpoint (`bios checkpoints list` shows them)",
    )
    p.add_argument(
        "--log-every",
        type=positive_int,
        default=1,
        metavar="N",
        help="a progress line every N steps when stderr is not a terminal (on one: a live line)",
    )
    p.add_argument("--json", action="store_true", help="JSON lines on stdout: one per step, epoch and checkpoint")
    p.set_defaults(
        run=run,
        fields={
            "base_model": "--model",
            "renderer": "--renderer",
            "renderer.tokenizer": "--model",
            "path": "--resume",
            "save_state.name": "--name",
        },
    )


class Run:
    """Where a run is: its data, its numbering (steps count from 1 across epochs) and what it reports."""

    def __init__(self, args: Any, console: Console, examples: list, first_step: int):
        self.args, self.console = args, console
        data = [to_datum(tokens, weights) for tokens, weights in examples]
        self.batches = [data[i : i + args.batch_size] for i in range(0, len(data), args.batch_size)]
        self.weights = [loss_weight(batch) for batch in self.batches]  # trained tokens of each batch
        self.per_epoch = len(self.batches)
        self.total = args.steps or args.epochs * self.per_epoch
        self.epochs = math.ceil(self.total / self.per_epoch)
        self.first = first_step
        self.epoch_sums = [0.0, 0.0, 0, time.monotonic()]  # loss:sum, weight, steps, started
        self.progress = Progress(console, self.total, first_step)

    def epoch_of(self, step: int) -> int:
        return (step - 1) // self.per_epoch + 1

    def emit(self, event: dict, line: str) -> None:
        self.console.print(json.dumps(event) if self.args.json else line)

    def step_done(self, step: int, result: Any) -> None:
        metrics = result.metrics
        loss, mean, tokens = metrics["loss:sum"], metrics.get("loss:mean", float("nan")), int(metrics["tokens:sum"])
        weight = self.weights[(step - 1) % self.per_epoch]
        sums = self.epoch_sums
        sums[0], sums[1], sums[2] = sums[0] + loss, sums[1] + weight, sums[2] + 1
        epoch = self.epoch_of(step)
        fields = f"epoch {epoch}/{self.epochs}  loss:mean {mean:.4f}  loss:sum {loss:,.2f}"
        self.progress.update(step, tokens, fields)
        if self.args.json or not self.console.live and (step % self.args.log_every == 0 or step == self.total):
            self.emit(
                {
                    "event": "step",
                    "step": step,
                    "epoch": epoch,
                    "loss:sum": loss,
                    "loss:mean": mean,
                    "tokens": tokens,
                    "trained_tokens": round(weight),
                },
                f"step {step}/{self.total}  {fields}  {self.progress.tokens_per_second():,.0f} tok/s",
            )
        if step % self.per_epoch == 0 or step == self.total:
            mean_epoch = sums[0] / sums[1] if sums[1] else float("nan")
            self.emit(
                {
                    "event": "epoch",
                    "epoch": epoch,
                    "loss:mean": mean_epoch,
                    "loss:sum": sums[0],
                    "trained_tokens": round(sums[1]),
                    "steps": sums[2],
                },
                f"epoch {epoch}/{self.epochs}: loss:mean {mean_epoch:.4f} (loss:sum {sums[0]:,.2f} over "
                f"{sums[1]:,.0f} trained tokens, {sums[2]} steps, {time.monotonic() - sums[3]:.1f} s)",
            )
            self.epoch_sums = [0.0, 0.0, 0, time.monotonic()]

    def saved(self, kind: str, checkpoint: Any) -> None:
        directory = embedded.checkpoint_directory(checkpoint.path)
        where = f"on disk: {directory}" if directory else "on the train service's disk, under its --checkpoint-dir"
        self.emit(
            {
                "event": "checkpoint",
                "kind": kind,
                "path": checkpoint.path,
                "step": checkpoint.step,
                "directory": directory,
            },
            f"saved {kind} {checkpoint.path} (step {checkpoint.step}; {where})",
        )


def run(args: Any, console: Console) -> int:
    if not CHECKPOINT_NAME.match(args.name) or ".." in args.name:
        raise UsageError(
            f"--name: {args.name!r} is not a valid checkpoint name (letters, digits, . _ -; starting "
            "with a letter or digit)"
        )
    if args.resume is not None and not is_checkpoint_path(args.resume, (layout.STATE,)):
        raise UsageError(
            f"--resume: {args.resume!r} is not a state checkpoint path (bios://<model_id>/state/<name>; "
            "`bios checkpoints list` shows them)"
        )
    records = read_records(args.file, read_tools(args.tools))
    client = connect(args)
    first_step, model = 0, args.model
    if args.resume:
        checkpoint = _find_state(client, args.resume)
        first_step, model = checkpoint.step, checkpoint.base_model
    examples = _render(client, args, records, model)
    run_ = Run(args, console, examples, first_step)
    if first_step >= run_.total:
        raise UsageError(
            f"--resume: {args.resume} is at step {first_step}, and this run ends at step {run_.total} "
            f"({run_.per_epoch} steps an epoch); ask for more --epochs or --steps"
        )
    if args.resume:
        training = client.create_training_client_from_state_with_optimizer(args.resume)
        console.note(
            f"resumed {args.resume}: step {first_step}, epoch {run_.epoch_of(first_step + 1)} of {run_.epochs}"
        )
    else:
        training = client.create_lora_training_client(base_model=model, rank=args.rank)
    console.note(
        f"training {training.model_id} on {model}: {len(examples)} conversations, {run_.per_epoch} steps an "
        f"epoch, steps {first_step + 1}-{run_.total}"
    )
    _train(training, run_)
    return 0


def _find_state(client: Any, path: str) -> Any:
    model_id = layout.split(path)[0]
    for checkpoint in client.list_checkpoints(model_id):
        if checkpoint.path == path:
            return checkpoint
    raise UsageError(f"--resume: no checkpoint at {path} (`bios checkpoints list` shows what there is)")


def _render(client: Any, args: Any, records: list, model: str) -> list:
    """Every record through the render service, each with its own tools; errors name the file's line."""
    renderer = client.render_client(args.renderer or "", model)  # "": the model's own renderer
    try:
        return renderer.build_supervised_examples([r.as_dict() for r in records], train_on_what=args.train_on_what)
    except BiosError as exc:
        line = at_line(args.file, records, str(exc))
        if line is None:
            raise
        raise UsageError(line) from None


def _train(training: Any, run: Run) -> None:
    args = run.args
    pending: deque = deque()  # ("step" | "state" | "sampler", step, future), answered in this order

    def report(kind: str, step: int, future: Any) -> None:
        if kind == "step":
            run.step_done(step, future.result())
        else:
            run.saved(kind, future.result())

    for step in range(run.first + 1, run.total + 1):
        batch = run.batches[(step - 1) % run.per_epoch]
        pending.append(("step", step, training.train_future(batch, learning_rate=args.lr)))
        name = f"{args.name}-step{step}"
        meta = {
            "step": step,
            "epoch": run.epoch_of(step),
            "file": args.file,
            "examples": sum(map(len, run.batches)),
            "batch_size": args.batch_size,
        }
        if step == run.total or (args.checkpoint_every and step % args.checkpoint_every == 0):
            pending.append(("state", step, training.save_state(name, metadata=meta)))
        if step == run.total:
            pending.append(("sampler", step, training.save_weights_for_sampler(name)))
        while len(pending) > IN_FLIGHT or (step == run.total and pending):
            report(*pending.popleft())
    run.console.clear_status()
