"""The loss of one micro-batch: log-probs of policy and reference, then the loss function, its metric sums and
rewards. One interface, ``Objective.batch_loss(model, reference, lazy, counted=...)``, with one implementation per
kind of data: ``PairObjective`` (pairs, or one chosen and several rejected: the DPO family) and
``UnpairedObjective`` (KTO's unpaired completions). The training loop and evaluation call it for every micro-batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch
from accelerate import Accelerator
from torch import nn

from preftune.batches import LazyBatch
from preftune.config import DPOConfig
from preftune.logprobs import completion_logprobs, pair_logprobs
from preftune.losses import LossInputs, LossParams, compute_preference_loss, kto_kl_estimate, kto_loss, kto_sft_loss
from preftune.metrics import pair_metric_sums, unpaired_metric_sums
from preftune.reference import Reference


class BatchLoss(NamedTuple):
    """One micro-batch's result: per-example loss ``(B,)``, its metric sums, and the per-example rewards of each
    completion ``(B, K)`` (chosen first; detached) for ``compute_metrics`` (None for unpaired data)."""

    losses: torch.Tensor
    sums: dict[str, float]
    rewards: torch.Tensor | None = None


class Objective(Protocol):
    def batch_loss(self, model: nn.Module, reference: Reference | None, lazy: LazyBatch, *,
                   counted: bool = True) -> BatchLoss:
        """Per-example loss of ``lazy`` under ``model`` against ``reference``. ``counted`` False: a weight-0 stand-in
        (``Parallelism.share``), left out of anything the processes average."""


def logprob_options(args: DPOConfig, holds_whole_output_layer: bool) -> dict[str, Any]:
    """The keyword options of every log-prob call of a run (policy, reference, precomputation)."""
    return {  # without the whole output weight (ZeRO-3) the model's own forward projects, not the chunked head
        "chunked_head": args.chunked_lm_head and holds_whole_output_layer,
        "chunk_size": args.lm_head_chunk_size,
        "max_chunk_bytes": None if args.lm_head_chunk_mib is None else args.lm_head_chunk_mib << 20,
        "ld_alpha": args.ld_alpha,
    }


class PairObjective:
    """The DPO family on pairs (and several negatives): ``compute_preference_loss`` of policy and reference
    log-probs, plus ``router_aux_loss_coef`` x the MoE load-balancing loss of the policy's forward."""

    def __init__(self, params: LossParams, accelerator: Accelerator, options: dict[str, Any],
                 router_aux_loss_coef: float = 0.0) -> None:
        self.params, self.accelerator, self.options = params, accelerator, options
        self.router_aux_loss_coef = router_aux_loss_coef

    def batch_loss(self, model: nn.Module, reference: Reference | None, lazy: LazyBatch, *,
                   counted: bool = True) -> BatchLoss:
        batch = lazy.collate().to(self.accelerator.device)
        ref_chosen = ref_rejected = None
        if reference is not None:  # first: the policy's head keeps a softmax chunk until its backward
            with self.accelerator.autocast():
                ref_chosen, ref_rejected = reference.logps(batch, **self.options)
        policy = pair_logprobs(model, batch, **self.options, wpo=self.params.use_weighting,
                               router_aux_loss=self.router_aux_loss_coef != 0.0)
        out = compute_preference_loss(
            self.params,
            LossInputs(
                policy_chosen_logps=policy.chosen_logps,
                policy_rejected_logps=policy.rejected_logps,
                ref_chosen_logps=ref_chosen,
                ref_rejected_logps=ref_rejected,
                chosen_lengths=policy.chosen_lengths,
                rejected_lengths=policy.rejected_lengths,
                chosen_wpo_logps=policy.chosen_wpo_logps,
                rejected_wpo_logps=policy.rejected_wpo_logps,
            ),
        )
        losses = out.per_example
        if policy.aux_loss is not None:  # MoE: + coef x the forward's load-balancing loss (TRL adds it to the mean)
            losses = losses + self.router_aux_loss_coef * policy.aux_loss
        sums = pair_metric_sums(
            losses, policy, out.chosen_rewards, out.rejected_rewards, nll=out.nll, components=out.components,
            aux_loss=policy.aux_loss,
        )
        rejected = out.rejected_rewards if out.rejected_rewards.dim() == 2 else out.rejected_rewards.unsqueeze(1)
        rewards = torch.cat([out.chosen_rewards.unsqueeze(1), rejected], dim=1).detach()
        return BatchLoss(losses, sums, rewards)


