"""pytest configuration for a ported TRL test module (copied by compat/trl/port.py next to it).

It does three things:

- registers the markers TRL's test suite declares;
- skips the tests that need a hub asset compat/trl does not build (listed by port.py in missing_assets.json:
  vision-language models and image datasets), naming the asset. A test needs an asset when its parameters or its
  source code name the asset's local path;
- on a machine without a CUDA/XPU device, makes ``transformers.TrainingArguments`` (hence TRL's ``DPOConfig``)
  default to ``use_cpu=True``. TRL's configs default to ``bf16=True``, which transformers refuses without a bf16
  device unless ``use_cpu`` is set ("Your setup doesn't support bf16/gpu. You need to assign use_cpu if you want
  to train the model on CPU."); TRL runs these tests on GPU runners. This is what a CPU user of TRL has to pass,
  and it changes nothing else in TRL. preftune's DPOConfig is not a TrainingArguments and is not touched.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
import transformers

MISSING_ASSETS: dict[str, str] = json.loads((Path(__file__).parent / "missing_assets.json").read_text())
"""local path that was substituted for a hub id but not built -> why it is not built"""


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _default_to_cpu() -> None:
    original = transformers.TrainingArguments.__post_init__

    def post_init_on_cpu(self):
        self.use_cpu = True
        original(self)

    transformers.TrainingArguments.__post_init__ = post_init_on_cpu


if not _has_accelerator():
    _default_to_cpu()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: marks tests as slow")
    config.addinivalue_line("markers", "low_priority: marks tests as low priority")


def _texts_naming_assets(item) -> list[str]:
    texts = []
    if hasattr(item, "callspec"):
        texts.append(repr(item.callspec.params))
    try:
        texts.append(inspect.getsource(item.function))
    except (OSError, TypeError):
        pass
    return texts


def pytest_collection_modifyitems(config, items):
    for item in items:
        texts = _texts_naming_assets(item)
        missing = [path for path in MISSING_ASSETS if any(path in text for text in texts)]
        if missing:
            names = ", ".join(f"{Path(path).name} ({MISSING_ASSETS[path]})" for path in missing)
            item.add_marker(pytest.mark.skip(reason=f"compat/trl: hub asset not built locally: {names}"))
