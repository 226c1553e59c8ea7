"""Turn benchmark result files into a console table, Markdown, PNG plots and a README section.

A result file (benchmarks/results/<device>-<date>.json, written by `python -m benchmarks`):

    {"schema": 1, "date": "2026-11-22", "device": {"type", "name", "slug", ...},
     "tiny": false, "dtype": "bfloat16", "command": "...", "ceilings": {...}, "peers": {...},
     "benchmarks": {NAME: {"description", "rows": [{...}], "error": str | None,
                           "seconds", "measured_at", "ceilings", "plot": {...} | None}}}

`python -m benchmarks.report [--results-dir D]` prints the README results section built
from the newest full-size (not --tiny) file of each device, every figure with its device
and date.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from minidpo.io import read_json

SCHEMA = 1
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def format_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
            return f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.3g}"
        return f"{v:.4g}"
    return str(v)


def columns(rows: list[dict]) -> list[str]:
    """Every key of the rows, in the order first seen."""
    return list(dict.fromkeys(k for row in rows for k in row))


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of the rows (all keys, first-seen order)."""
    if not rows:
        return "(no rows)"
    cols = columns(rows)
    cells = [[format_value(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(format_value(row.get(c)) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


def busy_note(entry: dict) -> list[str]:
    """A warning paragraph when a benchmark ran on a busy machine: rows marked busy (harness
    `interleaved`), or a load average above the core count at its start or end."""
    rows = entry["rows"]
    busy = [r for r in rows if r.get("busy")]
    load, cores = entry.get("load_avg"), entry.get("cores")
    if busy:
        top = max(r.get("load_avg") or 0 for r in busy)
        what = f"{len(busy)} of {len(rows)} rows ran with the load average above the core count (up to {top:g})"
    elif load and cores and load > cores:
        what = f"this benchmark ran with the load average at {load:g} on {cores} cores"
    else:
        return []
    return [f"**busy:** {what}: these numbers measure the machine's load as much as the code; "
            "redo them on a quiet machine.", ""]


def ceilings_line(ceilings: dict[str, Any]) -> str:
    if not ceilings:
        return "ceilings: not measured"
    return (
        f"measured ceilings: copy {ceilings['copy_gbps']:.1f} GB/s (read + write), "
        f"{ceilings['matmul_dtype']} matmul {ceilings['matmul_tflops']:.2f} TFLOP/s "
        f"({'x'.join(map(str, ceilings['matmul_shape']))}, random data)"
    )


def peers_line(peers: dict[str, str | None]) -> str:
    return ", ".join(f"{k} {v}" if v else f"{k} (absent)" for k, v in peers.items())


def plot_path(json_path: Path, family: str) -> Path:
    return json_path.with_name(f"{json_path.stem}-{family}.png")


def render_markdown(result: dict, json_path: Path) -> str:
    """The .md report written beside a result file."""
    dev = result["device"]
    out = [
        f"# Benchmarks: {dev['name']}, {result['date']}",
        "",
        f"- device: {dev['name']} ({dev['type']}); compute dtype {result['dtype']}"
        + ("; --tiny (CPU-sized shapes: checks the path, not the speed)" if result["tiny"] else ""),
        f"- {ceilings_line(result['ceilings'])}",
        f"- peers: {peers_line(result['peers'])}",
        f"- command: `{result['command']}`",
        "",
    ]
    for name, entry in result["benchmarks"].items():
        out += [f"## {name}", "", entry.get("description") or "", ""]
        if entry.get("error"):
            out += [f"**failed:** `{entry['error']}`", ""]
        out += busy_note(entry)
        out += [markdown_table(entry["rows"]), ""]
        png = plot_path(json_path, name)
        if png.exists():
            out += [f"![{name} on {dev['name']}, {result['date']}]({png.name})", ""]
    return "\n".join(out)


def plot_family(result: dict, family: str, path: Path) -> bool:
    """Draw a benchmark's rows as one line per series (its PLOT spec); False if nothing to draw."""
    entry = result["benchmarks"][family]
    spec = entry.get("plot")
    if not spec:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    x, y, series = spec["x"], spec["y"], tuple(spec.get("series", ()))
    lines: dict[str, list[tuple[Any, float]]] = {}
    for row in entry["rows"]:
        if isinstance(row.get(y), (int, float)) and row.get(x) is not None:
            label = " ".join(str(row.get(s)) for s in series) or y
            lines.setdefault(label, []).append((row[x], row[y]))
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in lines.items():
        points.sort(key=lambda p: p[0])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if spec.get("logx"):
        ax.set_xscale("log", base=2)
    if spec.get("logy"):
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{family}: {result['device']['name']}, {result['date']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def latest_results(results_dir: Path) -> list[tuple[Path, dict]]:
    """The newest full-size result file of each device, by date."""
    newest: dict[str, tuple[Path, dict]] = {}
    for path in sorted(results_dir.glob("*.json")):
        result = read_json(path)
        if result.get("schema") != SCHEMA or result.get("tiny"):
            continue
        slug = result["device"]["slug"]
        if slug not in newest or result["date"] > newest[slug][1]["date"]:
            newest[slug] = (path, result)
    return sorted(newest.values(), key=lambda pr: (pr[1]["device"]["type"] != "cuda", pr[1]["device"]["slug"]))


def readme_section(results_dir: Path = RESULTS_DIR, link_prefix: str = "benchmarks/results/") -> str:
    """The README's results section: per device, each benchmark's table and plot."""
    out = ["## Benchmark results", ""]
    found = latest_results(results_dir)
    if not found:
        return "\n".join([*out, "No results yet: run `python -m benchmarks` on a GPU (see benchmarks/results/README.md).", ""])
    for path, result in found:
        dev = result["device"]
        out += [
            f"### {dev['name']}, {result['date']}",
            "",
            f"{ceilings_line(result['ceilings'])}; peers: {peers_line(result['peers'])}. "
            f"Full report: [{path.stem}.md]({link_prefix}{path.stem}.md).",
            "",
        ]
        for name, entry in result["benchmarks"].items():
            out += [f"**{name}** ({dev['name']}, {result['date']}): {entry.get('description') or ''}", ""]
            if entry.get("error"):
                out += [f"failed: `{entry['error']}`", ""]
            out += busy_note(entry)
            out += [markdown_table(entry["rows"]), ""]
            png = plot_path(path, name)
            if png.exists():
                out += [f"![{name} on {dev['name']}, {result['date']}]({link_prefix}{png.name})", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    print(readme_section(args.results_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
