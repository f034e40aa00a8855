"""Human preference labeling: a SQLite store of candidate responses, a small web app for pairwise judgments, and
an export of the judgments to TRL preference pairs.

Flow: candidates JSONL (`preftune sample`) -> `store.import_candidates` -> `preftune label serve` (people judge
pairs in a browser) -> `export.export_pairs` -> TRL JSONL that `preftune train` reads.
"""
