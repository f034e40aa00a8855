"""The reference policy π_ref: frozen, evaluated without gradients.

Strategies (``build_reference`` picks one; ``preftune.ref_cache`` adds a precomputed cache):
- ``FrozenReference``: a separate frozen model — a copy of the policy as loaded, or one the user gave;
- ``AdapterDisabledReference``: a LoRA policy whose adapter is still fresh (B = 0) is, with the adapter disabled,
  exactly the policy as loaded — so the policy itself serves as reference, with no second copy in memory;
- ``AdapterCopyReference``: a LoRA policy whose adapter was already trained (e.g. an SFT adapter trained further):
  the reference is that adapter as loaded, kept as a frozen second adapter in the same model. Disabling the adapter
  would give the bare base instead, a different reference than the policy started from.

``sync_reference`` implements TR-DPO's reference updates for a ``FrozenReference``.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from typing import ContextManager, Iterator, Protocol

import torch
from peft import PeftModel, PeftType
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from preftune.adapters import is_peft_model, peft_model_of, require_peft_model
from preftune.data.collate import PreferenceBatch
from preftune.errors import ConfigError
from preftune.logprobs import chosen_and_rejected, completion_logprobs, unwrap_model
from preftune.ref_cache import reference_fingerprint

logger = logging.getLogger(__name__)

REF_ADAPTER = "ref"  # name of the frozen adapter copy an ``AdapterCopyReference`` adds to the policy


class Reference(Protocol):
    """What the trainer and evaluation ask of a reference; none of them tests which strategy it is."""

    model: nn.Module | None  # the module whose weights the reference runs (the policy itself for an adapter
    # reference); None when the log-probs come with the data (``ref_cache.PrecomputedReference``)

    @property
    def separate_model(self) -> nn.Module | None:
        """The reference's own frozen model, apart from the policy (a ``FrozenReference``'s): what a backend shards
        or partitions beside the policy and what TR-DPO updates. None when the reference runs the policy's weights
        or holds no model."""

    def to(self, device: torch.device | str) -> "Reference":
        """Move the reference's own weights to ``device`` (a no-op for weights that move with the policy)."""

    def completion_logps(self, batch: PreferenceBatch, **logprob_options) -> Tensor:
        """Summed log-probs of every completion, ``(K, B)`` (completion k of example i at ``[k, i]``), without
        gradients. ``logprob_options`` are passed to ``completion_logprobs`` (``chunked_head``, ``chunk_size``,
        ``ld_alpha``)."""

    def logps(self, batch: PreferenceBatch, **logprob_options) -> tuple[Tensor, Tensor]:
        """``(chosen, rejected)``: ``(B,)`` and ``(B,)`` (one negative) or ``(B, M)`` (M negatives)."""

    def fingerprint(self) -> str:
        """sha256 of the weights the reference forward uses (``ref_cache.reference_fingerprint``): what its
        log-probs depend on, the key of their cache."""

    def sampling_model(self) -> ContextManager[nn.Module]:
        """A context in which the returned module generates as the reference does (for an adapter reference: the
        policy with its adapter switched; switched back afterwards)."""


