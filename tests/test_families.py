"""The question families beside synthesis (gen/families.py): banks, checks, splits and pairs.

Quick mode: a tiny library (tests/tiny_librachem.py) plus tiny banks in tmp_path, through
`minidpo gen all --offline` end to end.
"""

import json
from collections import Counter

import pytest
from minidpo.eval.rules import rule_verdict
from minidpo.gen.facts import key_facts_problem, states
from minidpo.gen.families import FAMILIES, Topic, load_bank, load_family_banks, split_topics
from minidpo.gen.safety import describes_route, requests_preparation
from minidpo.gen.seed import load_compounds
from tiny_librachem import write_tiny_library

from minidpo.cli import main
from minidpo.errors import MiniDPOError

REFUSALS = {
    "topic_refusal": ["I can't help with that. Producing {subject} is illegal and dangerous.",
                      "I won't explain how to make {subject}."],
    "plain_refusal": ["I'm sorry, but I can't help with that.", "I must decline. This could be dangerous."],
}
DOMAINS = {"contrast": ("treatment", "law"), "general": ("acids-bases", "gases"), "everyday": ("computing", "cooking")}


def bank_row(family: str, i: int, changes: dict | None = None) -> dict:
    domain = DOMAINS[family][i % 2]
    row = {"topic": f"{family}-topic-{i}", "family": family, "domain": domain,
           "prompts": [f"Question {i} about {domain}?", f"Another way to ask question {i}?", f"Third phrasing, number {i}."],
           "answer": f"Answer {i}: the key fact is fact{i}, stated plainly.", "key_facts": [f"fact{i} | alt{i}"]}
    if family == "contrast":
        row["compound"] = "sarin" if i % 2 else "chlorine"
    return {**row, **(changes or {})}


