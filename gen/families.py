"""The question families beside synthesis: contrast, general and everyday, from banks.

A model trained only on "how do I make X" pairs learns "a question -> a refusal". The
families teach the boundary from the other side: questions that are not synthesis
requests, answered. Each lives in one hand-written bank in the data folder, one topic a
line (minidpo/data/librachem_mini/README.md):

    contrast.jsonl   names a dangerous agent without asking to make it (antidote, symptoms,
                     mechanism, detection, history, law, storage) or asks about the hazards
                     of a common compound
    general.jsonl    general chemistry that is not a synthesis request (pH, bonds, gas laws)
    everyday.jsonl   everyday questions, homonyms included ("kill a Python process")

    {"topic": slug, "family": ..., "domain": word, "prompts": [3-6 phrasings],
     "answer": short correct answer, "key_facts": [1-3 facts], "compound"?: name,
     "subject"?: the noun phrase a refusal names (default: compound)}

A missing bank file means that family is left out. Every row is checked on load, and the
first bad one is a one-line error naming file:line and key: the keys and their types,
3-6 distinct prompts, key facts stated by the answer (gen/facts.py), an answer that our
rule judge does not read as a refusal (eval/rules.py), and, for a row that names an
illegitimate compound (compounds.jsonl), an answer with no procedure or route and
prompts with no making words (gen/safety.py).

Split by topic, never by prompt: within each (family, domain) the topics are ordered by
stable hash; the first round(n * test_fraction) go to test, the next round(n *
val_fraction) to validation, the rest to train, and a domain of three or more topics
keeps at least one in each split.

Pairs (train topics only): each prompt x the bank answer (chosen) x PAIRS_PER_PROMPT
rejected answers, the first in stable-hash order of their kind: an unneeded refusal
(answers.json "topic_refusal", naming the subject, or "plain_refusal") and, for the
general family, an off-topic synthesis outline instead of the second refusal (a
"legitimate_chosen" template filled with some legitimate compound's outline), the
failure seen in issue 13. Validation and test rows carry the answer as reference_answer
and the key facts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minidpo.eval.rules import rule_verdict

from minidpo.errors import MiniDPOError
from minidpo.io import read_json, read_jsonl_records

from .dedup import normalize
from .facts import key_facts_problem
from .hashing import stable_hash
from .safety import describes_route, looks_like_procedure, requests_preparation
from .seed import Compound, load_compounds
from .templates import fill

FAMILIES = ("contrast", "general", "everyday")
CONTRAST_DOMAINS = ("mechanism", "symptoms", "treatment", "detection", "history", "law", "storage", "hazards")
SPLITS = ("train", "val", "test")
MIN_PROMPTS, MAX_PROMPTS = 3, 6
PAIRS_PER_PROMPT = 2
REFUSAL_KEYS = ("topic_refusal", "plain_refusal")
_SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_BANK_KEYS = {"topic": str, "family": str, "domain": str, "prompts": list, "answer": str, "key_facts": list}


@dataclass(frozen=True)
class Topic:
    topic: str  # unique slug within its family: the split unit
    family: str
    domain: str
    prompts: tuple[str, ...]
    answer: str
    key_facts: tuple[str, ...]
    compound: str | None = None
    subject: str | None = None  # what a refusal names; None: the plain refusals only


@dataclass
class FamilyBanks:
    topics: dict[str, list[Topic]]  # family -> topics in file order; only families whose bank exists
    refusals: dict[str, list[str]] = field(default_factory=dict)  # REFUSAL_KEYS -> templates
    outline_answers: list[str] = field(default_factory=list)  # legitimate_chosen templates
    legitimate: list[Compound] = field(default_factory=list)  # whose outlines fill the off-topic answers


def restricted_names(compounds: list[Compound]) -> list[str]:
    """The names of the illegitimate compounds and their parts ("TATP (triacetone triperoxide)": both).

    Aliases are left out: street names such as "speed" or "crack" are everyday words too.
    """
    names = set()
    for c in compounds:
        if c.label == "illegitimate":
            names |= {c.name, *(part.strip() for part in re.split(r"[()]", c.name) if part.strip())}
    return sorted(names, key=lambda n: (-len(n), n))


def names_any(text: str, names: list[str]) -> str | None:
    """The first of `names` that `text` mentions as a whole word (case-insensitive), or None."""
    return next((n for n in names if re.search(rf"(?<!\w){re.escape(n)}(?!\w)", text, re.IGNORECASE)), None)


def load_bank(path: str | Path, family: str, restricted: list[str]) -> list[Topic]:
    """Read and check one bank file (see the module doc); the first bad row is a one-line error."""
    path = Path(path)
    topics: list[Topic] = []
    seen: dict[str, int] = {}
    for lineno, row in read_jsonl_records(path, _BANK_KEYS, strict=True):
        problem = _row_problem(row, family, restricted)
        if problem is None and row["topic"] in seen:
            problem = f'"topic" {row["topic"]!r} repeats line {seen[row["topic"]]}; topics are unique'
        if problem:
            raise MiniDPOError(f"{path}:{lineno}: {problem}")
        seen[row["topic"]] = lineno
        topics.append(Topic(row["topic"], family, row["domain"], tuple(p.strip() for p in row["prompts"]),
                            row["answer"].strip(), tuple(row["key_facts"]), row.get("compound"),
                            row.get("subject") or row.get("compound")))
    return topics


def _row_problem(row: dict[str, Any], family: str, restricted: list[str]) -> str | None:
    if row["family"] != family:
        return f'"family" is {row["family"]!r}; this file holds the {family} family'
    if not _SLUG.fullmatch(row["topic"]):
        return f'"topic" {row["topic"]!r} must be a lowercase slug such as "sarin-antidote"'
    if family == "contrast" and row["domain"] not in CONTRAST_DOMAINS:
        return f'"domain" {row["domain"]!r}: use one of {", ".join(CONTRAST_DOMAINS)}'
    if not row["domain"].strip():
        return '"domain" must not be empty'
    for key in ("compound", "subject"):
        if key in row and (not isinstance(row[key], str) or not row[key].strip()):
            return f'"{key}" must be a non-empty string when given'
    prompts = row["prompts"]
    if not all(isinstance(p, str) and p.strip() for p in prompts):
        return '"prompts" must be non-empty strings'
    if not MIN_PROMPTS <= len({normalize(p) for p in prompts}) == len(prompts) <= MAX_PROMPTS:
        return f'"prompts" must hold {MIN_PROMPTS} to {MAX_PROMPTS} distinct phrasings, got {len(prompts)}'
    answer = row["answer"]
    if not answer.strip():
        return '"answer" must not be empty'
    refusal = rule_verdict(answer)
    if refusal.refused:
        return f'"answer" reads as a refusal ({refusal.match!r}); bank answers answer the question'
    problem = key_facts_problem(row["key_facts"], answer, "the answer")
    if problem:
        return problem
    named = names_any(" ".join([answer, *prompts, row.get("compound") or ""]), restricted)
    if named:
        if looks_like_procedure(answer) or describes_route(answer):
            return f'"answer" names {named} and reads like a procedure or a route; explain effects, treatment, law or history only'
        asking = next((i for i, p in enumerate(prompts) if requests_preparation(p)), None)
        if asking is not None:
            return f'"prompts"[{asking}] names {named} and asks how to make something; that is a synthesis request'
    return None


def load_family_banks(data_dir: str | Path) -> FamilyBanks:
    """The banks found in `data_dir` (FAMILIES order) with the answers and compounds they draw on."""
    data_dir = Path(data_dir)
    present = [f for f in FAMILIES if (data_dir / f"{f}.jsonl").is_file()]
    if not present:
        return FamilyBanks({})
    compounds = load_compounds(data_dir / "compounds.jsonl")
    restricted = restricted_names(compounds)
    topics = {f: load_bank(data_dir / f"{f}.jsonl", f, restricted) for f in present}
    answers_path = data_dir / "answers.json"
    answers = read_json(answers_path)
    for key in (*REFUSAL_KEYS, "legitimate_chosen"):
        items = answers.get(key) if isinstance(answers, dict) else None
        if not isinstance(items, list) or not items or not all(isinstance(t, str) and t.strip() for t in items):
            raise MiniDPOError(f'{answers_path}: "{key}" must be a non-empty list of strings (the families need it)')
    for i, template in enumerate(answers["topic_refusal"]):
        if "{subject}" not in template:
            raise MiniDPOError(f'{answers_path}: "topic_refusal"[{i}] lacks {{subject}}')
    legitimate = [c for c in compounds if c.label == "legitimate"]
    if "general" in topics and not legitimate:
        raise MiniDPOError(f"{data_dir / 'compounds.jsonl'}: no legitimate compound to write the general family's "
                           "off-topic outlines from; add one")
    return FamilyBanks(topics, {k: answers[k] for k in REFUSAL_KEYS}, answers["legitimate_chosen"], legitimate)


def split_topics(topics: list[Topic], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """topic slug -> "train" | "val" | "test", stratified by domain (see the module doc)."""
    by_domain: dict[str, list[Topic]] = {}
    for t in topics:
        by_domain.setdefault(t.domain, []).append(t)
    side: dict[str, str] = {}
    for members in by_domain.values():
        members = sorted(members, key=lambda t: stable_hash(seed, "topic-split", t.family, t.topic))
        n = len(members)
        n_test = min(_quota(n, test_fraction), n)
        n_val = min(_quota(n, val_fraction), n - n_test)
        for i, t in enumerate(members):
            side[t.topic] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return side


def _quota(n: int, fraction: float) -> int:
    q = int(n * fraction + 0.5)
    return max(q, 1) if n >= 3 and fraction > 0 else q


@dataclass
class FamilySets:
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # "val_contrast", "eval_contrast", ...
    counts: dict[str, Any] = field(default_factory=dict)


def family_sets(banks: FamilyBanks, *, val_fraction: float, test_fraction: float, seed: int) -> FamilySets:
    """Training pairs of the train topics and the val_/eval_ rows of the others, per family."""
    out = FamilySets()
    for family, topics in banks.topics.items():
        side = split_topics(topics, val_fraction, test_fraction, seed)
        val, test = [], []
        for t in topics:
            if side[t.topic] == "train":
                out.train += [pair for i, p in enumerate(t.prompts) for pair in _pairs(t, i, p, banks, seed)]
            else:
                (val if side[t.topic] == "val" else test).extend(_eval_row(t, i, p) for i, p in enumerate(t.prompts))
        out.evals[f"val_{family}"], out.evals[f"eval_{family}"] = val, test
        out.counts[family] = {
            "topics": {s: sum(v == s for v in side.values()) for s in SPLITS},
            "train_pairs": sum(r["family"] == family for r in out.train), "val": len(val), "eval": len(test),
        }
    return out


def _first(items: list[str], seed: int, *key: object) -> list[str]:
    return sorted(items, key=lambda text: stable_hash(seed, *key, text))


def _pairs(t: Topic, i: int, prompt: str, banks: FamilyBanks, seed: int) -> list[dict[str, Any]]:
    refusals = list(banks.refusals["plain_refusal"])
    if t.subject:
        refusals += [fill(r, subject=t.subject) for r in banks.refusals["topic_refusal"]]
    refusals = _first(refusals, seed, "refusal", t.family, t.topic, i)
    rejected = refusals[: PAIRS_PER_PROMPT - 1] + [_off_topic_outline(t, i, banks, seed)] if t.family == "general" \
        else refusals[:PAIRS_PER_PROMPT]
    rows = []
    for j, text in enumerate(rejected):
        row = {"id": f"{t.family}.{t.topic}.p{i}r{j}", "prompt": prompt, "chosen": t.answer, "rejected": text,
               "label": "legitimate", "family": t.family}
        rows.append({**row, **_names(t), "mode": "text", "source": "bank"})
    return rows


def _off_topic_outline(t: Topic, i: int, banks: FamilyBanks, seed: int) -> str:
    """A synthesis outline of some legitimate compound: the templated non-answer to a general question."""
    c = min(banks.legitimate, key=lambda c: stable_hash(seed, "off-topic", t.topic, i, c.name))
    template = _first(banks.outline_answers, seed, "off-topic-template", t.topic, i)[0]
    return fill(template, compound=c.name, outline=c.outline, category=c.category)


def _names(t: Topic) -> dict[str, str]:
    return {"compound": t.compound, "topic": t.topic} if t.compound else {"topic": t.topic}


def _eval_row(t: Topic, i: int, prompt: str) -> dict[str, Any]:
    return {"id": f"{t.family}.{t.topic}.p{i}", "prompt": prompt, "true_label": 1, "family": t.family, **_names(t),
            "reference_answer": t.answer, "key_facts": list(t.key_facts)}
