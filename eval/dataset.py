"""Evaluation sets: JSONL rows {prompt, true_label, id?, family?, compound?, topic?, reference_answer?, key_facts?}.

true_label is 1 for a legitimate request (it should be answered) and 0 for an
illegitimate one (it should be refused), as in the LibraChem reference. A row without an
id gets "L<line number>". The optional fields serve the correctness scores of legitimate
rows: `key_facts` (a list of facts, each "alternative | alternative", eval/facts.py) for
fact recall, `reference_answer` for the retention NLL and the judge's correctness
question; `family` (synthesis, contrast, general, everyday) and `topic` are carried into
the details for reading them by group.

The shipped sets (minidpo/data/librachem_mini/, written by `make data`): eval_seen
(held-out phrasings of training compounds), eval_unseen (compounds never trained on),
eval_contrast, eval_general and eval_everyday (legitimate questions of each family, on
topics never trained on).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minidpo.gen.seed import SHIPPED_DIR

from minidpo.errors import MiniDPOError
from minidpo.io import read_jsonl_records

from .facts import alternatives

SHIPPED_SETS = ("eval_seen.jsonl", "eval_unseen.jsonl", "eval_contrast.jsonl", "eval_general.jsonl",
                "eval_everyday.jsonl")
STRING_FIELDS = ("id", "family", "compound", "topic", "reference_answer")


@dataclass(frozen=True)
class EvalRow:
    id: str
    prompt: str
    true_label: int  # 1 legitimate, 0 illegitimate
    compound: str | None = None
    reference_answer: str | None = None
    family: str | None = None
    topic: str | None = None
    key_facts: tuple[str, ...] | None = None


@dataclass
class EvalSet:
    name: str
    rows: list[EvalRow]
    path: str | None = None


def load_eval_set(path: str | Path, *, name: str | None = None, limit: int | None = None) -> EvalSet:
    """Read and check an evaluation JSONL; a bad row is a one-line MiniDPOError naming its line."""
    path = Path(path)
    bad: list[str] = []
    records = read_jsonl_records(path, {"prompt": str, "true_label": int}, on_skip=bad.append)
    rows: list[EvalRow] = []
    seen: dict[str, int] = {}
    for lineno, r in records:
        where, row_id = f"{path}:{lineno}", r.get("id") or f"L{lineno}"
        if isinstance(r["true_label"], bool) or r["true_label"] not in (0, 1):
            bad.append(f'{where}: "true_label" must be 1 (legitimate) or 0 (illegitimate), got {r["true_label"]!r}')
        elif not r["prompt"].strip():
            bad.append(f'{where}: "prompt" is empty')
        elif problem := _optional_field_problem(r):
            bad.append(f"{where}: {problem}")
        elif row_id in seen:
            bad.append(f"{where}: id {row_id!r} already used on line {seen[row_id]}")
        else:
            seen[row_id] = lineno
            facts = r.get("key_facts")
            rows.append(EvalRow(row_id, r["prompt"], r["true_label"], r.get("compound"), r.get("reference_answer"),
                                r.get("family"), r.get("topic"), tuple(facts) if facts is not None else None))
    if bad:
        more = f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
        raise MiniDPOError(f"{bad[0]}{more}; fix the evaluation file (rows need prompt and true_label 0 or 1)")
    if not rows:
        raise MiniDPOError(f"{path}: no evaluation rows (expected JSONL lines with prompt and true_label)")
    return EvalSet(name or path.stem, head_keeping_class_ratio(rows, limit) if limit else rows, str(path))


def _optional_field_problem(r: dict) -> str | None:
    """What is wrong with a row's optional fields, naming the key; None when they are fine."""
    for key in STRING_FIELDS:
        if r.get(key) is not None and not isinstance(r[key], str):
            return f'key "{key}" must be a string when given, got {type(r[key]).__name__}'
    facts = r.get("key_facts")
    if facts is None:
        return None
    if not isinstance(facts, list) or not facts:
        return 'key "key_facts" must be a non-empty list of strings ("alternative | alternative")'
    for i, fact in enumerate(facts):
        if not isinstance(fact, str) or not alternatives(fact):
            return f'key "key_facts" item {i} must be a string with at least one alternative, got {fact!r}'
    return None


def head_keeping_class_ratio(rows: list[EvalRow], limit: int) -> list[EvalRow]:
    """The first `limit` rows of each class in proportion to the classes' shares (at least one of each
    class when limit >= 2), in file order: a quick run still scores both safety and utility."""
    if limit >= len(rows):
        return rows
    legitimate = [r for r in rows if r.true_label == 1]
    illegitimate = [r for r in rows if r.true_label == 0]
    n_legitimate = round(limit * len(legitimate) / len(rows))
    if legitimate and illegitimate and limit >= 2:
        n_legitimate = min(max(n_legitimate, 1), limit - 1)
    keep = {r.id for r in legitimate[:n_legitimate] + illegitimate[: limit - n_legitimate]}
    return [r for r in rows if r.id in keep]


def shipped_eval_paths() -> list[Path]:
    """The shipped evaluation sets that exist; a one-line error when none has been generated yet."""
    paths = [SHIPPED_DIR / name for name in SHIPPED_SETS if (SHIPPED_DIR / name).is_file()]
    if not paths:
        raise MiniDPOError(f"{SHIPPED_DIR / SHIPPED_SETS[0]}: not found; give --data FILE.jsonl (or generate the "
                           "shipped sets with `make data`)")
    return paths
