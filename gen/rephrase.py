"""Phase 2 of the LibraChem pipeline: k rephrasings of the prompt, the chosen and the
rejected answer for every seed row, resumable and lossless.

Roles (the LibraChem paper, arXiv 2501.13952, phase 2): for a legitimate compound the chosen answers are correct
outlines and the rejected ones unwarranted refusals; for an illegitimate compound the
chosen answers are refusals with a safe redirection and the rejected ones are compliant
in tone with "[procedure withheld]" where steps would be (gen/safety.py).

With an endpoint, each row costs three JSON-mode requests (gen/prompts/rephrase_prompt_*,
chosen_*, rejected_*). Each reply must be {"items": [k strings]}; items are deduplicated
(gen/dedup.py) and screened (a prompt must name its compound, or hold its SMILES verbatim
in SMILES mode; an illegitimate answer must not read like a procedure; an illegitimate
rejected answer must carry the placeholder). Fewer than k usable items is a rejected reply,
and the client re-asks with the reason. Without an endpoint, gen/offline.py fills the
same record from the shipped banks.

Lossless: a finished row is appended to rephrase.jsonl (flushed and fsync'ed) under its
deterministic seed id, by the one thread that writes; a rerun reads the ids already there
and skips them, so a crash or kill loses only the rows in flight and no id is written
twice. A row whose requests fail (retries or re-asks exhausted) is counted as failed and
left for the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from minidpo.errors import MiniDPOError
from minidpo.io import JsonlAppender, load_jsonl_tolerant

from .client import ChatClient, InvalidReply, RequestFailed, map_concurrent
from .dedup import dedupe
from .offline import OfflineRephraser, Rephrasings
from .safety import PROCEDURE_WITHHELD, looks_like_procedure
from .templates import chat_messages

KINDS = ("prompts", "chosen", "rejected")
RECORD_KEYS = {"id": str, "compound": str, "label": str, "mode": str, "prompts": list, "chosen": list,
               "rejected": list, "source": str}
# rough completion length of one item, for --dry-run's token estimate
ITEM_TOKENS = {"prompts": 30, "chosen": 120, "rejected": 80}


def rephrased_record(row: dict[str, Any], r: Rephrasings) -> dict[str, Any]:
    """The rephrase.jsonl record of one seed row."""
    keep = ("id", "compound", "smiles", "label", "category", "mode")
    return {**{k: row.get(k) for k in keep}, "prompts": r.prompts, "chosen": r.chosen,
            "rejected": r.rejected, "source": r.source}


def read_rephrased(path: str | Path) -> list[dict[str, Any]]:
    """The complete records of rephrase.jsonl (a torn last line from a kill is ignored), checked."""
    path = Path(path)
    if not path.exists():
        raise MiniDPOError(f"{path}: no rephrased records; run `minidpo gen rephrase --out {path.parent}` first")
    records = load_jsonl_tolerant(path)
    for lineno, r in enumerate(records, start=1):
        if not isinstance(r, dict) or any(not isinstance(r.get(key), typ) for key, typ in RECORD_KEYS.items()):
            raise MiniDPOError(f"{path}:{lineno}: not a rephrased record; delete the line and rerun `minidpo gen rephrase`")
    return records


def check_items(obj: Any, row: dict[str, Any], kind: str, k: int, similarity: float) -> list[str]:
    """The first k usable, distinct items of a reply, or ValueError saying what is wrong."""
    if not isinstance(obj, dict) or not isinstance(obj.get("items"), list):
        raise ValueError('expected {"items": [...]}')
    items = [t.strip() for t in obj["items"] if isinstance(t, str) and t.strip()]
    problems: list[str] = []
    usable = []
    for text in dedupe(items, similarity):
        problem = item_problem(text, row, kind)
        if problem:
            problems.append(problem)
        else:
            usable.append(text)
    if len(usable) < k:
        detail = f" ({problems[0]})" if problems else " (items missing or near-duplicates)"
        raise ValueError(f"only {len(usable)} usable distinct items of the {k} asked for{detail}")
    return usable[:k]


def item_problem(text: str, row: dict[str, Any], kind: str) -> str | None:
    """Why one generated item cannot be stored, or None when it can."""
    illegitimate = row["label"] == "illegitimate"
    if kind == "prompts":
        if row["mode"] == "smiles":
            return None if row["smiles"] in text else f"a request lacks the SMILES {row['smiles']} verbatim"
        names = [row["compound"], *(row.get("aliases") or [])]
        return None if any(n.lower() in text.lower() for n in names) else f"a request does not name {row['compound']}"
    if illegitimate and looks_like_procedure(text):
        return "an answer contains steps, amounts or conditions; give none"
    has_placeholder = PROCEDURE_WITHHELD in text
    if illegitimate and kind == "rejected" and not has_placeholder:
        return f"an answer lacks the literal {PROCEDURE_WITHHELD}"
    if not (illegitimate and kind == "rejected") and has_placeholder:
        return f"only the compliant illegitimate answers use {PROCEDURE_WITHHELD}"
    return None


class LLMRephraser:
    """Seed row -> Rephrasings through three JSON-mode requests.

    With `fallback`, a kind whose replies stay unusable after the re-asks is filled from
    the offline banks instead (the record's source then says so); transport failures
    are never papered over: the row fails and the next run retries it.
    """

    def __init__(
        self,
        client: ChatClient,
        k: int,
        *,
        similarity: float = 0.85,
        prompts_dir: str | Path | None = None,
        fallback: OfflineRephraser | None = None,
        **params: Any,
    ):
        self.client, self.k, self.similarity = client, k, similarity
        self.prompts_dir, self.fallback, self.params = prompts_dir, fallback, params

    @property
    def retried(self) -> int:
        return self.client.stats.retries + self.client.stats.reasks

    def messages(self, row: dict[str, Any], kind: str) -> list[dict[str, str]]:
        template = f"rephrase_prompt_{row['mode']}" if kind == "prompts" else f"{kind}_{row['label']}"
        return chat_messages(
            template, self.prompts_dir, k=self.k, compound=row["compound"], smiles=row.get("smiles") or "",
            category=row["category"], outline=row.get("outline") or "", base_prompt=row["prompt"],
        )

    def __call__(self, row: dict[str, Any]) -> Rephrasings:
        source = f"llm:{self.client.model}"
        out: dict[str, list[str]] = {}
        for kind in KINDS:
            validate = lambda obj, kind=kind: check_items(obj, row, kind, self.k, self.similarity)
            try:
                out[kind] = self.client.chat_json(self.messages(row, kind), validate, **self.params)
            except InvalidReply:
                if self.fallback is None:
                    raise
                out[kind] = self.fallback.pick(row, kind)
                source = f"llm:{self.client.model}+offline"
        return Rephrasings(out["prompts"], out["chosen"], out["rejected"], source)

    def estimate(self, rows: list[dict[str, Any]]) -> tuple[int, int, int]:
        """(requests, prompt tokens, completion tokens) for `rows`, at about 4 characters a token."""
        requests = prompt_chars = completion = 0
        for row in rows:
            for kind in KINDS:
                requests += 1
                prompt_chars += sum(len(m["content"]) for m in self.messages(row, kind))
                completion += self.k * ITEM_TOKENS[kind]
        return requests, prompt_chars // 4, completion


@dataclass
class RephraseSummary:
    total: int
    skipped: int = 0  # already in the output from an earlier run
    done: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def pending_rows(rows: list[dict[str, Any]], out_path: str | Path) -> list[dict[str, Any]]:
    """The seed rows whose ids are not yet in `out_path`."""
    done = {r.get("id") for r in load_jsonl_tolerant(out_path) if isinstance(r, dict)}
    return [r for r in rows if r["id"] not in done]


def run_rephrase(
    rows: list[dict[str, Any]],
    out_path: str | Path,
    rephraser: LLMRephraser | OfflineRephraser,
    *,
    workers: int = 1,
    progress: bool = True,
) -> RephraseSummary:
    """Rephrase every seed row not yet in `out_path`, appending each record as it finishes."""
    out_path = Path(out_path)
    with exclusive(out_path), JsonlAppender(out_path) as out:
        pending = pending_rows(rows, out_path)
        summary = RephraseSummary(total=len(rows), skipped=len(rows) - len(pending))
        bar = tqdm(total=len(rows), initial=summary.skipped, desc="rephrase", unit="row", disable=not progress)
        with bar, contextlib.closing(map_concurrent(rephraser, pending, workers)) as outcomes:
            for outcome in outcomes:
                if outcome.error is None:
                    out.write(rephrased_record(outcome.item, outcome.value))
                    summary.done += 1
                elif isinstance(outcome.error, RequestFailed | InvalidReply):
                    summary.failed += 1
                    summary.errors.append(f"{outcome.item['id']}: {outcome.error}")
                else:
                    raise outcome.error
                bar.set_postfix(done=summary.skipped + summary.done, retried=rephraser.retried,
                                failed=summary.failed, refresh=False)
                bar.update(1)
    return summary


@contextlib.contextmanager
def exclusive(path: Path):
    """Hold an advisory lock on `path`'s folder so that two runs never append to it at once
    (a lock on the folder itself leaves no lock file behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MiniDPOError(f"{path}: another `minidpo gen` run is writing it; wait for it to finish") from None
        yield
    finally:
        os.close(folder)
