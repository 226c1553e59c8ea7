"""The three-phase LLM-assisted preference-data generation (LibraChem) and its HTTP client.

Read in this order:
- client.py     a thin OpenAI-compatible chat client: retries, re-asks, a thread pool
- seed.py       phase 1: compound lists and the exactly balanced, stratified seed
- rephrase.py   phase 2: k rephrasings of prompt, chosen and rejected per row, resumable
- offline.py    phase 2 without an endpoint: the shipped template banks
- combine.py    phase 3: pairs, the splits by compound and phrasing, the validation and test sets
- families.py   the contrast, general and everyday questions from their banks, split by topic
- safety.py, facts.py, dedup.py, hashing.py, templates.py: the checks and helpers they share
- prompts/*.txt the LLM prompt templates, editable (or overridden with --prompts-dir)
The CLI is minidpo/commands/gen.py (`minidpo gen seed|rephrase|combine|all`).
"""