class FrozenReference:
    """A reference model kept in eval mode with gradients off; never updated (but by TR-DPO's ``sync_reference``),
    never re-read from disk."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.model.eval()
        self.model.requires_grad_(False)

    @property
    def separate_model(self) -> nn.Module:
        return self.model

    @classmethod
    def copy_of(cls, policy: nn.Module) -> "FrozenReference":
        """A deep copy of the policy as it is now (i.e. as loaded, before any update)."""
        return cls(copy.deepcopy(policy))

    def to(self, device: torch.device | str) -> "FrozenReference":
        self.model.to(device)
        return self

    @torch.no_grad()
    def completion_logps(self, batch: PreferenceBatch, **logprob_options) -> Tensor:
        return completion_logprobs(self.model, batch, **logprob_options).logps

    def logps(self, batch: PreferenceBatch, **logprob_options) -> tuple[Tensor, Tensor]:
        return chosen_and_rejected(self.completion_logps(batch, **logprob_options))

    def fingerprint(self) -> str:
        return reference_fingerprint(self.model)

    @contextmanager
    def sampling_model(self) -> Iterator[nn.Module]:
        yield self.model


# ------------------------------------------------------------------------------------------- adapter references
@contextmanager
def _reference_forward(model: nn.Module) -> Iterator[None]:
    """No gradients and eval mode (no dropout) inside; afterwards every module's training flag and every
    parameter's ``requires_grad`` exactly as before — peft's adapter switching rewrites ``requires_grad``."""
    requires_grad = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    training = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in training:
            module.training = flag
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)


class UntouchedPolicyReference(FrozenReference):
    """The policy itself as the reference, valid only while it has not been updated (full fine-tuning before the
    first step): e.g. to score data that arrives after the set-up's reference was dropped for precomputed
    log-probs. Scored without gradients in eval mode; the policy's flags are left exactly as they were."""

    separate_model = None  # the reference forward runs the policy's own weights

    def __init__(self, policy: nn.Module) -> None:  # not frozen: the policy trains on afterwards
        self.model = policy

    def to(self, device: torch.device | str) -> "UntouchedPolicyReference":
        return self  # the weights are the policy's and move with it

    def completion_logps(self, batch: PreferenceBatch, **logprob_options) -> Tensor:
        with _reference_forward(self.model):
            return completion_logprobs(self.model, batch, **logprob_options).logps


class AdapterDisabledReference:
    """The reference is the policy (a PeftModel) with its adapters disabled: no second copy in memory.

    Exact only while disabling the adapter gives the policy as loaded, i.e. for an adapter created fresh with
    B = 0 on untouched base weights (``adapter_is_fresh``); ``build_reference`` checks that.
    """

    separate_model = None  # the reference forward runs the policy's own weights

    def __init__(self, policy: nn.Module) -> None:
        self._policy = policy
        self._peft = require_peft_model(policy, "AdapterDisabledReference")

    @property
    def model(self) -> nn.Module:
        return self._policy

    def to(self, device: torch.device | str) -> "AdapterDisabledReference":
        return self  # the weights are the policy's and move with it

    def completion_logps(self, batch: PreferenceBatch, **logprob_options) -> Tensor:
        """``(K, B)`` log-probs under the base weights; the adapters are enabled again afterwards (also on error)."""
        with _reference_forward(self._peft), self._peft.disable_adapter():
            return completion_logprobs(self._peft, batch, **logprob_options).logps

    def logps(self, batch: PreferenceBatch, **logprob_options) -> tuple[Tensor, Tensor]:
        return chosen_and_rejected(self.completion_logps(batch, **logprob_options))

    def fingerprint(self) -> str:
        """The base weights: every weight but the adapters'."""
        return reference_fingerprint(self._policy, exclude=lambda name: "lora_" in name)

    @contextmanager
    def sampling_model(self) -> Iterator[nn.Module]:
        """The policy with its adapters disabled (enabled again afterwards)."""
        with self._peft.disable_adapter():
            yield self._peft


class AdapterCopyReference:
    """For a policy that is an already-trained PeftModel: the reference is a frozen copy of that adapter (not the
    bare base), held as a second adapter ``"ref"`` in the same PeftModel.

    The copy costs one adapter's memory. Its weights never require grad and never change; each reference forward
    switches the active adapter to the copy and back, leaving the trainable adapter's ``requires_grad`` flags
    exactly as they were.
    """

    separate_model = None  # the frozen copy lives inside the policy

    def __init__(self, policy: nn.Module) -> None:
        self._policy = policy
        self._peft = require_peft_model(policy, "AdapterCopyReference")
        self.trainable_adapter = self._peft.active_adapter
        self.adapter_name = _free_adapter_name(self._peft, REF_ADAPTER)
        self.reference_parameters = _add_frozen_copy(self._peft, self.trainable_adapter, self.adapter_name)

    @property
    def model(self) -> nn.Module:
        return self._policy

    def to(self, device: torch.device | str) -> "AdapterCopyReference":
        return self  # the copy lives inside the policy and moves with it

    def completion_logps(self, batch: PreferenceBatch, **logprob_options) -> Tensor:
        """``(K, B)`` log-probs under the frozen adapter copy; the trainable adapter is active again afterwards."""
        with _reference_forward(self._peft):
            self._peft.set_adapter(self.adapter_name, inference_mode=True)
            try:
                return completion_logprobs(self._peft, batch, **logprob_options).logps
            finally:
                self._peft.set_adapter(self.trainable_adapter)

    def logps(self, batch: PreferenceBatch, **logprob_options) -> tuple[Tensor, Tensor]:
        return chosen_and_rejected(self.completion_logps(batch, **logprob_options))

    def fingerprint(self) -> str:
        """The base weights and the frozen copy: every weight but the trainable adapter's."""
        copy_part = f".{self.adapter_name}."
        return reference_fingerprint(self._policy, exclude=lambda name: "lora_" in name and copy_part not in name)

    @contextmanager
    def sampling_model(self) -> Iterator[nn.Module]:
        """The policy with the frozen copy active (the trainable adapter active again afterwards)."""
        self._peft.set_adapter(self.adapter_name, inference_mode=True)
        try:
            yield self._peft
        finally:
            self._peft.set_adapter(self.trainable_adapter)


