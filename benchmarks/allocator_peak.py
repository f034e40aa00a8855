"""Bytes in use by the C allocator during one forward + backward of one pair, per layout (docs/layouts.md).

glibc's ``mallinfo2`` (heap in use + mmapped chunks) is read after every aten op of the step (a TorchDispatchMode),
so the numbers are the allocator's, free of the slack that peak RSS carries. Model and step as in
``long_pairs_layouts.py``. Linux/glibc only; slow (one C call per op).

Usage (from the repository root, one layout per process):
  PYTHONPATH=src python benchmarks/allocator_peak.py plain|shared|shared_replay 500+3000x2
"""

from __future__ import annotations

import ctypes
import resource
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, "benchmarks")
from long_pairs_layouts import build_model, parse_lengths  # noqa: E402
from preftune.data.collate import collate_pairs, collate_shared_prefix  # noqa: E402
from preftune.logprobs import pair_logprobs  # noqa: E402

MIB = 2**20


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = MallInfo2


def bytes_in_use() -> int:
    info = LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakInUse(TorchDispatchMode):
    """Largest ``bytes_in_use`` after any op, and which op (and phase) it followed."""

    def __init__(self) -> None:
        super().__init__()
        self.peak, self.where, self.phase, self.ops = 0, "", "forward", 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        used = bytes_in_use()
        if used > self.peak:
            self.peak, self.where = used, f"{func} (op {self.ops}, {self.phase})"
        return out


def main(layout: str, lengths: str) -> None:
    prompt, completions = parse_lengths(lengths)
    generator = torch.Generator().manual_seed(1)
    draw = lambda n: torch.randint(3, 50257, (n,), generator=generator).tolist()  # noqa: E731
    example = {"prompt_ids": draw(prompt), "chosen_ids": draw(completions[0]), "rejected_ids": draw(completions[1])}
    batch = (collate_pairs if layout == "plain" else collate_shared_prefix)([example], pad_token_id=0)
    model = build_model(prompt + max(completions) + 8)
    if layout == "shared_replay":
        import preftune.shared_prefix_attention as attention

        attention.merged_blocks_apply = lambda query, dropout: False
    before = bytes_in_use()
    with PeakInUse() as record:
        out = pair_logprobs(model, batch)
        loss = (out.chosen_logps - out.rejected_logps).sum()
        after_forward = bytes_in_use()
        record.phase = "backward"
        loss.backward()
    print(f"{layout} {lengths}: in use after the forward {(after_forward - before) / MIB:.0f} MiB, "
          f"peak {(record.peak - before) / MIB:.0f} MiB after {record.where}, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")


if __name__ == "__main__":
    main(*sys.argv[1:3])
