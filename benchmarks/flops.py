"""Useful FLOPs of DPO optimizer steps: the arithmetic a step cannot avoid, from real (non-pad) tokens only.

For one step over sequences i (2B of them: prompt+chosen and prompt+rejected of B pairs) with T_i real tokens,
T = Σ T_i, and T_c = Σ completion tokens (the positions whose log-probs are scored):

    useful FLOPs = k · ( 2·N_body·T  +  2·d·V·T_c  +  2·L·d_attn·Σ T_i² )

- 2·N_body·T: a forward pass of the transformer body, N_body = the 2-D weights other than the embeddings
  (2 FLOPs per weight per token);
- 2·d·V·T_c: the LM head, on the positions that predict a completion token (prompt logits are not needed);
- 2·L·d_attn·Σ T_i²: causal attention scores Q·Kᵀ and the weighted sum A·V, each T_i²/2 · d_attn multiply-adds
  per layer (only the lower triangle is useful);
- k = 4 with a reference forward inside the step (policy forward + backward = 3 forwards, reference = 1);
  k = 3 when the reference log-probs were precomputed before training (TRL ``precompute_ref_log_probs``).

Not counted: embeddings, norms, activations, softmax, the loss, padding, prompt-position logits, the optimizer.
"""

from __future__ import annotations

from typing import Iterable, Sequence

FORMULA = "k·(2·N_body·T + 2·d·V·T_completion + 2·L·d_attn·ΣT_i²), k = 4 (policy fwd+bwd, reference fwd) or 3 (reference precomputed)"


def sequence_lengths(pair_lengths: Iterable[Sequence[int]]) -> tuple[list[int], int]:
    """The 2B sequence lengths (prompt+chosen, prompt+rejected) of pairs ``[prompt, chosen, rejected]`` and the
    completion token total."""
    lengths, completion = [], 0
    for prompt, chosen, rejected in pair_lengths:
        lengths += [prompt + chosen, prompt + rejected]
        completion += chosen + rejected
    return lengths, completion


def step_flops(model: dict, pair_lengths: Iterable[Sequence[int]], *, reference_in_step: bool) -> float:
    """Useful FLOPs of one optimizer step over the given pairs (see the module docstring).

    ``model`` holds ``body_matmul_parameters``, ``hidden_size``, ``vocab_size``, ``num_layers``, ``attention_width``.
    """
    lengths, completion = sequence_lengths(pair_lengths)
    forward = (
        2.0 * model["body_matmul_parameters"] * sum(lengths)
        + 2.0 * model["hidden_size"] * model["vocab_size"] * completion
        + 2.0 * model["num_layers"] * model["attention_width"] * sum(t * t for t in lengths)
    )
    return (4.0 if reference_in_step else 3.0) * forward
