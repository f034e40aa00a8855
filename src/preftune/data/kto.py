"""KTO's KL completions: which other row's completion each row's KL term scores, fixed when the data is prepared.

``kl_partner_rows`` pairs each row with another row of its group (consecutive rows, ``group_size`` = the per-device
batch size, at least 2): row i takes row i − 1's completion and the group's first row the group's last, so no row
meets its own completion. ``with_kl_completions`` stores that completion in each row (``kl_completion_ids``), so
the KL term does not depend on which rows share a micro-batch (batch size 1, token budgets and shuffling all work).

How this compares with TRL 1.16 and LLaMA-Factory 0.9.5, and how the reference point z is formed: docs/kto.md.
"""

from __future__ import annotations

import datasets
import pyarrow as pa

from preftune.errors import DataError

KL_COMPLETION_COLUMN = "kl_completion_ids"


def kl_partner_rows(num_rows: int, group_size: int) -> list[int]:
    """For each row of a data set (in its order), the row whose completion its KL term uses (docs/kto.md).

    Args:
        num_rows: rows in the data set, at least 2.
        group_size: rows per rotation group (the per-device batch size); values below 2 count as 2.

    Returns:
        ``partners`` with ``partners[i] != i`` for every row.
    """
    if num_rows < 2:
        raise ValueError(f"KL partners need at least 2 rows, got {num_rows}")
    size = max(2, group_size)
    starts = list(range(0, num_rows, size))
    if num_rows - starts[-1] == 1:  # a last group of one row joins the group before it
        starts.pop()
    partners = []
    for index, start in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else num_rows
        partners += [end - 1] + list(range(start, end - 1))
    return partners


def with_kl_completions(dataset: datasets.Dataset, group_size: int, *, source: str | None = None) -> datasets.Dataset:
    """``dataset`` (tokenized unpaired rows) with a ``kl_completion_ids`` column: row i's mismatched completion,
    the ``completion_ids`` of row ``kl_partner_rows(len(dataset), group_size)[i]`` (uncut: the collator cuts it to
    fit ``max_length`` with row i's prompt).

    Raises:
        DataError: fewer than 2 rows (naming ``source``): the KL term needs another row's completion.
    """
    if len(dataset) < 2:
        raise DataError(
            f"kto needs at least 2 rows: its KL estimate pairs each prompt with another row's completion; "
            f"got {len(dataset)}",
            file=source,
        )
    if KL_COMPLETION_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(KL_COMPLETION_COLUMN)
    completions = dataset.with_format("arrow")[:].column("completion_ids")
    partners = pa.array(kl_partner_rows(len(dataset), group_size), type=pa.int64())
    return dataset.add_column(KL_COMPLETION_COLUMN, completions.take(partners).combine_chunks())

