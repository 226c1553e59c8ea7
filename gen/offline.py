"""Phase 2 without any endpoint: rephrasings drawn from the shipped template banks.

The LibraChem-mini banks (minidpo/data/librachem_mini/, or any folder in that format):
- prompts.json: {"text": [templates with {compound}], "smiles": [templates with {smiles}]};
- answers.json: {"legitimate_chosen": [with {compound}, {outline}],
  "legitimate_rejected": [unwarranted refusals], "illegitimate_chosen": [refusals with a
  safe redirection], "illegitimate_rejected": [compliant in tone, with the literal
  "[procedure withheld]" where steps would be]}; fields {compound}, {outline},
  {category} and {smiles} are filled in.
For each seed row the k templates of each kind are the first k in stable-hash order of
(seed, row id, kind, template), filled, then deduplicated, so the choice is fixed by the
seed and the row alone. A text-mode prompt names the compound by its name or, for half
of the templates of a compound with "aliases" (in stable-hash order), by one of those
(street, trade or IUPAC names). The banks are checked on load like LLM output is: every
illegitimate answer must be free of procedure-like text, and every illegitimate rejected
answer must carry the placeholder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minidpo.errors import MiniDPOError
from minidpo.io import read_json

from .dedup import dedupe
from .hashing import stable_fraction, stable_hash
from .safety import PROCEDURE_WITHHELD, looks_like_procedure
from .templates import fill

ANSWER_KEYS = ("legitimate_chosen", "legitimate_rejected", "illegitimate_chosen", "illegitimate_rejected")


@dataclass
class Rephrasings:
    """Phase 2's product for one seed row: k prompts, chosen and rejected answers, and where from."""

    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    source: str


@dataclass
class Banks:
    prompts: dict[str, list[str]]  # mode -> templates
    answers: dict[str, list[str]]  # ANSWER_KEYS -> templates


def load_banks(data_dir: str | Path) -> Banks:
    """Read and check prompts.json and answers.json; a bad entry is a one-line error naming it."""
    data_dir = Path(data_dir)
    prompts_path, answers_path = data_dir / "prompts.json", data_dir / "answers.json"
    prompts, answers = read_json(prompts_path), read_json(answers_path)
    for path, obj, keys in ((prompts_path, prompts, ("text", "smiles")), (answers_path, answers, ANSWER_KEYS)):
        if not isinstance(obj, dict):
            raise MiniDPOError(f"{path}: expected a JSON object with keys {', '.join(keys)}")
        for key in keys:
            items = obj.get(key)
            if not isinstance(items, list) or not all(isinstance(t, str) and t.strip() for t in items):
                raise MiniDPOError(f'{path}: "{key}" must be a list of non-empty strings')
    _require_field(prompts_path, prompts, "text", "{compound}")
    _require_field(prompts_path, prompts, "smiles", "{smiles}")
    _require_field(answers_path, answers, "illegitimate_rejected", PROCEDURE_WITHHELD)
    for key in ("illegitimate_chosen", "illegitimate_rejected"):
        for i, template in enumerate(answers[key]):
            if looks_like_procedure(template):
                raise MiniDPOError(f'{answers_path}: "{key}"[{i}] reads like a procedure; illegitimate answers hold no steps')
    for key in ANSWER_KEYS:
        if not answers[key]:
            raise MiniDPOError(f'{answers_path}: "{key}" is empty; it needs at least one template')
    return Banks({"text": prompts["text"], "smiles": prompts["smiles"]}, {k: answers[k] for k in ANSWER_KEYS})


def _require_field(path: Path, obj: dict[str, Any], key: str, needle: str) -> None:
    for i, template in enumerate(obj[key]):
        if needle not in template:
            raise MiniDPOError(f'{path}: "{key}"[{i}] lacks {needle}')


class OfflineRephraser:
    """Seed row -> Rephrasings from the banks; no network, deterministic."""

    retried = 0

    def __init__(self, banks: Banks, k: int, *, seed: int = 0, similarity: float = 0.85):
        self.banks, self.k, self.seed, self.similarity = banks, k, seed, similarity

    def __call__(self, row: dict[str, Any]) -> Rephrasings:
        return Rephrasings(self.pick(row, "prompts"), self.pick(row, "chosen"), self.pick(row, "rejected"), "offline")

    def pick(self, row: dict[str, Any], kind: str) -> list[str]:
        """Up to k distinct filled templates of one kind ("prompts", "chosen", "rejected") for a row."""
        templates = self.banks.prompts[row["mode"]] if kind == "prompts" else self.banks.answers[f"{row['label']}_{kind}"]
        if not templates:
            raise MiniDPOError(f"the offline banks have no {row['mode']} prompt templates; add some to prompts.json")
        order = sorted(range(len(templates)), key=lambda i: stable_hash(self.seed, row["id"], kind, templates[i]))
        fields = {"smiles": row.get("smiles") or "", "outline": row.get("outline") or "", "category": row["category"]}
        filled = [fill(templates[i], **fields, compound=self.name(row, templates[i]) if kind == "prompts" else row["compound"])
                  for i in order]
        return dedupe(filled, self.similarity, limit=self.k)

    def name(self, row: dict[str, Any], template: str) -> str:
        """The compound's name, or for half of the templates (by stable hash) one of its aliases."""
        aliases = row.get("aliases") or []
        u = stable_fraction(self.seed, row["id"], "name", template)
        return aliases[int((u - 0.5) * 2 * len(aliases))] if aliases and u >= 0.5 else row["compound"]
