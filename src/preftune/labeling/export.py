"""Judgments -> TRL preference pairs (`prompt`, `chosen`, `rejected`), with agreement between annotators.

Resolution of a pair (`resolve`): skips are abstentions and are dropped first; among the remaining labels
('a', 'b', 'tie', 'both_bad') the one with the most votes wins. A pair is written when that winner is 'a' or 'b'
(chosen = the winning response). It is excluded, and counted under its reason, when the winner is 'tie' or
'both_bad', when the top count is shared by two labels ('no_majority', e.g. one 'a' and one 'b'), when every
judgment was a skip ('skip'), or when nobody judged it ('unlabelled').

Agreement is measured over the pairs with at least two non-skip labels, on the four labels above:
- `observed`: the mean over those pairs of the fraction of annotator pairs who gave the same label (Fleiss' P-bar;
  for two annotators, the fraction of pairs they agree on);
- `unanimous`: the fraction of those pairs where every label is the same;
- `fleiss_kappa`: Fleiss (1971), in the form that allows a different number of raters per item;
- `cohen_kappa`: Cohen (1960) for every two annotators, over the pairs both labelled.
A kappa is None where chance agreement is 1 (every label the same category), where it is undefined.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from preftune import atomic
from preftune.errors import DataError
from preftune.labeling.store import Judgment, Pair, active_judgments, all_pairs, opened

logger = logging.getLogger(__name__)

LABELS = ("a", "b", "tie", "both_bad")
EXCLUDED_REASONS = ("tie", "both_bad", "no_majority", "skip", "unlabelled")


# --------------------------------------------------------------------------------------------------------------
# Pure functions: resolution and agreement statistics
# --------------------------------------------------------------------------------------------------------------


def resolve(choices: Sequence[str]) -> str:
    """The outcome of one pair's judgments: 'a', 'b', 'tie', 'both_bad', 'no_majority', 'skip' or 'unlabelled'
    (rules in the module docstring)."""
    if not choices:
        return "unlabelled"
    counts = Counter(choice for choice in choices if choice != "skip")
    if not counts:
        return "skip"
    top = max(counts.values())
    leaders = [label for label, count in counts.items() if count == top]
    return leaders[0] if len(leaders) == 1 else "no_majority"


def fleiss_kappa(table: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa of a count table: table[i][j] = raters who put item i in category j (n_i = sum of row i >= 2).

    P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1)), P-bar = mean_i P_i, p_j = sum_i n_ij / sum_i n_i,
    P_e = sum_j p_j^2, kappa = (P-bar - P_e) / (1 - P_e); None when P_e = 1 or the table is empty.
    """
    rows = [list(row) for row in table]
    if not rows:
        return None
    observed = sum(_item_agreement(row) for row in rows) / len(rows)
    total = sum(sum(row) for row in rows)
    chance = sum((sum(row[j] for row in rows) / total) ** 2 for j in range(len(rows[0])))
    return None if chance >= 1.0 else (observed - chance) / (1.0 - chance)


def _item_agreement(counts: Sequence[int]) -> float:
    """P_i: the fraction of the n_i (n_i - 1) ordered pairs of an item's raters who chose the same category."""
    raters = sum(counts)
    if raters < 2:
        raise ValueError("every item needs at least two ratings")
    return (sum(n * n for n in counts) - raters) / (raters * (raters - 1))


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float | None:
    """Cohen's kappa of two annotators' labels of the same items (first[i] and second[i] label item i).

    p_o = fraction of items with equal labels, p_e = sum_k (share of k in first) (share of k in second),
    kappa = (p_o - p_e) / (1 - p_e); None when p_e = 1 or there are no items.
    """
    if len(first) != len(second):
        raise ValueError("both annotators must label the same items")
    if not first:
        return None
    n = len(first)
    observed = sum(a == b for a, b in zip(first, second)) / n
    first_counts, second_counts = Counter(first), Counter(second)
    chance = sum(first_counts[label] * second_counts[label] for label in first_counts) / (n * n)
    return None if chance >= 1.0 else (observed - chance) / (1.0 - chance)


@dataclass
class Agreement:
    """Agreement over the pairs with >= 2 non-skip labels (`items`); see the module docstring."""

    items: int = 0
    observed: float | None = None
    unanimous: float | None = None
    fleiss_kappa: float | None = None
    cohen_kappa: dict[str, dict[str, Any]] = field(default_factory=dict)  # "ann1 | ann2" -> {items, observed, kappa}


