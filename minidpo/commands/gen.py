"""`minidpo gen {seed,rephrase,combine,all}`: the three-phase LibraChem data generation.

    minidpo gen all --offline --out data/                      # shipped banks, no network, seconds
    minidpo gen all --endpoint http://127.0.0.1:8000/v1 --model NAME --out data/
    minidpo gen rephrase --endpoint URL --model NAME --out data/ --dry-run

All files live in --out: compounds.jsonl (only when proposed by the LLM), seed.jsonl,
rephrase.jsonl (appended per record; rerun to resume), train.jsonl (every family),
test_triplets.jsonl, val_seen/val_unseen/eval_seen/eval_unseen.jsonl (synthesis),
val_<family>.jsonl and eval_<family>.jsonl for each bank (contrast, general, everyday)
found in --data-dir, manifest.json, and config.json (each phase's settings).
The API key is read from the environment variable named by --api-key-env and is never
printed or written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from minidpo.errors import MiniDPOError
from minidpo.gen.client import ChatClient
from minidpo.gen.combine import SYNTHESIS_SETS, combine, write_combined
from minidpo.gen.families import FAMILIES, load_family_banks
from minidpo.gen.offline import OfflineRephraser, load_banks
from minidpo.gen.rephrase import LLMRephraser, pending_rows, read_rephrased, run_rephrase
from minidpo.gen.seed import (
    LABELS,
    SHIPPED_DIR,
    build_seed,
    load_compounds,
    parse_ratio,
    propose_compounds,
    read_seed,
    save_compounds,
    write_seed,
)
from minidpo.io import atomic_write_json, check_output_dir, read_json

HELP = "Generate a LibraChem-style preference set: seed, rephrase (LLM or --offline), combine."
PHASES = ("seed", "rephrase", "combine")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, type=Path, help="folder for every file of the run")
    common.add_argument("--seed", type=int, default=0, help="seed of every deterministic choice (default 0)")
    common.add_argument("--data-dir", type=Path, default=SHIPPED_DIR,
                        help="folder with compounds.jsonl, prompts.json, answers.json and the family banks "
                             f"({', '.join(f + '.jsonl' for f in FAMILIES)}, each optional) (default: shipped LibraChem-mini)")
    common.add_argument("--prompts-dir", type=Path, help="folder of LLM prompt templates overriding gen/prompts/*.txt")
    common.add_argument("--dry-run", action="store_true", help="print the request count and a token estimate; write nothing")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")

    seed = argparse.ArgumentParser(add_help=False)
    g = seed.add_argument_group("seed")
    g.add_argument("--compounds", type=Path, help="compounds.jsonl to use (default: the one in --data-dir)")
    g.add_argument("--propose", action="store_true", help="ask the LLM for the compound lists (needs --num-compounds)")
    g.add_argument("--ratio", default="1:2", help="legitimate:illegitimate compounds, enforced exactly (default 1:2)")
    g.add_argument("--num-compounds", type=int, help="at most this many compounds per mode")
    g.add_argument("--modes", default="text", help="text, smiles or text,smiles (default text)")

    rephrase = argparse.ArgumentParser(add_help=False)
    g = rephrase.add_argument_group("rephrase")
    g.add_argument("-k", type=int, default=4, help="rephrasings of the prompt, chosen and rejected per row (default 4)")
    g.add_argument("--offline", action="store_true", help="fill from the shipped template banks; no endpoint")
    g.add_argument("--similarity", type=float, default=0.85, help="shingle Jaccard at which two texts are duplicates")
    g.add_argument("--fallback-offline", action="store_true",
                   help="fill a kind from the banks when the model's replies stay unusable (source says so)")

    endpoint = argparse.ArgumentParser(add_help=False)
    g = endpoint.add_argument_group("endpoint")
    g.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model", help="model name to request")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    g.add_argument("--timeout", type=float, default=120.0, help="read timeout per request, seconds")
    g.add_argument("--max-retries", type=int, default=6, help="retries per request on 429/5xx/timeouts")
    g.add_argument("--max-reasks", type=int, default=2, help="re-asks per request on unusable output")
    g.add_argument("--temperature", type=float, default=0.9)
    g.add_argument("--max-tokens", type=int, default=1024)
    g.add_argument("--no-json-mode", action="store_true", help="do not send response_format=json_object")

    combine_opts = argparse.ArgumentParser(add_help=False)
    g = combine_opts.add_argument_group("combine")
    g.add_argument("--test-fraction", type=float, default=0.2, help="share of compounds (and family topics) held out as test")
    g.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of compounds (and family topics) held out for validation")
    g.add_argument("--holdout-fraction", type=float, default=0.25, help="share of phrasings held out as test")
    g.add_argument("--val-holdout-fraction", type=float, default=0.15, help="share of phrasings held out for validation")
    g.add_argument("--max-per-compound", type=int, default=16, help="triplets per compound and mode at most")
    g.add_argument("--allow-incomplete", action="store_true", help="combine even if some rows failed to rephrase")

    sub = parser.add_subparsers(dest="phase", metavar="PHASE", required=True)
    parents = {"seed": [common, seed, endpoint], "rephrase": [common, rephrase, endpoint],
               "combine": [common, combine_opts], "all": [common, seed, rephrase, endpoint, combine_opts]}
    helps = {"seed": "phase 1: the balanced seed", "rephrase": "phase 2: k rephrasings per row (resumable)",
             "combine": "phase 3: triplets, split by compound, eval sets", "all": "all three phases"}
    for name, parent_list in parents.items():
        sub.add_parser(name, parents=parent_list, help=helps[name], description=helps[name])


# option dest -> (flag, accepts(value), what it must be); checked before anything runs
LIMITS = {
    "k": ("-k", lambda v: v >= 1, ">= 1"),
    "num_compounds": ("--num-compounds", lambda v: v >= 1, ">= 1"),
    "similarity": ("--similarity", lambda v: 0 < v <= 1, "in (0, 1]"),
    "test_fraction": ("--test-fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    "val_fraction": ("--val-fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    "holdout_fraction": ("--holdout-fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    "val_holdout_fraction": ("--val-holdout-fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    "max_per_compound": ("--max-per-compound", lambda v: v >= 1, ">= 1"),
    "concurrency": ("--concurrency", lambda v: v >= 1, ">= 1"),
    "timeout": ("--timeout", lambda v: v > 0, "> 0 seconds"),
    "max_retries": ("--max-retries", lambda v: v >= 0, ">= 0"),
    "max_reasks": ("--max-reasks", lambda v: v >= 0, ">= 0"),
    "temperature": ("--temperature", lambda v: 0 <= v <= 2, "in [0, 2]"),
    "max_tokens": ("--max-tokens", lambda v: v >= 1, ">= 1"),
}


def check_arguments(args: argparse.Namespace) -> None:
    for dest, (flag, accepts, what) in LIMITS.items():
        value = getattr(args, dest, None)
        if value is not None and not accepts(value):
            raise MiniDPOError(f"{flag} must be {what}, got {value}")
    check_output_dir(args.out)
    if args.phase in ("rephrase", "all") and not args.offline:
        check_endpoint(args)  # before the seed phase writes anything


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    phases = PHASES if args.phase == "all" else (args.phase,)
    rows = run_seed(args) if "seed" in phases else read_seed(args.out / "seed.jsonl")
    if "rephrase" in phases:
        if rows is None:
            print("rephrase: 3 requests per seed row, once the proposed compounds exist")
        elif not run_rephrase_phase(args, rows):
            return 1
    if "combine" in phases and args.dry_run:
        print("combine: 0 requests")
    elif "combine" in phases:
        run_combine(args, rows)
    return 0


def check_endpoint(args: argparse.Namespace) -> None:
    if not args.endpoint or not args.model:
        raise MiniDPOError(f"gen {args.phase}: give --endpoint URL and --model NAME, or --offline for the shipped banks")


def make_client(args: argparse.Namespace) -> ChatClient:
    check_endpoint(args)
    return ChatClient(
        args.endpoint, args.model, api_key_env=args.api_key_env, read_timeout=args.timeout,
        max_retries=args.max_retries, max_reasks=args.max_reasks, workers=args.concurrency,
        json_mode=not args.no_json_mode, temperature=args.temperature, max_tokens=args.max_tokens,
    )


def run_seed(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """Phase 1; None in a dry run that would first have to propose the compounds."""
    ratio = parse_ratio(args.ratio)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    proposed = args.out / "compounds.jsonl"
    if args.propose and not proposed.exists():
        if getattr(args, "offline", False):
            raise MiniDPOError("gen all --propose asks the LLM for compounds: drop --offline, or drop --propose")
        if not args.num_compounds:
            raise MiniDPOError("gen seed --propose: give --num-compounds N (how many compounds to ask for)")
        units = args.num_compounds // sum(ratio)
        if args.dry_run:
            print(f"seed: 2 requests to propose {units * ratio[0]} legitimate and {units * ratio[1]} "
                  "illegitimate compounds")
            return None
        compounds = propose_compounds(make_client(args), units * ratio[0], units * ratio[1], args.prompts_dir)
        save_compounds(compounds, proposed)
    else:
        path = proposed if args.propose else (args.compounds or args.data_dir / "compounds.jsonl")
        compounds = load_compounds(path)
    rows = build_seed(compounds, ratio=ratio, modes=modes, limit=args.num_compounds, seed=args.seed,
                      prompts_dir=args.prompts_dir)
    counts = ", ".join(f"{sum(r['label'] == label for r in rows)} {label}" for label in LABELS)
    if args.dry_run:
        print(f"seed: {len(rows)} rows ({counts}; {','.join(modes)}); nothing written (dry run)")
        return rows
    write_seed(rows, args.out / "seed.jsonl")
    record_config(args.out, "seed", {"ratio": f"{ratio[0]}:{ratio[1]}", "modes": list(modes), "seed": args.seed,
                                     "num_compounds": args.num_compounds, "propose": args.propose,
                                     "compounds": str(proposed if args.propose else args.compounds or args.data_dir)})
    print(f"seed: {len(rows)} rows ({counts}; {','.join(modes)}) -> {args.out / 'seed.jsonl'}")
    return rows


def run_rephrase_phase(args: argparse.Namespace, rows: list[dict[str, Any]]) -> bool:
    """Phase 2; False when some rows failed (they are retried by the next run)."""
    out_path = args.out / "rephrase.jsonl"
    banks = load_banks(args.data_dir) if args.offline or args.fallback_offline else None
    offline = OfflineRephraser(banks, args.k, seed=args.seed, similarity=args.similarity) if banks else None
    if args.offline:
        rephraser, client = offline, None
    else:
        client = make_client(args)
        rephraser = LLMRephraser(client, args.k, similarity=args.similarity, prompts_dir=args.prompts_dir,
                                 fallback=offline if args.fallback_offline else None)
    if args.dry_run:
        pending = pending_rows(rows, out_path)
        if client is None:
            print(f"rephrase: {len(pending)} rows to fill offline, 0 requests")
        else:
            n, prompt_tokens, completion_tokens = rephraser.estimate(pending)
            print(f"rephrase: {len(pending)} rows, {n} requests (more on retries and re-asks), about "
                  f"{prompt_tokens} prompt + {completion_tokens} completion tokens (4 characters a token)")
        return True
    config = {"k": args.k, "offline": args.offline, "similarity": args.similarity, "seed": args.seed,
              "model": None if args.offline else args.model}
    check_same_settings(args.out, out_path, config)
    record_config(args.out, "rephrase", {**config, "endpoint": None if args.offline else args.endpoint,
                                         "fallback_offline": args.fallback_offline,
                                         "temperature": None if args.offline else args.temperature})
    summary = run_rephrase(rows, out_path, rephraser, workers=1 if client is None else args.concurrency,
                           progress=not args.no_progress)
    print(f"rephrase: {summary.done} new, {summary.skipped} already done, {summary.failed} failed "
          f"of {summary.total} -> {out_path}")
    if client is not None:
        s = client.stats.as_dict()
        print(f"usage: {s['requests']} requests, {s['retries']} retries, {s['reasks']} re-asks, "
              f"{s['prompt_tokens']} prompt + {s['completion_tokens']} completion tokens")
    for line in summary.errors[:5]:
        print(f"  failed {line}")
    if summary.failed:
        print(f"rephrase: rerun the same command to retry the {summary.failed} failed rows")
    return summary.failed == 0


def run_combine(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    families = load_family_banks(args.data_dir)
    result = combine(rows, read_rephrased(args.out / "rephrase.jsonl"), families=families,
                     val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                     holdout_fraction=args.holdout_fraction, val_holdout_fraction=args.val_holdout_fraction,
                     max_per_compound=args.max_per_compound, seed=args.seed, allow_incomplete=args.allow_incomplete)
    config_path = args.out / "config.json"
    write_combined(result, args.out, read_json(config_path) if config_path.exists() else None)
    c = result.manifest["counts"]
    compounds = " / ".join(f"{side} {c['compounds'][side]['total']}" for side in ("train", "val", "test"))
    prompts = ", ".join(f"{name} {c[name]['total']}" for name in SYNTHESIS_SETS)
    print(f"combine: {c['train']['total']} train pairs ({c['train']['synthesis']['total']} synthesis), "
          f"{c['test_triplets']['total']} test triplets; synthesis prompts {prompts}; compounds {compounds}")
    for family, fc in c["families"].items():
        topics = " / ".join(f"{side} {n}" for side, n in fc["topics"].items())
        print(f"combine: {family}: topics {topics}; {fc['train_pairs']} train pairs, "
              f"val_{family} {fc['val']} + eval_{family} {fc['eval']} prompts")
    absent = [f for f in FAMILIES if f not in c["families"]]
    if absent:
        print(f"combine: no {', '.join(f + '.jsonl' for f in absent)} in {args.data_dir}; those families are left out")
    print(f"combine: -> {args.out}")


def check_same_settings(out: Path, records_path: Path, config: dict[str, Any]) -> None:
    """Refuse to mix records made with different settings in one rephrase.jsonl."""
    path = out / "config.json"
    if not records_path.exists() or records_path.stat().st_size == 0 or not path.exists():
        return
    before = read_json(path).get("rephrase", {})
    changed = [f"{key} {before[key]!r} -> {value!r}" for key, value in config.items() if key in before and before[key] != value]
    if changed:
        raise MiniDPOError(f"{records_path} was made with other settings ({', '.join(changed)}); "
                           "use a new --out, or delete rephrase.jsonl to start over")


def record_config(out: Path, phase: str, config: dict[str, Any]) -> None:
    """Keep each phase's settings in out/config.json (manifest.json embeds them)."""
    path = out / "config.json"
    current = read_json(path) if path.exists() else {}
    atomic_write_json(path, {**current, phase: config})
