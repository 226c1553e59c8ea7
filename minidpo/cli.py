"""The `minidpo` command line: a table of sub-commands, each a small module.

Each sub-command lives in minidpo/commands/<name>.py with three names:
`HELP` (one line), `add_arguments(parser)` and `run(args) -> int | None`. Only the chosen
command's module is imported, so `minidpo --help` is instant and a command's options sit
next to the few lines that call the library. User mistakes (MiniDPOError) print one line
and exit 2; Ctrl-C exits 130 after the command has saved what it must. A ParameterError
names a library parameter (`max_steps`, `r`); its line names the command's flag instead
(`--max-steps`, or the command module's `FLAGS` entry: `--lora-r`).
"""

from __future__ import annotations

import argparse
import importlib
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


def _load(name: str):
    return importlib.import_module(f"minidpo.commands.{COMMANDS[name]}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; with `command`, only that sub-command's module is imported."""
    parser = argparse.ArgumentParser(
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


if __name__ == "__main__":
    sys.exit(main())
