"""Uploading a run's output folder to the Hugging Face Hub (``DPOTrainer.push_to_hub``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from preftune.errors import ConfigError


def push_folder(folder: Path, repo_id: str, *, token: str | None, private: bool, commit_message: str | None) -> Any:
    """Create ``repo_id`` if needed and upload ``folder``; returns huggingface_hub's commit info.

    ConfigError (key ``push_to_hub``), in one line, when the Hub cannot be reached (offline mode, no network) or
    refuses (authentication); the files stay where they are.
    """
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"push_to_hub: the Hugging Face Hub is not reachable (HF_HUB_OFFLINE is set); the model "
                          f"stays in {folder}", key="push_to_hub")
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    except Exception as error:  # network and authentication errors alike: one line, the files stay local
        text = str(error).strip().splitlines()
        raise ConfigError(f"push_to_hub to {repo_id} failed ({type(error).__name__}: "
                          f"{text[0] if text else ''}); the model stays in {folder}", key="push_to_hub") from None