def _free_adapter_name(peft_model: PeftModel, wanted: str) -> str:
    name = wanted
    while name in peft_model.peft_config:
        name += "_copy"
    return name


def _add_frozen_copy(peft_model: PeftModel, source: str, name: str) -> list[nn.Parameter]:
    """Add adapter ``name`` with ``source``'s config and a bit-identical copy of its weights (same dtype and device),
    frozen; the requires_grad flags of every other parameter are left as they were. Returns the new parameters."""
    config = copy.deepcopy(peft_model.peft_config[source])
    config.inference_mode = True
    existing = {id(parameter) for parameter in peft_model.parameters()}
    flags = [(parameter, parameter.requires_grad) for parameter in peft_model.parameters()]
    peft_model.add_adapter(name, config)
    for parameter, flag in flags:
        parameter.requires_grad_(flag)
    sources = dict(peft_model.named_parameters())
    added = [(key, parameter) for key, parameter in peft_model.named_parameters() if id(parameter) not in existing]
    with torch.no_grad():
        for key, parameter in added:
            original = sources[_renamed_adapter_key(key, name, source)]
            parameter.data = original.detach().clone()
            parameter.requires_grad_(False)
    return [parameter for _, parameter in added]


def _renamed_adapter_key(key: str, adapter: str, other: str) -> str:
    """``...q_proj.lora_A.ref.weight`` → ``...q_proj.lora_A.default.weight``: the last path part naming the adapter."""
    parts = key.split(".")
    index = len(parts) - 1 - parts[::-1].index(adapter)
    return ".".join(parts[:index] + [other] + parts[index + 1 :])


def adapter_is_fresh(peft_model: nn.Module) -> bool:
    """Whether the active adapter is still the identity it was created as, so that disabling it gives the policy as
    loaded: a LoRA adapter with the default initialisation (``init_lora_weights`` True or "gaussian": base weights
    untouched, B = 0), no DoRA magnitudes or other trained modules, and every B still exactly zero."""
    peft_model = peft_model_of(peft_model)
    config = peft_model.active_peft_config
    name = peft_model.active_adapter
    if config.peft_type != PeftType.LORA or config.init_lora_weights not in (True, "gaussian"):
        return False
    if config.use_dora or config.modules_to_save or getattr(config, "trainable_token_indices", None):
        return False
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for store in (module.lora_B, module.lora_embedding_B):
            if name not in store:
                continue
            entry = store[name]
            tensors = [entry.weight, entry.bias] if isinstance(entry, nn.Module) else [entry]
            if any(tensor is not None and torch.count_nonzero(tensor) for tensor in tensors):
                return False
    return True


