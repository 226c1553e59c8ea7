"""`python -m benchmarks [names...] [--tiny] [--device cuda|cpu] [--results-dir D]`.

Measures the device's ceilings, runs every benchmark module found in this package (or
the named ones), prints a table per benchmark and writes results/<device>-<date>.json
and .md plus a PNG per family. The JSON is rewritten after each benchmark, so a run cut
short keeps what it finished; rerunning some benchmarks on the same device and day
replaces only their entries. --tiny runs CPU-sized shapes into <device>-<date>-tiny.*,
which the README section ignores. Exit status 1 if a benchmark raised.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import pkgutil
import shlex
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

import torch

import benchmarks
from benchmarks import report
from benchmarks._harness import Context, device_info, machine_load, measure_ceilings, peer_versions, today
from minidpo.io import atomic_write, atomic_write_json, read_json


def discover() -> dict[str, ModuleType]:
    """Benchmark modules of this package (those with NAME and run), by NAME, sorted."""
    found = {}
    for info in pkgutil.iter_modules(benchmarks.__path__):
        if info.name.startswith("_") or info.name == "report":
            continue
        module = importlib.import_module(f"benchmarks.{info.name}")
        if callable(getattr(module, "run", None)) and hasattr(module, "NAME"):
            found[module.NAME] = module
    return dict(sorted(found.items()))


def build_parser(modules: dict[str, ModuleType]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Run minidpo's benchmarks and write a report.")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default all: {', '.join(modules)})")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized shapes: checks every path in seconds")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR, help="where the .json/.md/.png go")
    for module in modules.values():
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser.add_argument_group(module.NAME))
    return parser


def check_rows(name: str, rows) -> list[dict]:
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise TypeError(f"benchmark {name}: run() must return a list of dicts")
    for row in rows:
        for key, value in row.items():
            if not isinstance(value, (str, int, float, bool, type(None))):
                raise TypeError(f"benchmark {name}: row key {key!r} has non-scalar {type(value).__name__}")
    return rows


def load_previous(path: Path, result: dict) -> dict:
    """Entries of an earlier run on the same device, day and size, to keep beside the new ones."""
    if not path.exists():
        return {}
    previous = read_json(path)
    if previous.get("schema") != report.SCHEMA or previous.get("tiny") != result["tiny"]:
        return {}
    return previous.get("benchmarks", {})


def write_outputs(result: dict, json_path: Path) -> None:
    atomic_write_json(json_path, result)
    for name in result["benchmarks"]:
        report.plot_family(result, name, report.plot_path(json_path, name))
    atomic_write(json_path.with_suffix(".md"), report.render_markdown(result, json_path))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    modules = discover()
    parser = build_parser(modules)
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in modules]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(modules)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible here; use --device cpu")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    chosen = {n: modules[n] for n in (args.names or modules)}

    ctx = Context(
        device=device,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        tiny=args.tiny,
        args=args,
        peers=peer_versions(),
    )
    info = device_info(device)
    print(f"device: {info['name']} ({info['slug']}); dtype {ctx.dtype}; tiny={ctx.tiny}", flush=True)
    print(f"peers: {report.peers_line(ctx.peers)}", flush=True)
    torch.manual_seed(0)
    ctx.ceilings = measure_ceilings(ctx)
    print(report.ceilings_line(ctx.ceilings), flush=True)

    date = today()
    json_path = args.results_dir / f"{info['slug']}-{date}{'-tiny' if args.tiny else ''}.json"
    result = {
        "schema": report.SCHEMA,
        "date": date,
        "device": info,
        "tiny": args.tiny,
        "dtype": str(ctx.dtype).removeprefix("torch."),
        "command": "python -m benchmarks " + shlex.join(argv),
        "ceilings": ctx.ceilings,
        "peers": ctx.peers,
        "benchmarks": {},
    }
    result["benchmarks"] = load_previous(json_path, result)

    failed = []
    for name, module in chosen.items():
        print(f"\n== {name}", flush=True)
        torch.manual_seed(0)
        t0, load = time.perf_counter(), machine_load()
        error = None
        try:
            rows = check_rows(name, module.run(ctx))
        except Exception as e:  # one broken benchmark must not lose the others' numbers
            traceback.print_exc()
            rows, error = [], f"{type(e).__name__}: {e}".splitlines()[0]
            failed.append(name)
        ctx.release_memory()
        result["benchmarks"][name] = {
            "description": (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else "",
            "rows": rows,
            "error": error,
            "seconds": round(time.perf_counter() - t0, 2),
            "measured_at": dt.datetime.now().isoformat(timespec="seconds"),
            "load_avg": round(max(load, machine_load()), 2),  # 1-minute load average at its start and end
            "cores": info.get("cores"),
            "ceilings": ctx.ceilings,
            "plot": getattr(module, "PLOT", None),
        }
        print(report.format_table(rows) if not error else f"FAILED: {error}", flush=True)
        write_outputs(result, json_path)

    print(f"\nwrote {json_path} and {json_path.with_suffix('.md').name}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
