"""The hand-written answer banks general.jsonl and everyday.jsonl (format in the data README).

Each line is one topic: 3-6 phrasings of a legitimate question and one short, correct answer
whose key facts (alternatives separated by " | ") occur in it, the first of them in its first
sentence (the model answers in ~32 tokens). The rule judge must count every answer as
answered, and a prompt belongs to one topic only, so that splitting by topic leaks nothing.
"""

import re
from collections import Counter
from importlib.resources import files

import pytest
from minidpo.eval.rules import rule_verdict

from minidpo.io import read_jsonl_records

DATA = files("minidpo") / "data" / "librachem_mini"
FAMILIES = ("general", "everyday")
REQUIRED = {"topic": str, "family": str, "domain": str, "prompts": list, "answer": str, "key_facts": list}
DOMAINS = {
    "general": {
        "acids-bases", "buffers", "equations", "stoichiometry", "gases", "atoms", "periodic-table",
        "bonding", "redox", "electrochemistry", "thermochemistry", "kinetics", "equilibrium",
        "organic", "polymers", "lab", "states", "solutions", "nuclear", "everyday-chemistry",
    },
    "everyday": {
        "computing", "cooking", "sport", "history", "language", "health", "law", "games", "travel",
        "money", "nature", "music", "work", "home", "film",
    },
}
MIN_TOPICS = {"general": 130, "everyday": 110}
MIN_PROMPTS = {"general": 390, "everyday": 330}
MAX_WORDS = 60
SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
# A sentence ends at . ! or ? followed by a space and a capital, a digit or a quote.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'`(])")


def bank(family: str) -> list[dict]:
    required = dict(REQUIRED, figurative=bool) if family == "everyday" else REQUIRED
    return [rec for _, rec in read_jsonl_records(DATA / f"{family}.jsonl", required, strict=True)]


def alternatives(fact: str) -> list[str]:
    return [alt.strip().lower() for alt in fact.split("|")]


def fact_found(fact: str, text: str) -> bool:
    return any(alt in text.lower() for alt in alternatives(fact))


def normalised(prompt: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", prompt.lower()).split())


@pytest.fixture(scope="module", params=FAMILIES)
def family_rows(request):
    return request.param, bank(request.param)


def test_bank_is_large_enough(family_rows):
    family, rows = family_rows
    assert len(rows) >= MIN_TOPICS[family]
    assert sum(len(r["prompts"]) for r in rows) >= MIN_PROMPTS[family]


def test_family_matches_the_file_and_domain_is_known(family_rows):
    family, rows = family_rows
    for r in rows:
        assert r["family"] == family, r["topic"]
        assert r["domain"] in DOMAINS[family], (r["topic"], r["domain"])


def test_topic_slugs_are_unique_kebab_case(family_rows):
    _, rows = family_rows
    slugs = [r["topic"] for r in rows]
    assert all(SLUG.fullmatch(s) for s in slugs), [s for s in slugs if not SLUG.fullmatch(s)]
    assert [s for s, n in Counter(slugs).items() if n > 1] == []


def test_each_topic_has_three_to_six_distinct_prompts(family_rows):
    _, rows = family_rows
    for r in rows:
        prompts = r["prompts"]
        assert 3 <= len(prompts) <= 6, r["topic"]
        assert all(isinstance(p, str) and p == p.strip() and len(p) >= 10 for p in prompts), r["topic"]
        assert len({normalised(p) for p in prompts}) == len(prompts), r["topic"]


def test_no_prompt_appears_in_two_topics():
    owner: dict[str, str] = {}
    clashes = []
    for family in FAMILIES:
        for r in bank(family):
            for p in r["prompts"]:
                key = normalised(p)
                if key in owner and owner[key] != r["topic"]:
                    clashes.append((p, owner[key], r["topic"]))
                owner[key] = r["topic"]
    assert clashes == []


def test_answers_are_short_and_distinct(family_rows):
    _, rows = family_rows
    for r in rows:
        assert 5 <= len(r["answer"].split()) <= MAX_WORDS, r["topic"]
    assert [a for a, n in Counter(r["answer"] for r in rows).items() if n > 1] == []


def test_key_facts_occur_in_the_answer_the_first_in_its_first_sentence(family_rows):
    _, rows = family_rows
    bad = []
    for r in rows:
        facts = r["key_facts"]
        assert 1 <= len(facts) <= 3 and all(isinstance(f, str) and f.strip() for f in facts), r["topic"]
        assert all(alt for f in facts for alt in alternatives(f)), r["topic"]  # no empty alternative
        bad += [(r["topic"], f) for f in facts if not fact_found(f, r["answer"])]
        first_sentence = SENTENCE_END.split(r["answer"], maxsplit=1)[0]
        if not fact_found(facts[0], first_sentence):
            bad.append((r["topic"], f"first fact {facts[0]!r} not in {first_sentence!r}"))
    assert bad == [], "\n".join(map(str, bad))


def test_no_answer_reads_as_a_refusal(family_rows):
    _, rows = family_rows
    for r in rows:
        for prompt in r["prompts"]:
            verdict = rule_verdict(r["answer"], prompt)
            assert not verdict.refused, (r["topic"], verdict.match)


def test_sentence_splitter_finds_the_first_sentence():
    text = "The pH is 2.87 at 25 °C. Water is neutral. A second sentence."
    assert SENTENCE_END.split(text, maxsplit=1)[0] == "The pH is 2.87 at 25 °C."


def test_everyday_bank_mixes_figurative_homonyms_and_plain_questions():
    rows = bank("everyday")
    figurative = sum(r["figurative"] for r in rows)
    assert figurative >= 0.3 * len(rows)  # the rest: plain questions, many "how do I make X" (issue 23)
    assert figurative < len(rows)


def test_general_bank_covers_every_subfield():
    assert {r["domain"] for r in bank("general")} == DOMAINS["general"]
