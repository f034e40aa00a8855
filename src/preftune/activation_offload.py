"""Activation offloading (``activation_offloading``, TRL's key): the tensors autograd saves for the backward of the
policy's forward are copied to CPU memory when they are made and copied back when the backward needs them.

What moves: every saved tensor that lives on the accelerator, holds at least ``min_bytes`` and is an activation: not a
parameter and not autocast's per-step copy of one (weights stay where they are; the optimizer needs them there). A tensor saved by several operations (a layer's
input, read by its q, k and v projections) is copied once. The chunked LM head saves only the selected hidden states
and per-row sums, and keeps its softmax chunk outside autograd, so nothing of vocabulary size is copied. With
``gradient_checkpointing`` the saved tensors are each layer's input (what checkpointing keeps), so the two together
leave on the accelerator only the layer being run or recomputed.

The copies run on the compute stream (no side stream: simpler, and ordered with the kernels that free and reuse
the memory); pinned host memory makes them asynchronous to the host. On a CPU-only run activations already live in
CPU memory and offloading cannot save anything: ``offloading_objective`` then warns once and leaves the objective
as it is.
"""

from __future__ import annotations

import logging
import weakref
from typing import Iterable, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks

from preftune.batches import LazyBatch
from preftune.objective import BatchLoss, Objective
from preftune.reference import Reference

logger = logging.getLogger(__name__)

MIN_OFFLOAD_BYTES = 1024
"""Saved tensors smaller than this stay on the accelerator: a copy costs more than the memory it frees (TRL's
threshold)."""


class OffloadedTensor(NamedTuple):
    """A saved tensor's CPU copy and the device it returns to."""

    host: Tensor
    device: torch.device


VIEW_NODES = frozenset({"TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0", "UnsafeViewBackward0",
                        "ExpandBackward0", "AliasBackward0"})
"""Backward nodes of views: a view of a weight copy is still a weight copy."""


def is_parameter_copy(tensor: Tensor) -> bool:
    """Whether a saved tensor is a per-step copy of weights rather than an activation: autocast's low-precision cast of
    a trained parameter (a ``ToCopyBackward0`` straight from a leaf) or a tensor with no gradient history at all (a
    frozen weight's cast under LoRA; also rotary tables and masks, which stay too). Copying weights to the host every
    step would move the whole model twice per step."""
    node = tensor.grad_fn
    if node is None:
        return not tensor.requires_grad
    while node is not None and node.name() in VIEW_NODES:  # linear saves the cast weight transposed
        node = node.next_functions[0][0]
    return node is not None and node.name() == "ToCopyBackward0" and any(
        type(parent).__name__ == "AccumulateGrad" for parent, _ in node.next_functions if parent is not None
    )


class ActivationOffload(saved_tensors_hooks):
    """Context manager: saved tensors made inside it are kept in CPU memory until the backward unpacks them.

    Args:
        parameters: the model's parameters (never offloaded).
        device_type: offload tensors on devices of this type (``"cuda"``; ``"cpu"`` only makes sense in tests,
            where the "offloaded" copy is another CPU tensor).
        min_bytes: smaller tensors stay where they are.
        pin_memory: copy into pinned host memory (asynchronous copies; CUDA only).

    ``offloaded_bytes`` and ``offloaded_count`` count what was moved (each distinct tensor once),
    ``restored_count`` the copies made back in the backward.
    """

    def __init__(self, parameters: Iterable[Tensor], *, device_type: str, min_bytes: int = MIN_OFFLOAD_BYTES,
                 pin_memory: bool | None = None) -> None:
        self.device_type, self.min_bytes = device_type, min_bytes
        self.pin_memory = device_type == "cuda" if pin_memory is None else pin_memory
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self.offloaded_bytes = self.offloaded_count = self.restored_count = 0
        self._copies: dict[int, tuple[weakref.ref, OffloadedTensor]] = {}
        super().__init__(self._pack, self._unpack)

    def should_offload(self, tensor: Tensor) -> bool:
        """On the offload device, large enough, not a broadcast view (stride 0: its copy would be larger than its
        storage) and an activation: not a parameter's storage nor a copy of a parameter (``is_parameter_copy``)."""
        try:
            storage = tensor.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage stay where they are
            return False
        return (
            tensor.device.type == self.device_type
            and tensor.element_size() * tensor.nelement() >= self.min_bytes
            and 0 not in tensor.stride()
            and storage not in self.parameter_storages
            and not is_parameter_copy(tensor)
        )

    def _pack(self, tensor: Tensor) -> Tensor | OffloadedTensor:
        if not self.should_offload(tensor):
            return tensor
        known = self._copies.get(id(tensor))
        if known is not None and known[0]() is tensor:  # the same tensor saved again: one copy
            return known[1]
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=self.pin_memory)
        host.copy_(tensor, non_blocking=self.pin_memory)
        packed = OffloadedTensor(host, tensor.device)
        self._copies[id(tensor)] = (weakref.ref(tensor), packed)
        self.offloaded_bytes += tensor.element_size() * tensor.nelement()
        self.offloaded_count += 1
        return packed

    def _unpack(self, packed: Tensor | OffloadedTensor) -> Tensor:
        if not isinstance(packed, OffloadedTensor):
            return packed
        self.restored_count += 1
        if packed.device.type == "cpu":  # tests: the copy itself stands in for the device tensor
            return packed.host
        return packed.host.to(packed.device, non_blocking=self.pin_memory)

    def __enter__(self) -> "ActivationOffload":
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._copies.clear()  # the packed copies live on in the graph; only the lookup by identity ends here
        super().__exit__(*exc)


class OffloadingObjective:
    """An ``Objective`` whose ``batch_loss`` runs under ``ActivationOffload`` (the policy's forward; the reference's
    runs without gradients and saves nothing). ``last`` is the offload of the latest micro-batch (its counters)."""

    def __init__(self, objective: Objective, device_type: str) -> None:
        self.objective, self.device_type = objective, device_type
        self.last: ActivationOffload | None = None

    def batch_loss(self, model: nn.Module, reference: Reference | None, lazy: LazyBatch, *,
                   counted: bool = True) -> BatchLoss:
        self.last = ActivationOffload(model.parameters(), device_type=self.device_type)
        with self.last:
            return self.objective.batch_loss(model, reference, lazy, counted=counted)


def offloading_objective(objective: Objective, enabled: bool, device: torch.device) -> Objective:
    """``objective`` with activation offloading when ``enabled`` on an accelerator; on CPU a warning (nothing to
    offload to) and ``objective`` unchanged."""
    if not enabled:
        return objective
    if device.type == "cpu":
        logger.warning("activation_offloading has no effect on CPU: activations are already in CPU memory")
        return objective
    return OffloadingObjective(objective, device.type)