# -------------------------------------------------------------------------------------------- choosing one
def build_reference(
    policy: nn.Module, ref_model: nn.Module | None = None
) -> FrozenReference | AdapterDisabledReference | AdapterCopyReference:
    """The reference for ``policy``, as it is now (call before any update):

    - ``ref_model`` given → ``FrozenReference(ref_model)`` (its vocabulary must match the policy's);
    - a PeftModel whose adapter is fresh (``adapter_is_fresh``) → ``AdapterDisabledReference``;
    - a PeftModel whose adapter is trained or loaded non-trivial → ``AdapterCopyReference``;
    - else a frozen deep copy of the policy.
    """
    if ref_model is not None:
        check_reference_compatible(policy, ref_model)
        return FrozenReference(ref_model)
    if is_peft_model(policy):
        if adapter_is_fresh(policy):
            logger.info("reference: the policy with its (fresh) adapter disabled")
            return AdapterDisabledReference(policy)
        logger.info("reference: a frozen copy of the policy's trained adapter '%s'", peft_model_of(policy).active_adapter)
        return AdapterCopyReference(policy)
    return FrozenReference.copy_of(policy)


def check_reference_compatible(policy: nn.Module, reference_model: nn.Module) -> None:
    """Refuse (``ConfigError``, key ``ref_model``) a reference whose vocabulary differs from the policy's: the
    log-ratio ``log π(y|x) − log π_ref(y|x)`` needs both to score the same token ids."""
    policy_vocab, reference_vocab = _vocabulary(policy), _vocabulary(reference_model)
    if policy_vocab != reference_vocab:
        raise ConfigError(
            f"the reference model {_describe(reference_model, reference_vocab)} and the policy "
            f"{_describe(policy, policy_vocab)} have different vocabularies; use a reference with the policy's tokenizer",
            key="ref_model",
        )


def _vocabulary(model: nn.Module) -> tuple[int | None, int | None]:
    """``(config.vocab_size, rows of the output embedding)``, None where the model does not say."""
    inner = unwrap_model(model)
    vocab_size = getattr(getattr(inner, "config", None), "vocab_size", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    rows = head.weight.shape[0] if head is not None and getattr(head, "weight", None) is not None else None
    return vocab_size, rows


def _describe(model: nn.Module, vocab: tuple[int | None, int | None]) -> str:
    name = getattr(getattr(unwrap_model(model), "config", None), "_name_or_path", "") or type(unwrap_model(model)).__name__
    return f"'{name}' (vocab_size {vocab[0]}, {vocab[1]} output embedding rows)"


# ---------------------------------------------------------------------------------------------------- TR-DPO
def sync_reference(reference: Reference, policy: nn.Module, alpha: float) -> None:
    """TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment") reference update,
    parameter by parameter and without gradients: ``θ_ref ← α·θ_policy + (1 − α)·θ_ref`` (α = 1: hard copy).

    Only a reference with a ``separate_model`` (a ``FrozenReference``) of the policy's parameter names and shapes
    can be updated; an adapter reference is the base model or a frozen adapter, which this update cannot change
    (``ConfigError``).
    """
    if reference.separate_model is None:
        raise ConfigError(
            f"sync_ref_model needs a separate reference model; the {type(reference).__name__} cannot be updated "
            "(with LoRA, pass a ref_model or train without sync_ref_model)",
            key="sync_ref_model",
        )
    if not 0 < alpha <= 1:
        raise ConfigError(f"ref_model_mixup_alpha must be in (0, 1], got {alpha}", key="ref_model_mixup_alpha")
    targets = dict(reference.separate_model.named_parameters())
    sources = dict(peft_model_of(policy).named_parameters())
    _check_same_parameters(targets, sources)
    with torch.no_grad():
        for name, target in targets.items():
            source = sources[name].detach().to(device=target.device, dtype=target.dtype)
            if alpha == 1:
                target.copy_(source)
            else:
                target.mul_(1 - alpha).add_(source, alpha=alpha)


def _check_same_parameters(targets: dict[str, nn.Parameter], sources: dict[str, nn.Parameter]) -> None:
    if targets.keys() != sources.keys():
        different = sorted(targets.keys() ^ sources.keys())
        raise ConfigError(
            f"sync_ref_model: the reference and the policy have different parameters (e.g. {different[:3]})",
            key="sync_ref_model",
        )
    shapes = [name for name, target in targets.items() if target.shape != sources[name].shape]
    if shapes:
        raise ConfigError(f"sync_ref_model: parameter shapes differ (e.g. {shapes[:3]})", key="sync_ref_model")