def agreement(labels_by_pair: Mapping[int, Mapping[str, str]]) -> Agreement:
    """Agreement statistics of {pair id: {annotator: label}} (labels in LABELS; skips already removed)."""
    shared = {pair: labels for pair, labels in labels_by_pair.items() if len(labels) >= 2}
    result = Agreement(items=len(shared))
    if shared:
        table = [[Counter(labels.values())[label] for label in LABELS] for labels in shared.values()]
        result.observed = sum(_item_agreement(row) for row in table) / len(table)
        result.unanimous = sum(max(row) == sum(row) for row in table) / len(table)
        result.fleiss_kappa = fleiss_kappa(table)
    annotators = sorted({name for labels in shared.values() for name in labels})
    for first, second in itertools.combinations(annotators, 2):
        both = [(labels[first], labels[second]) for labels in shared.values() if first in labels and second in labels]
        if both:
            result.cohen_kappa[f"{first} | {second}"] = {
                "items": len(both),
                "observed": sum(a == b for a, b in both) / len(both),
                "kappa": cohen_kappa([a for a, _ in both], [b for _, b in both]),
            }
    return result


# --------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ExportReport:
    """What `export_pairs` wrote and left out. `excluded` counts pairs by reason (EXCLUDED_REASONS);
    `judgments_by_choice` counts active judgments, skips included."""

    out_path: str
    pairs_total: int
    written: int
    excluded: dict[str, int]
    judgments_by_choice: dict[str, int]
    annotators: list[str]
    agreement: Agreement

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A few human-readable lines."""
        excluded = ", ".join(f"{reason} {count}" for reason, count in self.excluded.items())
        lines = [f"wrote {self.written} of {self.pairs_total} pairs to {self.out_path}",
                 f"excluded pairs: {excluded}",
                 "judgments: " + ", ".join(f"{choice} {count}" for choice, count in self.judgments_by_choice.items()),
                 f"annotators: {len(self.annotators)}"]
        agreed = self.agreement
        if agreed.items:
            lines.append(f"agreement over {agreed.items} pairs labelled by several annotators: observed "
                         f"{agreed.observed:.3f}, unanimous {agreed.unanimous:.3f}, Fleiss' kappa "
                         f"{_number(agreed.fleiss_kappa)}")
            lines.extend(f"  Cohen's kappa {names}: {_number(stats['kappa'])} over {stats['items']} pairs "
                         f"(observed {stats['observed']:.3f})" for names, stats in agreed.cohen_kappa.items())
        else:
            lines.append("agreement: no pair was labelled by two or more annotators")
        return "\n".join(lines)


def _number(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def export_pairs(db_path: str | Path, out_path: str | Path) -> ExportReport:
    """Write the resolved pairs of the store as TRL JSON Lines and report what was left out and the agreement.

    Each line: {"prompt", "chosen", "rejected", "prompt_id", "pair_id", "votes_for", "votes_total"} (votes count
    non-skip labels). Text prompts give text responses; when any exported prompt is a message list, every row is
    conversational (a text prompt becomes one user message, responses one assistant message each), since a
    dataset is all one form. The file is written whole (temporary file, then renamed).
    """
    with opened(db_path) as conn:
        pairs = all_pairs(conn)
        judgments = active_judgments(conn)
    by_pair: dict[int, list[Judgment]] = defaultdict(list)
    for judgment in judgments:
        by_pair[judgment.pair_id].append(judgment)
    rows, excluded = _resolved_rows(pairs, by_pair)
    if any(isinstance(row["prompt"], list) for row in rows):
        rows = [_conversational(row) for row in rows]
    _write_jsonl(Path(out_path), rows)
    labels_by_pair = {pair: {j.annotator: j.choice for j in items if j.choice != "skip"}
                      for pair, items in by_pair.items()}
    choice_counts = Counter(judgment.choice for judgment in judgments)
    return ExportReport(
        out_path=str(out_path), pairs_total=len(pairs), written=len(rows), excluded=excluded,
        judgments_by_choice={choice: choice_counts[choice] for choice in (*LABELS, "skip")},
        annotators=sorted({judgment.annotator for judgment in judgments}),
        agreement=agreement(labels_by_pair),
    )


def _resolved_rows(pairs: list[Pair], by_pair: Mapping[int, list[Judgment]]) -> tuple[list[dict], dict[str, int]]:
    rows, excluded = [], dict.fromkeys(EXCLUDED_REASONS, 0)
    for pair in pairs:
        choices = [judgment.choice for judgment in by_pair.get(pair.pair_id, [])]
        outcome = resolve(choices)
        if outcome not in ("a", "b"):
            excluded[outcome] += 1
            continue
        chosen, rejected = (pair.response_a, pair.response_b) if outcome == "a" else (pair.response_b, pair.response_a)
        rows.append({"prompt": pair.prompt, "chosen": chosen, "rejected": rejected, "prompt_id": pair.prompt_id,
                     "pair_id": pair.pair_id, "votes_for": choices.count(outcome),
                     "votes_total": sum(choice != "skip" for choice in choices)})
    return rows, excluded


def _conversational(row: dict) -> dict:
    prompt = row["prompt"]
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return {**row, "prompt": messages, "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    try:
        atomic.write_jsonl(path, rows)
    except OSError as error:
        raise DataError(f"cannot write the export: {error}", file=str(path)) from None
