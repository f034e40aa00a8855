"""Stand-in for TRL's ``tests/testing_utils.py``, copied by compat/trl/port.py next to the ported test module.

Written for compat/trl (not TRL's code). It provides the names TRL's test modules import from
``.testing_utils``: ``TrlTestCase`` (a per-test temporary directory in ``self.tmp_dir``), the ``require_*`` skip
markers and a few device helpers. Every skip condition is evaluated honestly on the machine running the tests:
a test that needs a GPU, bitsandbytes, liger-kernel, ... is skipped exactly when that is missing here.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import pytest
import torch


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _accelerator_count() -> int:
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.xpu.device_count()
    return 0


def _requires(available: bool, what: str):
    return pytest.mark.skipif(not available, reason=f"test requires {what}")


require_peft = _requires(_installed("peft"), "peft")
require_bitsandbytes = _requires(_installed("bitsandbytes"), "bitsandbytes")
require_liger_kernel = _requires(_installed("liger_kernel"), "liger-kernel")
require_kernels = _requires(_installed("kernels"), "kernels")
require_vision = _requires(_installed("PIL"), "vision (Pillow)")
require_vllm = _requires(_installed("vllm"), "vllm")
require_wandb = _requires(_installed("wandb"), "wandb")
require_no_wandb = pytest.mark.skipif(_installed("wandb"), reason="test requires wandb not to be installed")
require_comet = _requires(_installed("comet_ml"), "comet_ml")
require_rich = _requires(_installed("rich"), "rich")
require_sklearn = _requires(_installed("sklearn") and _installed("joblib"), "sklearn")
require_jmespath = _requires(_installed("jmespath"), "jmespath")
require_math_latex = _requires(_installed("math_verify"), "math_verify")
require_mergekit = _requires(_installed("mergekit"), "mergekit")
require_openreward = _requires(_installed("openreward"), "openreward")
require_harbor = _requires(_installed("harbor"), "harbor")
require_torch_accelerator = _requires(_accelerator_count() >= 1, "an accelerator")
require_torch_multi_accelerator = _requires(_accelerator_count() >= 2, "multiple accelerators")
require_3_accelerators = _requires(_accelerator_count() >= 3, "at least 3 accelerators")


def is_ampere_or_newer(device_index: int = 0) -> bool:
    """True on an NVIDIA GPU of compute capability 8.0 or more (never on ROCm or without CUDA)."""
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def is_bf16_supported() -> bool:
    """Hardware bf16 training support (a CPU does not count)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


class TrlTestCase:
    """Base class of TRL's test classes: each test gets its own empty directory as ``self.tmp_dir``."""

    @pytest.fixture(autouse=True)
    def set_tmp_dir(self, tmp_path):
        self.tmp_dir = str(tmp_path)


def ignore_warnings(message: str | None = None, category: type[Warning] = Warning):
    """Decorator: run the test with the matching warnings ignored."""

    def decorator(test_func):
        @functools.wraps(test_func)
        def wrapper(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=message or "", category=category)
                return test_func(*args, **kwargs)

        return wrapper

    return decorator
