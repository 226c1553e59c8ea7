"""The `minidpo` command line: a table of sub-commands, each a small module.

Each sub-command lives in minidpo/commands/<name>.py with three names:
`HELP` (one line), `add_arguments(parser)` and `run(args) -> int | None`. Only the chosen
command's module is imported, so `minidpo --help` is instant and a command's options sit
next to the few lines that call the library. User mistakes (MiniDPOError) print one line
and exit 2; Ctrl-C exits 130 after the command has saved what it must. A ParameterError
names a library parameter (`max_steps`, `r`); its line names the command's flag instead
(`--max-steps`, or the command module's `FLAGS` entry: `--lora-r`). An OSError on a named
file (permissions, a full disk) and argparse's own errors are one line too (usage is not
repeated: `--help` shows it). Numbers are checked as they are parsed: a float option must
be finite, an int fits in 64 bits, and the options in RANGES stay in their range.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys

from minidpo.errors import MiniDPOError, ParameterError

# command name -> module under minidpo.commands, in the order --help lists them
COMMANDS = {
    "fetch-default": "fetch_default",
    "convert-gguf": "convert_gguf",
    "generate": "generate",
    "chat": "chat",
    "serve": "serve",
    "sft": "sft",
    "train": "train",
    "merge": "merge",
    "plot": "plot",
    "gen": "gen",
    "eval": "eval",
    "demo": "demo",
}

# option dest -> the inclusive range every command accepts for it
RANGES = {
    "seed": (0, 2**32 - 1),  # torch, numpy and the data order all take it
    "port": (0, 65535),
}
INT64_MAX = 2**63 - 1


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int64(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if abs(value) > INT64_MAX:
        raise argparse.ArgumentTypeError(f"{text} is out of range (at most {INT64_MAX} in size)")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with checked numbers (`type=float` is finite_float, `type=int` is int64)
    and its errors on one line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("type", float, finite_float)
        self.register("type", int, int64)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def check_ranges(args: argparse.Namespace) -> None:
    for dest, (low, high) in RANGES.items():
        value = getattr(args, dest, None)
        if value is not None and not low <= value <= high:
            raise MiniDPOError(f"--{dest}: must be in {low}..{high}, got {value}")


def _load(name: str):
    return importlib.import_module(f"minidpo.commands.{COMMANDS[name]}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; with `command`, only that sub-command's module is imported."""
    parser = Parser(
        prog="minidpo", description="Preference alignment from scratch: DPO + LoRA, Triton log-probs, eval."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        if name == command:
            module = _load(name)
            p = sub.add_parser(name, help=module.HELP, description=module.HELP)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
        else:
            sub.add_parser(name, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        command = None
    try:
        if command is None:
            parser = build_parser()
            if not argv or argv[0] in ("-h", "--help"):
                parser.print_help()
                print("\ncommands:")
                for name in COMMANDS:
                    print(f"  {name:<14} {_load(name).HELP}")
                return 0
            parser.parse_args(argv)  # reports the unknown command and exits 2
            return 2
        args = build_parser(command).parse_args(argv)
        check_ranges(args)
        return int(args._run(args) or 0)
    except ParameterError as e:
        flags = getattr(_load(command), "FLAGS", {})
        print(f"minidpo: error: {e.renamed(lambda p: flags.get(p, '--' + p.replace('_', '-')))}", file=sys.stderr)
        return 2
    except MiniDPOError as e:
        print(f"minidpo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minidpo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # the file system refused: permissions, a full disk, a path in the way
        if e.filename is None:
            raise
        print(f"minidpo: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
