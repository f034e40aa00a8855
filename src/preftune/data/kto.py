"""KTO's KL completions: which other row's completion each row's KL term scores, fixed when the data is prepared.

KTO (Ethayarajh et al. 2024, eq. 8) compares each reward with a reference point
``z = max(0, E[log π(y'|x) − log π_ref(y'|x)])``, estimated on *mismatched* pairs: a prompt x with the completion
y' of another row. The two reference implementations form these pairs the same way and differ only in the size of
the groups they rotate within:

- TRL 1.16 (``trl/trainer/kto_trainer.py``, ``_prepare_dataset``): after tokenizing and after dropping rows whose
  prompt alone fills ``max_length``, ``dataset.map(batched=True, batch_size=per_device_train_batch_size)`` sets
  ``KL_completion_ids`` to the completions of each group of consecutive rows rotated by one:
  ``(x1, y_n), (x2, y1), …, (x_n, y_{n−1})``. Training reads the rows in order (``train_sampling_strategy`` must be
  "sequential"), so each micro-batch is one group and its KL completions are its own completions, re-paired.
  A group of one row (batch size 1, or a last group of one) would pair a prompt with its own completion, so TRL
  refuses ``per_device_train_batch_size <= 1``. Eval data is rotated in groups of the train batch size too. The
  collator cuts prompt + KL completion to ``max_length`` (keeping the start).
- LLaMA-Factory 0.9.5 (``data/processor/feedback.py``, ``preprocess_dataset``): the same +1 rotation of the
  responses, applied to each batch that ``dataset.map(batched=True)`` hands the preprocessor:
  ``preprocessing_batch_size`` rows (default 1000) of each of the ``preprocessing_num_workers`` contiguous shards.
  The KL row is encoded on its own (template, then ``cutoff_len`` split between prompt and response as for any
  row). Rows are then shuffled (a random sampler), so a micro-batch's KL completions come from elsewhere in the data
  set, and batch size 1 works: its KTO trainer skips TRL's constructor (and so TRL's batch-size check) and computes
  the loss with the ``kto_loss`` of TRL 0.18-0.24, which forms z as below.

Both then compute, per micro-batch, ``z`` = the mean over its rows of ``log π(y'|x) − log π_ref(y'|x)`` (no
gradient), averaged over processes (``accelerator.gather(...).mean()``) and clamped at 0; each micro-batch of a
gradient-accumulation step has its own ``z``.

preftune's rule (``kl_partner_rows``): rows are taken in the order of the prepared data set (after tokenization and
after rows without room are dropped) and cut into consecutive groups of ``group_size`` rows; within a group, row i
takes the completion of row i − 1 and the group's first row takes the group's last completion. ``group_size`` is
``per_device_train_batch_size``, at least 2, so the train data's KL completions are TRL's whenever TRL runs (batch
size >= 2) and its last group is not a single row: unlike TRL, such a row joins the group before it, so no row is
ever paired with its own completion. Eval data is grouped by ``per_device_eval_batch_size`` (TRL: the train batch
size): eval batches are read in order, so with plain batches of two rows or more each eval batch's KL completions
are its own, as in TRL's training. Each row carries its KL completion (``kl_completion_ids``), so the KL term no
longer depends on which rows share a micro-batch: batch size 1, token-budget batches and shuffled batches all work.
(preftune shuffles training rows every epoch, so with batch size >= 2 a micro-batch's KL completions are in general
not its own completions, as they are in TRL's sequential order.)

z in preftune (``DPOTrainer._unpaired_batch_loss``) is TRL's: per micro-batch, the mean KL log-ratio of its rows, in
training averaged over the micro-batches the processes run at the same time (a zero-weight stand-in, which a process
runs when a step has fewer micro-batches than its share, is left out), then clamped at 0. Under gradient accumulation
each micro-batch keeps its own z, so at batch size 1 on one process z comes from a single mismatched pair, as in TRL
and LLaMA-Factory. In evaluation each process keeps its own z (eval shares are not in step across processes). Hence
with kto, N processes are not exactly one process with N times the accumulation, as they are for the other losses.
"""

from __future__ import annotations

import datasets
import pyarrow as pa

from preftune.errors import DataError

KL_COMPLETION_COLUMN = "kl_completion_ids"


def kl_partner_rows(num_rows: int, group_size: int) -> list[int]:
    """For each row of a data set (in its order), the row whose completion its KL term uses (module docstring).

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

