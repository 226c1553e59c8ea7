"""Phase 1 of the LibraChem pipeline: the compound lists and the balanced seed.

Two lists of compounds, legitimate (aspirin, polyethylene oxide, ...) and illegitimate
(nerve agents, controlled drugs, explosives), each with a category and, where known, a
SMILES string; a legitimate compound also carries a brief benign outline of a standard
preparation and 1-3 key facts (the reagents or feedstocks its outline names, gen/facts.py)
so a correct answer can be told from a templated outline of another compound. Any
compound may list "aliases" (street, trade or IUPAC names) that rephrasings use in place
of its name. The lists are the shipped LibraChem-mini ones, a user's file in the same
format (compounds.jsonl), or proposed by an LLM (gen/prompts/propose_*.txt).

The balanced seed (the LibraChem paper, arXiv 2501.13952, phase 1) keeps both classes in a fixed legitimate :
illegitimate ratio a:b, exactly: it takes u*a legitimate and u*b illegitimate compounds
for the largest u the lists (and an optional limit) allow, so the model learns the
boundary rather than a blanket refusal. Within a class the take is stratified by
category: each category gets its proportional share n*size/total, rounded by largest
remainder, and compounds inside a category are taken in stable-hash order. Each chosen
compound gives one seed row per mode: TEXT (asked by name) and SMILES (asked by its
SMILES string; compounds without one are left out of that mode, and the ratio is
enforced per mode).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import minidpo
from minidpo.errors import MiniDPOError
from minidpo.io import atomic_write, read_jsonl_records

from .client import ChatClient
from .dedup import normalize
from .facts import key_facts_problem
from .hashing import record_id, stable_hash
from .templates import chat_messages, fill, load_template

LABELS = ("legitimate", "illegitimate")
MODES = ("text", "smiles")
SHIPPED_DIR = Path(minidpo.__file__).parent / "data" / "librachem_mini"
SEED_KEYS = {"id": str, "compound": str, "label": str, "category": str, "mode": str, "prompt": str}


@dataclass(frozen=True)
class Compound:
    name: str
    label: str  # "legitimate" | "illegitimate"
    category: str
    smiles: str | None = None
    outline: str | None = None  # legitimate only: a brief benign outline of a standard preparation
    aliases: tuple[str, ...] = ()  # other names a request may use (street, trade, IUPAC)
    key_facts: tuple[str, ...] = ()  # legitimate only: what a correct outline names (gen/facts.py)


def load_compounds(path: str | Path) -> list[Compound]:
    """Read and check compounds.jsonl; any bad line is a one-line error naming it."""
    path = Path(path)
    compounds, seen = [], {}
    for lineno, row in read_jsonl_records(
        path, {"name": str, "label": str, "category": str}, on_skip=_fail("fix that line")
    ):
        where = f"{path}:{lineno}"
        name, label = row["name"].strip(), row["label"]
        if not name or not row["category"].strip():
            raise MiniDPOError(f'{where}: "name" and "category" must not be empty')
        if label not in LABELS:
            raise MiniDPOError(f'{where}: "label" is {label!r}; use "legitimate" or "illegitimate"')
        smiles = row.get("smiles")
        if smiles is not None and (not isinstance(smiles, str) or not smiles.strip()):
            raise MiniDPOError(f'{where}: "smiles" must be a non-empty string or null')
        outline = row.get("outline")
        if label == "legitimate" and (not isinstance(outline, str) or not outline.strip()):
            raise MiniDPOError(f'{where}: a legitimate compound needs an "outline" (a brief standard preparation)')
        aliases = row.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
            raise MiniDPOError(f'{where}: "aliases" must be a list of non-empty strings')
        facts = row.get("key_facts")
        if facts is not None:
            problem = key_facts_problem(facts, outline or "", "the outline") if label == "legitimate" else (
                '"key_facts" are for legitimate compounds (what their outline names)')
            if problem:
                raise MiniDPOError(f"{where}: {problem}")
        for key in (name, *aliases):
            if normalize(key) in seen:
                raise MiniDPOError(f"{where}: name {key!r} repeats line {seen[normalize(key)]}; keep one")
            seen[normalize(key)] = lineno
        compounds.append(Compound(name, label, row["category"].strip(), smiles and smiles.strip(),
                                  outline.strip() if label == "legitimate" else None,
                                  tuple(a.strip() for a in aliases), tuple(facts or ())))
    if not compounds:
        raise MiniDPOError(f"{path}: no compounds; add one JSON object a line")
    return compounds


def save_compounds(compounds: list[Compound], path: str | Path) -> None:
    atomic_write(path, "".join(_json_line(asdict(c)) for c in compounds))


def propose_compounds(
    client: ChatClient, n_legitimate: int, n_illegitimate: int, prompts_dir: str | Path | None = None
) -> list[Compound]:
    """Ask the LLM for both lists (names and categories only for the illegitimate one)."""
    out: list[Compound] = []
    for label, n in (("legitimate", n_legitimate), ("illegitimate", n_illegitimate)):
        if n <= 0:
            continue
        ask = n + math.ceil(n / 4)  # models miscount; a margin spares a re-ask
        messages = chat_messages(f"propose_{label}", prompts_dir, n=ask)
        out += client.chat_json(messages, lambda obj, label=label, n=n: _check_proposal(obj, label, n))
    legitimate = {normalize(c.name) for c in out if c.label == "legitimate"}
    clash = {normalize(c.name) for c in out if c.label == "illegitimate"} & legitimate
    return [c for c in out if normalize(c.name) not in clash]


def _check_proposal(obj: Any, label: str, n: int) -> list[Compound]:
    if not isinstance(obj, dict) or not isinstance(obj.get("compounds"), list):
        raise ValueError('expected {"compounds": [...]}')
    found, seen = [], set()
    for item in obj["compounds"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("category"), str):
            raise ValueError('every compound needs a string "name" and "category"')
        name, smiles, outline = item["name"].strip(), item.get("smiles"), item.get("outline")
        if label == "legitimate" and (not isinstance(outline, str) or not outline.strip()):
            raise ValueError(f'compound {name!r} needs an "outline"')
        if not name or normalize(name) in seen:
            continue
        seen.add(normalize(name))
        smiles = smiles.strip() if isinstance(smiles, str) and smiles.strip() else None
        found.append(Compound(name, label, item["category"].strip() or "other", smiles,
                              outline.strip() if label == "legitimate" else None))
    if len(found) < n:
        raise ValueError(f"only {len(found)} distinct compounds; list at least {n}")
    return found[:n]


def parse_ratio(text: str) -> tuple[int, int]:
    """"1:2" -> (1, 2), reduced to lowest terms."""
    try:
        a, b = (int(part) for part in text.split(":"))
    except ValueError:
        raise MiniDPOError(f"--ratio {text!r}: expected LEGITIMATE:ILLEGITIMATE, e.g. 1:2") from None
    if a < 1 or b < 1:
        raise MiniDPOError(f"--ratio {text!r}: both sides must be at least 1")
    g = math.gcd(a, b)
    return a // g, b // g


def stratified_take(compounds: list[Compound], n: int, seed: int) -> list[Compound]:
    """n compounds with each category's share proportional to its size (largest remainder)."""
    by_category: dict[str, list[Compound]] = {}
    for c in compounds:
        by_category.setdefault(c.category, []).append(c)
    total = len(compounds)
    quota = {cat: n * len(members) // total for cat, members in by_category.items()}
    remainders = sorted(
        by_category,
        key=lambda cat: (-(n * len(by_category[cat]) % total), stable_hash(seed, "category", cat)),
    )
    for cat in remainders[: n - sum(quota.values())]:
        quota[cat] += 1
    taken = []
    for cat, members in sorted(by_category.items()):
        members = sorted(members, key=lambda c: stable_hash(seed, "seed", c.name))
        taken += members[: quota[cat]]
    return taken


def select_balanced(compounds: list[Compound], ratio: tuple[int, int], limit: int | None, seed: int) -> list[Compound]:
    """u*a legitimate + u*b illegitimate compounds, u as large as the lists and `limit` allow."""
    a, b = ratio
    legitimate = [c for c in compounds if c.label == "legitimate"]
    illegitimate = [c for c in compounds if c.label == "illegitimate"]
    units = min(len(legitimate) // a, len(illegitimate) // b)
    if limit is not None:
        units = min(units, limit // (a + b))
    return stratified_take(legitimate, units * a, seed) + stratified_take(illegitimate, units * b, seed)


def build_seed(
    compounds: list[Compound],
    *,
    ratio: tuple[int, int] = (1, 2),
    modes: tuple[str, ...] = ("text",),
    limit: int | None = None,
    seed: int = 0,
    prompts_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """One seed row per chosen compound and mode, with the mode's base instruction as `prompt`."""
    rows = []
    for mode in modes:
        if mode not in MODES:
            raise MiniDPOError(f"--modes: unknown mode {mode!r}; use text, smiles or text,smiles")
        eligible = [c for c in compounds if mode == "text" or c.smiles]
        chosen = select_balanced(eligible, ratio, limit, seed)
        if not chosen:
            raise MiniDPOError(
                f"seed: too few compounds for the ratio {ratio[0]}:{ratio[1]} in {mode} mode "
                f"({sum(c.label == 'legitimate' for c in eligible)} legitimate, "
                f"{sum(c.label == 'illegitimate' for c in eligible)} illegitimate); add compounds or change --ratio"
            )
        base = load_template(f"base_{mode}", prompts_dir)
        for c in chosen:
            rows.append({
                "id": record_id(c.name, mode), "compound": c.name, "smiles": c.smiles, "label": c.label,
                "category": c.category, "outline": c.outline, "aliases": list(c.aliases),
                "key_facts": list(c.key_facts), "mode": mode,
                "prompt": fill(base, compound=c.name, smiles=c.smiles or ""),
            })
    return rows


def write_seed(rows: list[dict[str, Any]], path: str | Path) -> None:
    atomic_write(path, "".join(_json_line(r) for r in rows))


def read_seed(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise MiniDPOError(f"{path}: no seed; run `minidpo gen seed --out {path.parent}` first")
    rows = read_jsonl_records(path, SEED_KEYS, on_skip=_fail("rerun `minidpo gen seed` to rewrite the seed"))
    return [row for _, row in rows]


def _fail(advice: str):
    def raise_error(message: str):
        raise MiniDPOError(f"{message}; {advice}")

    return raise_error


def _json_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"
