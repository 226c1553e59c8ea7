"""The shipped LibraChem-mini training, validation and test sets are exactly what `make data`
regenerates, and their splits hold out what they say they do."""

import json
from pathlib import Path

import pytest
from minidpo.gen.families import FAMILIES

import minidpo
from minidpo.cli import main

SHIPPED = Path(minidpo.__file__).parent / "data" / "librachem_mini"
PRESENT = tuple(f for f in FAMILIES if (SHIPPED / f"{f}.jsonl").exists())
SYNTHESIS = ("val_seen.jsonl", "val_unseen.jsonl", "eval_seen.jsonl", "eval_unseen.jsonl")
SETS = ("train.jsonl", "test_triplets.jsonl", *SYNTHESIS,
        *(f"{split}_{family}.jsonl" for family in PRESENT for split in ("val", "eval")))


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("librachem_mini")
    argv = ["gen", "all", "--offline", "--modes", "text,smiles", "-k", "6", "--out", str(out), "--no-progress"]
    assert main(argv) == 0  # the same command as the Makefile's `data` target
    return out


@pytest.mark.parametrize("name", SETS)
def test_shipped_set_is_reproducible(regenerated, name):
    assert (regenerated / name).read_bytes() == (SHIPPED / name).read_bytes()


def test_every_regenerated_set_is_shipped(regenerated):
    made = {p.name for p in regenerated.glob("*.jsonl")} - {"seed.jsonl", "rephrase.jsonl"}
    assert made == set(SETS)


def rows(name):
    return [json.loads(line) for line in (SHIPPED / name).read_text().splitlines()]


def test_synthesis_pairs_are_many_and_balanced_as_the_paper():
    synthesis = [r for r in rows("train.jsonl") if r["family"] == "synthesis"]
    assert len(synthesis) >= 1500
    text = [r for r in synthesis if r["mode"] == "text"]
    legit = sum(r["label"] == "legitimate" for r in text)
    assert legit * 2 == len(text) - legit  # 1 legitimate : 2 illegitimate, exactly where every compound has a row
    # The split is by compound over both modes, and not every compound has a SMILES row.
    share = sum(r["label"] == "legitimate" for r in synthesis) / len(synthesis)
    assert abs(share - 1 / 3) < 0.02


def test_synthesis_splits_hold_out_phrasings_and_compounds():
    train = [r for r in rows("train.jsonl") if r["family"] == "synthesis"]
    train_prompts = {r["prompt"] for r in train}
    train_compounds = {r["compound"] for r in train}
    split = {name: rows(name) for name in SYNTHESIS}
    for name in ("val_seen.jsonl", "eval_seen.jsonl"):
        assert {r["compound"] for r in split[name]} <= train_compounds
        assert not {r["prompt"] for r in split[name]} & train_prompts
    val, test = ({r["compound"] for r in split[name]} for name in ("val_unseen.jsonl", "eval_unseen.jsonl"))
    assert not (val & train_compounds or test & train_compounds or val & test)
    assert not {r["prompt"] for r in split["val_seen.jsonl"]} & {r["prompt"] for r in split["eval_seen.jsonl"]}
    for name, rows_ in split.items():
        assert {r["true_label"] for r in rows_} == {0, 1}, name
        for r in rows_:
            assert r["family"] == "synthesis"
            assert ("key_facts" in r) == ("reference_answer" in r) == (r["true_label"] == 1), r["id"]


@pytest.mark.parametrize("family", PRESENT)
def test_family_splits_are_by_topic_and_carry_references(family):
    train = {r["topic"] for r in rows("train.jsonl") if r["family"] == family}
    val, test = rows(f"val_{family}.jsonl"), rows(f"eval_{family}.jsonl")
    val_topics, test_topics = {r["topic"] for r in val}, {r["topic"] for r in test}
    assert train and val_topics and test_topics
    assert not (train & val_topics or train & test_topics or val_topics & test_topics)
    assert 0.45 <= len(train) / (len(train) + len(val_topics) + len(test_topics)) <= 0.75
    for r in val + test:
        assert r["true_label"] == 1 and r["family"] == family and r["reference_answer"] and r["key_facts"]


def test_family_pairs_prefer_the_bank_answer_to_an_unneeded_refusal_or_an_outline():
    for r in rows("train.jsonl"):
        if r["family"] != "synthesis":
            assert r["label"] == "legitimate" and r["chosen"] != r["rejected"]


def test_no_illegitimate_answer_carries_a_procedure():
    for r in rows("train.jsonl") + rows("test_triplets.jsonl"):
        if r["label"] == "illegitimate":
            assert "[procedure withheld]" in r["rejected"]
