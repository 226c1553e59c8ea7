"""`minidpo plot OUT`: draw a run's loss, reward accuracy and margins into OUT/metrics.png."""

from __future__ import annotations

HELP = "plot a training run's metrics.jsonl (loss, reward accuracy, margins) to a PNG"
FLAGS = {"out_file": "--output"}  # plot_metrics' parameter -> this command's flag


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="OUT", help="the --out folder of a train or sft run")
    parser.add_argument("--output", metavar="FILE.png", help="image to write (default OUT/metrics.png)")


def run(args) -> int:
    from minidpo.plot import plot_metrics

    print(plot_metrics(args.run_dir, args.output))
    return 0
