"""Phase 3 of the LibraChem pipeline: pairs of every family, the splits, and the
validation and test sets.

Synthesis (the seed's compounds):
- Split by compound (no compound on two sides, whatever its modes): within each class
  compounds are ordered by stable hash; the first ones go to test, the next to
  validation, the rest to train. When the class sizes L and I are in a ratio a:b with
  g = gcd(L, I) >= 2 "units", test and validation take round(g * fraction) whole units
  each (t*a legitimate, t*b illegitimate), so every side keeps the seed's ratio exactly;
  otherwise each class is rounded on its own.
- Held-out phrasings: a prompt's phrasing key is its normalized text with the compound's
  SMILES, name and aliases replaced by placeholders; with u = stable_fraction(seed, key),
  keys with u < holdout_fraction are test phrasings and keys with u < holdout_fraction +
  val_holdout_fraction validation phrasings, never used in train, for any compound. So a
  template shared by many compounds (offline mode) is held out for all of them at once.
- train.jsonl: for each train compound, its train-phrasing prompts x chosen x rejected,
  at most `max_per_compound` of them, the first in stable-hash order.
  test_triplets.jsonl: the same for test compounds (all their prompts), for a DPO eval
  loss (`minidpo train --eval-data`).
- val_seen / eval_seen: the validation / test phrasings of train compounds. val_unseen:
  every prompt of a validation compound. eval_unseen: every prompt of a test compound,
  and of the rare train compound whose phrasings were all held out. Rows {id, prompt,
  true_label (1 legitimate, 0 illegitimate, as in the reference), family "synthesis",
  compound, mode, reference_answer and key_facts (legitimate: a chosen outline and what
  it must name)}.
The other families (gen/families.py, from the banks in the data folder) add their pairs
to train.jsonl and write val_<family>.jsonl and eval_<family>.jsonl, split by topic with
the same validation and test fractions. train.jsonl is in stable-hash order of ids, so
classes and families are mixed; every row says its "family".
manifest.json holds the configuration, the seed and every count. Everything here is a
pure function of the seed rows, the records, the banks and the configuration: rerunning
gives byte-identical files.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minidpo.errors import MiniDPOError
from minidpo.io import atomic_write, atomic_write_json

from .dedup import normalize
from .families import FamilyBanks, family_sets
from .hashing import stable_fraction, stable_hash

SYNTHESIS_SETS = ("val_seen", "val_unseen", "eval_seen", "eval_unseen")


@dataclass
class Combined:
    train: list[dict[str, Any]] = field(default_factory=list)
    test_triplets: list[dict[str, Any]] = field(default_factory=list)
    evals: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # file stem -> validation or test rows
    manifest: dict[str, Any] = field(default_factory=dict)


def split_by_compound(labels: dict[str, str], *, val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """compound -> "train" | "val" | "test", given compound -> label (see the module doc for the rule)."""
    by_label = {
        label: sorted((c for c, lab in labels.items() if lab == label), key=lambda c: stable_hash(seed, "split", c))
        for label in ("legitimate", "illegitimate")
    }
    sizes = {label: len(names) for label, names in by_label.items()}
    units = math.gcd(*sizes.values())
    unit_counts = {"test": _round(units * test_fraction), "val": _round(units * val_fraction)}
    whole_units = units >= 2 and sum(unit_counts.values()) < units and all(
        (unit_counts[side] > 0) == (fraction > 0) for side, fraction in (("test", test_fraction), ("val", val_fraction)))
    side_of = {}
    for label, names in by_label.items():
        if whole_units:
            n_test, n_val = (sizes[label] // units * unit_counts[side] for side in ("test", "val"))
        else:
            n_test = _round(sizes[label] * test_fraction)
            n_val = min(_round(sizes[label] * val_fraction), sizes[label] - n_test)
        for i, c in enumerate(names):
            side_of[c] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return side_of


def phrasing_key(prompt: str, record: dict[str, Any]) -> str:
    """The prompt's wording with its SMILES, compound name and aliases replaced: the unit that is held out."""
    text = prompt
    if record.get("smiles"):
        text = text.replace(record["smiles"], "{smiles}")
    for name in sorted([record["compound"], *(record.get("aliases") or [])], key=len, reverse=True):
        text = re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", "{compound}", text, flags=re.IGNORECASE)
    return normalize(text)


def phrasing_split(prompt: str, record: dict[str, Any], holdout_fraction: float, val_holdout_fraction: float,
                   seed: int) -> str:
    """"test", "val" or "train": where the prompt's phrasing is held out (see the module doc)."""
    u = stable_fraction(seed, "holdout", phrasing_key(prompt, record))
    return "test" if u < holdout_fraction else "val" if u < holdout_fraction + val_holdout_fraction else "train"


