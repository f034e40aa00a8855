"""keep_freed_memory: after it, a large tensor freed and allocated again is served from memory the process already
has (no new page faults); without it, glibc maps fresh pages for every such tensor."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO_ROOT

_SCRIPT = """
import resource, sys, torch
from preftune.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
def page_faults_of_a_new_64mib_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.ones(64 * 2**20 // 4)
    del tensor
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# Warm-up: with the heap kept, malloc places the first few 64 MiB blocks after each other (up to 8 new blocks in 40
# runs of 16, by address layout) before a freed one is reused; training repeats the same allocations every step.
for _ in range(12):
    page_faults_of_a_new_64mib_tensor()
print(min(page_faults_of_a_new_64mib_tensor() for _ in range(3)))
"""


def _page_faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO_ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_freed_memory_is_reused_without_new_page_faults():
    default, kept = _page_faults("default"), _page_faults("keep")
    assert default > 4000, f"expected fresh pages for each 64 MiB tensor by default, saw {default} faults"
    assert kept < default / 20, f"{kept} page faults with keep_freed_memory vs {default} without"
