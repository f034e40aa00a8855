"""preftune: preference tuning (DPO and friends) for Hugging Face causal language models.

The Python API mirrors TRL's: ``from preftune import DPOConfig, DPOTrainer``.
"""

from preftune.config import DPOConfig, load_config
from preftune.errors import CheckpointError, ConfigError, DataError, PreftuneError
from preftune.losses import preference_loss

__version__ = "0.1.0"


def __getattr__(name: str):
    # The trainer pulls in accelerate and transformers' training stack; import it on first use.
    if name == "DPOTrainer":
        from preftune.trainer import DPOTrainer

        return DPOTrainer
    raise AttributeError(f"module 'preftune' has no attribute {name!r}")


__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "load_config",
    "preference_loss",
    "PreftuneError",
    "ConfigError",
    "DataError",
    "CheckpointError",
]
