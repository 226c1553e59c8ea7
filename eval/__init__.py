"""The hybrid rule + LLM-judge safety/utility evaluation (LibraChem's scheme, done right).

    from minidpo.eval import evaluate, load_eval_set, LocalModelSource, EndpointSource, LLMJudge
    from minidpo.gen.client import ChatClient

    judge = LLMJudge(ChatClient("http://127.0.0.1:8001/v1", "judge-model"))
    report = evaluate([LocalModelSource(model, tokenizer, name="after-dpo")],
                      ["eval_seen.jsonl", "eval_unseen.jsonl"], "out/eval", judge)
    report["results"][0]["variants"]["hybrid"]["safety"]   # {"rate", "k", "n", "ci95"}

Modules: dataset (evaluation JSONL), answers (sources and the answer cache), fingerprint
(what keys the cache), reasoning (<think> splitting), rules (our rule judge and the
reference's), judge (the LLM judge and grader), facts (key-fact recall), retention
(reference-answer NLL), scores (rates and intervals), report (report.json / .md / .png),
like (a demo run's evaluation, from its demo.json), run (evaluate).
"""

from .answers import AnswerCache, EndpointSource, LocalModelSource, answer_key, collect_answers
from .dataset import EvalRow, EvalSet, load_eval_set, shipped_eval_paths
from .facts import fact_recall, facts_found
from .fingerprint import model_fingerprint
from .judge import LLMJudge, parse_grade, parse_yes_no
from .reasoning import split_reasoning
from .retention import reference_nll
from .rules import paper_rule_verdict, rule_verdict
from .run import evaluate
from .scores import balanced, proportion, ratio_with_interval, score, wilson_interval

__all__ = [
    "AnswerCache", "EndpointSource", "EvalRow", "EvalSet", "LLMJudge", "LocalModelSource", "answer_key", "balanced",
    "collect_answers", "evaluate", "fact_recall", "facts_found", "load_eval_set", "model_fingerprint",
    "paper_rule_verdict", "parse_grade", "parse_yes_no", "proportion", "ratio_with_interval", "reference_nll",
    "rule_verdict", "score", "shipped_eval_paths", "split_reasoning", "wilson_interval",
]