class UnpairedObjective:
    """KTO: completions scored with gradients; the reference point z, without, from the mismatched completion each
    row carries (``preftune.data.kto``): the micro-batch's mean KL log-ratio, in training averaged over the
    processes' concurrent micro-batches (as TRL; a stand-in's is not ``counted``), clamped at 0."""

    def __init__(self, params: LossParams, accelerator: Accelerator, options: dict[str, Any], max_length: int,
                 router_aux_loss_coef: float = 0.0) -> None:
        self.params, self.accelerator, self.options = params, accelerator, options
        self.max_length, self.router_aux_loss_coef = max_length, router_aux_loss_coef

    def batch_loss(self, model: nn.Module, reference: Reference | None, lazy: LazyBatch, *,
                   counted: bool = True) -> BatchLoss:
        device, options, params = self.accelerator.device, self.options, self.params
        batch = lazy.collate().to(device)
        kl_batch = lazy.collate_mismatched(self.max_length).to(device)
        policy = completion_logprobs(model, batch, **options, router_aux_loss=self.router_aux_loss_coef != 0.0)
        with torch.no_grad():
            policy_kl = completion_logprobs(model, kl_batch, **options).logps[0]
        with self.accelerator.autocast():
            ref = reference.completion_logps(batch, **options)[0]
            ref_kl = reference.completion_logps(kl_batch, **options)[0]
        kl_logratios = (policy_kl - ref_kl).detach()
        if self.accelerator.num_processes > 1 and model.training:  # every process gets here at each micro-batch
            kl_logratios = self._kl_means_of_processes(kl_logratios, counted=counted)
        kl = kto_kl_estimate(kl_logratios)
        logps = policy.logps[0]
        losses = kto_loss(
            logps, ref, kl, batch.labels, beta=params.beta,
            desirable_weight=params.desirable_weight, undesirable_weight=params.undesirable_weight,
        )
        if params.rpo_alpha is not None:  # LLaMA-Factory's pref_ftx with KTO
            losses = losses + kto_sft_loss(logps / policy.lengths[0].clamp(min=1), batch.labels, params.rpo_alpha)
        if policy.aux_loss is not None:  # MoE, as for pairs
            losses = losses + self.router_aux_loss_coef * policy.aux_loss
        rewards = params.beta * (logps.detach() - ref)
        return BatchLoss(losses, unpaired_metric_sums(losses, logps, rewards, batch.labels, kl, aux_loss=policy.aux_loss))

    def _kl_means_of_processes(self, kl_logratios: torch.Tensor, *, counted: bool) -> torch.Tensor:
        """``(P,)`` the mean KL log-ratio of each process's current micro-batch, stand-ins left out (a collective)."""
        mine = torch.stack([kl_logratios.float().mean(), torch.tensor(float(counted), device=kl_logratios.device)])
        gathered = self.accelerator.gather(mine[None])
        return gathered[gathered[:, 1] > 0, 0]


def build_objective(args: DPOConfig, params: LossParams, accelerator: Accelerator, options: dict[str, Any],
                    router_aux_loss_coef: float) -> Objective:
    """The objective for the loss's kind of data (``params.is_unpaired``: KTO)."""
    if params.is_unpaired:
        return UnpairedObjective(params, accelerator, options, args.max_length, router_aux_loss_coef)
    return PairObjective(params, accelerator, options, router_aux_loss_coef)