def combine(
    seed_rows: list[dict[str, Any]],
    records: list[dict[str, Any]],
    *,
    families: FamilyBanks | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    holdout_fraction: float = 0.25,
    val_holdout_fraction: float = 0.15,
    max_per_compound: int = 16,
    seed: int = 0,
    allow_incomplete: bool = False,
) -> Combined:
    shares = {"val_fraction": val_fraction, "test_fraction": test_fraction,
              "holdout_fraction": holdout_fraction, "val_holdout_fraction": val_holdout_fraction}
    for name, value in shares.items():
        if not 0 <= value < 1:
            raise MiniDPOError(f"combine: {name} is {value}; give a share in [0, 1)")
    for a, b in (("val_fraction", "test_fraction"), ("val_holdout_fraction", "holdout_fraction")):
        if shares[a] + shares[b] >= 1:
            raise MiniDPOError(f"combine: {a} + {b} must stay below 1 so that something is left to train on")
    by_id: dict[str, dict[str, Any]] = {}
    for r in records:
        by_id.setdefault(r.get("id"), r)
    missing = [row["id"] for row in seed_rows if row["id"] not in by_id]
    if missing and not allow_incomplete:
        raise MiniDPOError(
            f"combine: {len(missing)} of {len(seed_rows)} seed rows have no rephrased record yet "
            f"(first: {missing[0]}); rerun `minidpo gen rephrase`, or pass --allow-incomplete"
        )
    # A record with its compound's aliases and key facts, which the seed row holds.
    ordered = [{**by_id[row["id"]], "aliases": row.get("aliases") or [], "key_facts": row.get("key_facts") or []}
               for row in seed_rows if row["id"] in by_id]
    labels = {r["compound"]: r["label"] for r in ordered}
    side = split_by_compound(labels, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)

    def phrasing(prompt: str, r: dict[str, Any]) -> str:
        return phrasing_split(prompt, r, holdout_fraction, val_holdout_fraction, seed)

    out = Combined(evals={name: [] for name in SYNTHESIS_SETS})
    trained: set[str] = set()
    for r in ordered:
        if side[r["compound"]] == "test":
            out.test_triplets += _triplets(r, r["prompts"], max_per_compound, seed)
        elif side[r["compound"]] == "train":
            kept = [p for p in r["prompts"] if phrasing(p, r) == "train"]
            out.train += _triplets(r, kept, max_per_compound, seed)
            if kept and r["chosen"] and r["rejected"]:
                trained.add(r["compound"])
    for r in ordered:
        for i, p in enumerate(r["prompts"]):
            if side[r["compound"]] == "val":
                name = "val_unseen"
            elif r["compound"] in trained:
                name = {"val": "val_seen", "test": "eval_seen"}.get(phrasing(p, r))
            else:
                name = "eval_unseen"
            if name:
                out.evals[name].append(_eval_row(r, i, p))
    extra = family_sets(families or FamilyBanks({}), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    out.train += extra.train
    out.evals.update(extra.evals)
    out.train.sort(key=lambda t: stable_hash(seed, "order", t["id"]))
    synthesis_train = [t for t in out.train if t["family"] == "synthesis"]
    out.manifest = {
        "config": {"combine": {"val_fraction": val_fraction, "test_fraction": test_fraction,
                               "holdout_fraction": holdout_fraction, "val_holdout_fraction": val_holdout_fraction,
                               "max_per_compound": max_per_compound, "seed": seed,
                               "allow_incomplete": allow_incomplete}},
        "counts": {
            "seed_rows": len(seed_rows),
            "records": len(ordered),
            "missing_records": len(missing),
            "compounds": {s: _by_label([r for r in _unique_compounds(ordered) if side[r["compound"]] == s])
                          for s in ("train", "val", "test")},
            "train": {"total": len(out.train), "synthesis": _by_label(synthesis_train),
                      **{family: c["train_pairs"] for family, c in extra.counts.items()}},
            "test_triplets": _by_label(out.test_triplets),
            **{name: _by_label(out.evals[name], "true_label") for name in SYNTHESIS_SETS},
            "families": extra.counts,
        },
        "sources": dict(sorted(Counter(r["source"] for r in ordered).items())),
    }
    return out


def write_combined(result: Combined, out_dir: str | Path, extra_config: dict[str, Any] | None = None) -> None:
    """Write train, test_triplets, every validation and test set (JSONL) and manifest.json, each atomically.

    `extra_config` (the earlier phases' settings, by phase) joins the manifest's config.
    """
    out_dir = Path(out_dir)
    sets = {"train": result.train, "test_triplets": result.test_triplets, **result.evals}
    for name, rows in sets.items():
        atomic_write(out_dir / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    manifest = dict(result.manifest)
    manifest["config"] = {**(extra_config or {}), **manifest["config"]}
    atomic_write_json(out_dir / "manifest.json", manifest)


def _triplets(r: dict[str, Any], prompts: list[str], cap: int, seed: int) -> list[dict[str, Any]]:
    index = {p: i for i, p in enumerate(r["prompts"])}
    combos = [
        (f"{r['id']}.p{index[p]}c{c}r{j}", p, chosen, rejected)
        for p, (c, chosen), (j, rejected) in itertools.product(prompts, enumerate(r["chosen"]), enumerate(r["rejected"]))
    ]
    combos.sort(key=lambda t: stable_hash(seed, "triplet", t[0]))
    return [
        {"id": tid, "prompt": p, "chosen": chosen, "rejected": rejected, "label": r["label"], "family": "synthesis",
         "compound": r["compound"], "mode": r["mode"], "source": r["source"]}
        for tid, p, chosen, rejected in combos[:cap]
    ]


def _eval_row(r: dict[str, Any], i: int, prompt: str) -> dict[str, Any]:
    row = {"id": f"{r['id']}.p{i}", "prompt": prompt, "true_label": int(r["label"] == "legitimate"),
           "family": "synthesis", "compound": r["compound"], "mode": r["mode"]}
    if r["label"] == "legitimate" and r["chosen"]:
        row["reference_answer"] = r["chosen"][0]
        if r["key_facts"]:
            row["key_facts"] = r["key_facts"]
    return row


def _unique_compounds(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list({r["compound"]: r for r in records}.values())


def _by_label(rows: list[dict[str, Any]], key: str = "label") -> dict[str, int]:
    if key == "true_label":
        counts = Counter("legitimate" if r[key] == 1 else "illegitimate" for r in rows)
    else:
        counts = Counter(r[key] for r in rows)
    return {"legitimate": counts.get("legitimate", 0), "illegitimate": counts.get("illegitimate", 0), "total": len(rows)}


def _round(x: float) -> int:
    """Round half up (Python's round() rounds half to even)."""
    return math.floor(x + 0.5)
