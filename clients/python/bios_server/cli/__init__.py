"""The `bios` command line: one parser (argparse subcommands), one logging setup, one-line errors.

    bios render FILE.jsonl              show what a renderer makes of conversations (colours + legend, or --json)
    bios sft FILE.jsonl                 supervised fine-tuning: progress, step checkpoints, --resume
    bios sample --model M --prompt T    one reply
    bios chat --model M                 an interactive multi-turn chat
    bios export CHECKPOINT DIR          a checkpoint as a plain PEFT adapter, a vLLM LoRA adapter or a merged model
    bios checkpoints list|delete        what is saved, and where
    bios serve render|train|tinker|all  the services, with the standalone servers' flags
    bios info                           models, renderers, devices

Without $BIOS_RENDER_ADDRESS / $BIOS_TRAIN_ADDRESS every command runs the services in its own process (the
embedded default; checkpoints go to $BIOS_CHECKPOINT_DIR, default ~/.cache/bios/checkpoints). Mistakes in what
you give print one line and exit with status 2; --debug shows the traceback instead.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, NoReturn

from bios import __version__
from bios.errors import BiosError
from bios_server.cli import checkpoints, info, render, sample, serve, train
from bios_server.cli.output import Console, UsageError, quiet_third_parties, setup_logging

USER_ERROR_CODES = (
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "ALREADY_EXISTS",
    "OUT_OF_RANGE",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
)


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless it says it already, or there is none); descriptions keep
    their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text
            or "default:" in text
            or not action.option_strings
            or action.default in (None, False, argparse.SUPPRESS)
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line (argparse would print the usage block first)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def common_options() -> Parser:
    """-v, --debug and --color, accepted before or after the command (defaults filled in by main)."""
    common = Parser(add_help=False)
    group = common.add_argument_group("output")
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more log output (-v info, -vv debug, third-party libraries included; default: quiet)",
    )
    group.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks instead of one-line errors"
    )
    group.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default=argparse.SUPPRESS,
        help="colour output (auto: only on a terminal, never with $NO_COLOR; default: auto)",
    )
    return common


def build_parser(argv: list[str] | None = None) -> Parser:
    """The whole parser; the servers' flags (their modules load torch) only when the command is `serve`."""
    argv = sys.argv[1:] if argv is None else argv
    common = common_options()
    parser = Parser(prog="bios", description=__doc__, formatter_class=Formatter, parents=[common])
    parser.add_argument("--version", action="version", version=f"bios {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    def command(name: str, help: str, description: str | None = None) -> Parser:
        return sub.add_parser(
            name, help=help, description=description or help, formatter_class=Formatter, parents=[common]
        )

    for module in (render, train, sample, checkpoints, info):
        module.register(command, common)
    serve.register(command, common, with_server_flags=command_of(argv) == "serve")
    return parser


def command_of(argv: list[str]) -> str | None:
    """The command word: the first argument that is neither an option nor --color's value."""
    args = iter(argv)
    for arg in args:
        if arg == "--color":
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    verbose, debug, color = getattr(args, "verbose", 0), getattr(args, "debug", False), getattr(args, "color", "auto")
    quiet_third_parties(verbose)
    setup_logging(verbose)
    console = Console(color)
    prog = f"bios {args.command}"
    try:
        return args.run(args, console) or 0
    except KeyboardInterrupt:
        console.clear_status()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error becomes one line unless --debug
        console.clear_status()
        if debug:
            raise
        user, message = describe(exc, getattr(args, "fields", {}))
        if not user:
            message += " (an unexpected error: rerun with --debug for the traceback)"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2 if user else 1


def describe(exc: BaseException, fields: dict[str, str]) -> tuple[bool, str]:
    """(is it the user's to fix?, one line). Server messages name a request field; the CLI names its flag."""
    if isinstance(exc, UsageError):
        return True, str(exc)
    if isinstance(exc, BiosError):
        message = " ".join(str(exc).split())
        code = getattr(exc.code, "name", str(exc.code))  # from a server, the message starts with the code too
        message = message.removeprefix("INVALID_ARGUMENT: ")
        if code not in USER_ERROR_CODES:
            return False, message
        for field, flag in fields.items():  # the leading field, e.g. "base_model: ..." -> "--model: ..."
            message = re.sub(rf"^((?:{code}: )?){re.escape(field)}: ", rf"\g<1>{flag}: ", message)
        return True, message
    if isinstance(exc, OSError) and exc.filename:
        return True, f"{exc.filename}: {exc.strerror}"
    return False, f"{type(exc).__name__}: {exc}"


Register = Callable[[str, str], Parser]