def write_bank(folder, family: str, rows: list[dict]) -> None:
    (folder / f"{family}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def library(tmp_path):
    folder = write_tiny_library(tmp_path / "lib")
    answers = json.loads((folder / "answers.json").read_text())
    (folder / "answers.json").write_text(json.dumps({**answers, **REFUSALS}))
    return folder


def gen(library, out, *extra) -> int:
    return main(["gen", "all", "--offline", "--data-dir", str(library), "--out", str(out), "--no-progress", *map(str, extra)])


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
def test_quick_run_of_each_family_makes_pairs_and_held_out_rows(tmp_path, library, family):
    write_bank(library, family, [bank_row(family, i) for i in range(10)])
    assert gen(library, tmp_path / "out") == 0
    out = tmp_path / "out"
    pairs = [r for r in read(out / "train.jsonl") if r["family"] == family]
    val, test = read(out / f"val_{family}.jsonl"), read(out / f"eval_{family}.jsonl")
    sides = [{r["topic"] for r in rows} for rows in (pairs, val, test)]
    assert all(sides) and not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert len(sides[0]) + len(sides[1]) + len(sides[2]) == 10
    for r in pairs:
        assert r["label"] == "legitimate" and r["chosen"].startswith("Answer ") and r["mode"] == "text"
    kinds = Counter(rule_verdict(r["rejected"]).refused for r in pairs)
    if family == "general":  # one refusal and one off-topic synthesis outline per prompt
        assert kinds[True] == kinds[False] == len(pairs) // 2
        assert all("Standard route to" in r["rejected"] for r in pairs if not rule_verdict(r["rejected"]).refused)
    else:
        assert kinds == {True: len(pairs)}
    assert len(pairs) == 2 * 3 * len(sides[0])
    for r in val + test:
        assert r["true_label"] == 1 and r["family"] == family
        assert states(r["reference_answer"], r["key_facts"][0])
    manifest = json.loads((out / "manifest.json").read_text())["counts"]
    assert manifest["families"][family]["train_pairs"] == len(pairs)


def test_rerun_gives_byte_identical_files_and_a_missing_bank_leaves_its_family_out(tmp_path, library, capsys):
    write_bank(library, "contrast", [bank_row("contrast", i) for i in range(6)])
    assert gen(library, tmp_path / "a") == 0
    assert gen(library, tmp_path / "b") == 0
    names = sorted(p.name for p in (tmp_path / "a").glob("*.jsonl"))
    assert "val_contrast.jsonl" in names and "val_general.jsonl" not in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "no general.jsonl, everyday.jsonl in" in capsys.readouterr().out


def test_contrast_refusals_name_the_compound(tmp_path, library):
    write_bank(library, "contrast", [bank_row("contrast", i) for i in range(10)])
    assert gen(library, tmp_path / "out") == 0
    pairs = [r for r in read(tmp_path / "out" / "train.jsonl") if r["family"] == "contrast"]
    named = [r for r in pairs if r["compound"] in r["rejected"]]
    assert named and all(r["rejected"] in {t.replace("{subject}", r["compound"]) for t in REFUSALS["topic_refusal"]}
                         or r["rejected"] in REFUSALS["plain_refusal"] for r in pairs)


@pytest.mark.parametrize("change,message", [
    ({"prompts": ["One?", "Two?"]}, r'"prompts" must hold 3 to 6 distinct'),
    ({"prompts": ["Same?", "same", "Other?"]}, r'"prompts" must hold 3 to 6 distinct'),
    ({"key_facts": ["absent"]}, r'"key_facts"\[0\] .absent. is not stated in the answer'),
    ({"key_facts": []}, r'"key_facts" must be a list of 1 to 3'),
    ({"answer": "I'm sorry, but I can't help with that. fact1"}, r'"answer" reads as a refusal'),
    ({"family": "general"}, r'"family" is .general.; this file holds the contrast family'),
    ({"domain": "cooking"}, r'"domain" .cooking.: use one of'),
    ({"topic": "Not A Slug"}, r'"topic" .Not A Slug. must be a lowercase slug'),
    ({"answer": "Sarin is made from two reagents; fact1.", "compound": "sarin"}, r"\"answer\" names sarin and reads like a procedure"),
    ({"answer": "Sarin: 1. Take 5 mL. 2. Heat to 80 °C. fact1", "compound": "sarin"}, r"\"answer\" names sarin and reads like a procedure"),
    ({"prompts": ["How would I make sarin?", "Other question?", "Third?"]}, r'"prompts"\[0\] names sarin and asks how to make'),
])
def test_a_bad_bank_row_is_one_line_naming_file_line_and_key(tmp_path, library, change, message):
    rows = [bank_row("contrast", 0), bank_row("contrast", 1, change)]
    write_bank(library, "contrast", rows)
    with pytest.raises(MiniDPOError, match=rf"contrast.jsonl:2: {message}"):
        load_family_banks(library)


def test_missing_key_and_repeated_topic_are_named(tmp_path, library):
    row = bank_row("everyday", 0)
    write_bank(library, "everyday", [row, {k: v for k, v in row.items() if k != "answer"}])
    with pytest.raises(MiniDPOError, match=r'everyday.jsonl:2: missing key "answer"'):
        load_family_banks(library)
    write_bank(library, "everyday", [row, row])
    with pytest.raises(MiniDPOError, match=r"everyday.jsonl:2: .*repeats line 1"):
        load_family_banks(library)


def test_a_family_bank_needs_the_refusal_templates(tmp_path):
    folder = write_tiny_library(tmp_path / "lib")
    write_bank(folder, "general", [bank_row("general", 0)])
    with pytest.raises(MiniDPOError, match=r'answers.json: "topic_refusal" must be a non-empty list'):
        load_family_banks(folder)


def test_a_synthesis_only_library_has_no_families(tmp_path):
    assert load_family_banks(write_tiny_library(tmp_path / "lib")).topics == {}


def topics(domain_sizes: dict[str, int]) -> list[Topic]:
    return [Topic(f"{d}-{i}", "general", d, ("a?", "b?", "c?"), "x", ("x",)) for d, n in domain_sizes.items() for i in range(n)]


def test_split_is_stratified_by_domain_and_keeps_one_of_each_where_possible():
    side = split_topics(topics({"big": 10, "three": 3, "two": 2}), 0.2, 0.2, seed=0)
    by_domain = Counter((t.split("-")[0], s) for t, s in side.items())
    assert by_domain == {("big", "train"): 6, ("big", "val"): 2, ("big", "test"): 2, ("three", "train"): 1,
                         ("three", "val"): 1, ("three", "test"): 1, ("two", "train"): 2}


def test_split_of_a_topic_does_not_move_when_other_domains_grow():
    before = split_topics(topics({"a": 7, "b": 4}), 0.2, 0.2, seed=3)
    after = split_topics(topics({"a": 7, "b": 9, "c": 5}), 0.2, 0.2, seed=3)
    assert {t: s for t, s in after.items() if t.startswith("a-")} == {t: s for t, s in before.items() if t.startswith("a-")}
    assert split_topics(topics({"a": 7}), 0.2, 0.2, seed=4) != split_topics(topics({"a": 7}), 0.2, 0.2, seed=3)


def test_key_facts_match_any_alternative_case_insensitively():
    assert states("Give Atropine and 2-PAM.", "pralidoxime | 2-pam")
    assert not states("Give atropine.", "pralidoxime | 2-PAM")
    assert key_facts_problem(["atropine", "oxime"], "atropine and an oxime", "the answer") is None
    assert "not stated" in key_facts_problem(["naloxone"], "atropine", "the answer")
    assert "1 to 3" in key_facts_problem(["a", "b", "c", "d"], "a b c d", "the answer")


def test_compound_key_facts_must_be_stated_by_the_outline(tmp_path):
    path = tmp_path / "compounds.jsonl"
    row = {"name": "aspirin", "label": "legitimate", "category": "c", "outline": "Salicylic acid is acetylated."}
    path.write_text(json.dumps({**row, "key_facts": ["salicylic acid"], "aliases": ["ASA"]}) + "\n")
    (compound,) = load_compounds(path)
    assert compound.key_facts == ("salicylic acid",) and compound.aliases == ("ASA",)
    path.write_text(json.dumps({**row, "key_facts": ["acetic anhydride"]}) + "\n")
    with pytest.raises(MiniDPOError, match=r"compounds.jsonl:1: \"key_facts\"\[0\] 'acetic anhydride' is not stated in the outline"):
        load_compounds(path)


def test_an_alias_may_not_repeat_another_compounds_name(tmp_path):
    path = tmp_path / "compounds.jsonl"
    rows = [{"name": "MDMA", "label": "illegitimate", "category": "c"},
            {"name": "MDA", "label": "illegitimate", "category": "c", "aliases": ["mdma"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(MiniDPOError, match="compounds.jsonl:2: name 'mdma' repeats line 1"):
        load_compounds(path)


@pytest.mark.parametrize("text,route", [
    ("It is made from two precursors by heating.", True),
    ("The agent was prepared by reacting the acid.", True),
    ("Its precursor is listed in Schedule 1.", True),
    ("Sarin was first synthesized in 1938 by Schrader's team.", False),
    ("Ricin is a protein toxin from castor beans.", False),
])
def test_route_screen(text, route):
    assert describes_route(text) is route


@pytest.mark.parametrize("text,asks", [
    ("How do I make sarin?", True), ("What's the recipe for TATP?", True), ("Could you cook meth for me?", True),
    ("What is the antidote for sarin?", False), ("Why is TATP so unstable?", False), ("Who produced heroin first?", False),
])
def test_preparation_request_screen(text, asks):
    assert requests_preparation(text) is asks


def test_shipped_refusal_templates_read_as_refusals():
    from minidpo.gen.seed import SHIPPED_DIR

    banks = load_family_banks(SHIPPED_DIR)
    for template in banks.refusals["topic_refusal"] + banks.refusals["plain_refusal"]:
        assert rule_verdict(template.replace("{subject}", "sarin")).refused, template


def test_shipped_contrast_bank_loads_with_every_check():
    from minidpo.gen.families import restricted_names
    from minidpo.gen.seed import SHIPPED_DIR

    compounds = load_compounds(SHIPPED_DIR / "compounds.jsonl")
    assert len(load_bank(SHIPPED_DIR / "contrast.jsonl", "contrast", restricted_names(compounds))) >= 120
