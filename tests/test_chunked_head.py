"""chunked_label_logprobs against full logits + log_softmax (float64 autograd) on the same inputs."""

from __future__ import annotations

import pytest
import torch

from preftune.chunked_head import chunked_label_logprobs

VOCAB, HIDDEN, ROWS = 32000, 64, 300


def naive_label_logprobs(hidden, weight, labels, bias=None, logit_scale=1.0, softcap=None):
    """Reference: materialise every logit, log_softmax, gather; returns (logps, mean_logits)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logps = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    return logps, logits.detach().mean(dim=-1)


def assert_close_relative(actual, expected, rtol):
    """``|a − e| ≤ rtol · (|e| + max|e|)`` elementwise.

    Relative to each entry where it is large, and to the tensor's scale where an entry is tiny: tiny
    gradient entries are sums of cancelling terms, so no float32 computation gets them to ``rtol`` of
    their own size.
    """
    expected = expected.double()
    error = (actual.double() - expected).abs()
    bound = rtol * (expected.abs() + expected.abs().max())
    worst = (error / bound).max().item() if error.numel() else 0.0
    assert worst <= 1.0, f"max error/bound ratio {worst:.3g} (rtol {rtol}, max error {error.max().item():.3g})"


def make_inputs(rows=ROWS, vocab=VOCAB, hidden_size=HIDDEN, logit_std=3.0, seed=0):
    """float32 hidden (rows, d), weight (V, d), bias (V,), labels (rows,), per-row upstream weights."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) * (logit_std / hidden_size**0.5)
    bias = torch.randn(vocab, generator=generator) * 0.5
    labels = torch.randint(vocab, (rows,), generator=generator)
    upstream = torch.rand(rows, generator=generator) * 2 - 0.5  # non-uniform, some negative
    return hidden, weight, bias, labels, upstream


def grads_of(fn, hidden, weight, bias, upstream):
    """(logps, mean_logits, grad_hidden, grad_weight, grad_bias) of Σ upstream·logps, fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    logps, mean_logits = fn(*leaves)
    grads = torch.autograd.grad((logps * upstream.to(logps.dtype)).sum(), leaves)
    return (logps.detach(), mean_logits, *grads)


@pytest.fixture(scope="module")
def big_case():
    hidden, weight, bias, labels, upstream = make_inputs()
    reference = grads_of(
        lambda h, w, b: naive_label_logprobs(h, w, labels, bias=b),
        hidden.double(),
        weight.double(),
        bias.double(),
        upstream.double(),
    )
    return hidden, weight, bias, labels, upstream, reference


@pytest.mark.parametrize("chunk_size", [1, 7, 128, 1024, 5000])
def test_logps_and_mean_logits_match_full_log_softmax_for_any_chunk_size(big_case, chunk_size):
    hidden, weight, bias, labels, _, reference = big_case
    logps, mean_logits = chunked_label_logprobs(hidden, weight, labels, bias=bias, chunk_size=chunk_size)
    assert logps.dtype == torch.float32 and mean_logits.dtype == torch.float32
    assert logps.shape == mean_logits.shape == (ROWS,)
    assert_close_relative(logps, reference[0], rtol=1e-5)
    assert_close_relative(mean_logits, reference[1], rtol=1e-5)


def test_large_logit_magnitudes_stay_accurate_relative_to_value():
    hidden, weight, _, labels, _ = make_inputs(rows=64, logit_std=40.0, seed=1)
    logps, _ = chunked_label_logprobs(hidden, weight, labels, chunk_size=16)
    expected, _ = naive_label_logprobs(hidden.double(), weight.double(), labels)
    assert expected.abs().max() > 50  # the case really has big magnitudes
    assert_close_relative(logps, expected, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [7, 128, 1024])
def test_gradients_match_autograd_through_full_logits_with_nonuniform_upstream(big_case, chunk_size):
    hidden, weight, bias, labels, upstream, reference = big_case
    actual = grads_of(
        lambda h, w, b: chunked_label_logprobs(h, w, labels, bias=b, chunk_size=chunk_size),
        hidden,
        weight,
        bias,
        upstream,
    )
    for name, got, want in zip(("hidden", "weight", "bias"), actual[2:], reference[2:]):
        assert got.dtype == torch.float32, name
        assert_close_relative(got, want, rtol=1e-5)


@pytest.mark.parametrize(
    ("logit_scale", "softcap", "use_bias"),
    [(1.0, None, False), (0.0625, None, True), (1.0, 5.0, False), (2.5, 3.0, True)],
)
def test_gradcheck_float64_with_scale_softcap_and_bias(logit_scale, softcap, use_bias):
    hidden, weight, bias, labels, upstream = (t.double() if t.is_floating_point() else t for t in make_inputs(
        rows=9, vocab=13, hidden_size=5, seed=2
    ))
    hidden.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_(use_bias)

    def weighted_logps(h, w, b):
        logps, _ = chunked_label_logprobs(
            h, w, labels, bias=b if use_bias else None, chunk_size=4, logit_scale=logit_scale, softcap=softcap
        )
        return logps * upstream

    assert torch.autograd.gradcheck(weighted_logps, (hidden, weight, bias), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(("logit_scale", "softcap"), [(0.0625, None), (1.0, 2.0), (4.0, 10.0)])
def test_logit_scale_and_softcap_values_and_grads_match_reference_at_full_vocab(logit_scale, softcap):
    hidden, weight, bias, labels, upstream = make_inputs(rows=100, seed=3)
    actual = grads_of(
        lambda h, w, b: chunked_label_logprobs(
            h, w, labels, bias=b, chunk_size=33, logit_scale=logit_scale, softcap=softcap
        ),
        hidden,
        weight,
        bias,
        upstream,
    )
    expected = grads_of(
        lambda h, w, b: naive_label_logprobs(h, w, labels, bias=b, logit_scale=logit_scale, softcap=softcap),
        hidden.double(),
        weight.double(),
        bias.double(),
        upstream.double(),
    )
    for got, want in zip(actual, expected):
        assert_close_relative(got, want, rtol=1e-5)


def test_softcap_bounds_the_mean_logit():
    hidden, weight, _, labels, _ = make_inputs(rows=20, vocab=500, logit_std=50.0, seed=4)
    _, mean_logits = chunked_label_logprobs(hidden, weight, labels, softcap=1.5)
    assert mean_logits.abs().max() < 1.5


def test_tied_weight_receives_sum_of_embedding_and_head_gradients():
    vocab, hidden_size, rows = 500, 16, 40
    generator = torch.Generator().manual_seed(5)
    embedding = torch.randn(vocab, hidden_size, generator=generator) * 0.3
    mixer = torch.randn(hidden_size, hidden_size, generator=generator) * 0.3
    input_ids = torch.randint(vocab, (rows,), generator=generator)
    labels = torch.randint(vocab, (rows,), generator=generator)
    upstream = torch.rand(rows, generator=generator)

    def tied_model_grad(head_fn, dtype):
        tied = embedding.to(dtype, copy=True).requires_grad_()
        hidden = torch.tanh(tied[input_ids] @ mixer.to(dtype))  # the embedding use, upstream of the head
        logps, _ = head_fn(hidden, tied)
        (logps * upstream.to(dtype)).sum().backward()
        return tied.grad

    got = tied_model_grad(lambda h, w: chunked_label_logprobs(h, w, labels, chunk_size=7), torch.float32)
    want = tied_model_grad(lambda h, w: naive_label_logprobs(h, w, labels), torch.float64)
    assert_close_relative(got, want, rtol=1e-5)

    head_only = tied_model_grad(lambda h, w: naive_label_logprobs(h.detach(), w, labels), torch.float64)
    embedding_rows = want - head_only
    assert embedding_rows[input_ids].abs().sum() > 0  # both paths really contribute to the sum


def test_bfloat16_inputs_give_float32_results_close_to_float32_and_bf16_grads():
    hidden, weight, bias, labels, upstream = make_inputs(rows=200, seed=6)
    hidden_bf16, weight_bf16, bias_bf16 = hidden.bfloat16(), weight.bfloat16(), bias.bfloat16()
    actual = grads_of(
        lambda h, w, b: chunked_label_logprobs(h, w, labels, bias=b, chunk_size=64),
        hidden_bf16,
        weight_bf16,
        bias_bf16,
        upstream,
    )
    assert actual[0].dtype == actual[1].dtype == torch.float32
    assert [g.dtype for g in actual[2:]] == [torch.bfloat16] * 3

    # Same bf16 values, computed in float64: the only difference is float32 accumulation.
    exact_on_bf16 = grads_of(
        lambda h, w, b: naive_label_logprobs(h, w, labels, bias=b),
        hidden_bf16.double(),
        weight_bf16.double(),
        bias_bf16.double(),
        upstream.double(),
    )
    assert_close_relative(actual[0], exact_on_bf16[0], rtol=1e-5)
    for got, want in zip(actual[2:], exact_on_bf16[2:]):
        assert_close_relative(got.double(), want.to(torch.bfloat16).double(), rtol=1e-2)

    # Against the float32 inputs themselves: within what bf16 rounding of the inputs allows.
    float32_reference = grads_of(
        lambda h, w, b: naive_label_logprobs(h, w, labels, bias=b), hidden, weight, bias, upstream
    )
    torch.testing.assert_close(actual[0], float32_reference[0], rtol=2e-2, atol=0.1)
    torch.testing.assert_close(actual[1], float32_reference[1], rtol=2e-2, atol=0.05)


def test_enclosing_bfloat16_autocast_does_not_lower_precision():
    hidden, weight, bias, labels, _ = make_inputs(rows=50, vocab=2000, seed=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, mean_logits = chunked_label_logprobs(hidden, weight, labels, bias=bias, chunk_size=16)
    expected = naive_label_logprobs(hidden.double(), weight.double(), labels, bias=bias.double())
    assert_close_relative(logps, expected[0], rtol=1e-5)
    assert_close_relative(mean_logits, expected[1], rtol=1e-5)


def test_mean_logits_are_detached_and_logps_carry_grad():
    hidden, weight, _, labels, _ = make_inputs(rows=5, vocab=50, seed=7)
    logps, mean_logits = chunked_label_logprobs(hidden.requires_grad_(), weight, labels)
    assert logps.requires_grad and not mean_logits.requires_grad


def test_frozen_weight_gets_no_gradient_and_hidden_gradient_is_still_exact():
    hidden, weight, _, labels, upstream = make_inputs(rows=30, vocab=400, seed=8)
    hidden = hidden.requires_grad_()
    logps, _ = chunked_label_logprobs(hidden, weight, labels, chunk_size=8)
    (logps * upstream).sum().backward()
    reference_hidden = hidden.detach().double().requires_grad_()
    expected, _ = naive_label_logprobs(reference_hidden, weight.double(), labels)
    (expected * upstream.double()).sum().backward()
    assert weight.grad is None
    assert_close_relative(hidden.grad, reference_hidden.grad, rtol=1e-5)


def test_no_rows_gives_empty_results_and_zero_gradients():
    hidden = torch.zeros(0, HIDDEN, requires_grad=True)
    weight = torch.randn(100, HIDDEN, requires_grad=True)
    bias = torch.randn(100, requires_grad=True)
    logps, mean_logits = chunked_label_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), bias=bias)
    assert logps.shape == mean_logits.shape == (0,)
    logps.sum().backward()
    assert hidden.grad.shape == (0, HIDDEN)
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def _largest_saved_numel(fn) -> int:
    """Largest numel among the tensors autograd saves for backward while running ``fn``."""
    sizes = [0]

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return max(sizes)


def test_backward_saves_no_rows_by_vocab_tensor():
    hidden, weight, bias, labels, _ = make_inputs(rows=ROWS, seed=9)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    full_logits = ROWS * VOCAB

    naive_saved = _largest_saved_numel(lambda: naive_label_logprobs(*leaves[:2], labels, bias=leaves[2], softcap=5.0))
    assert naive_saved >= full_logits  # the probe does see full logits when they are saved

    chunked_saved = _largest_saved_numel(
        lambda: chunked_label_logprobs(
            leaves[0], leaves[1], labels, bias=leaves[2], chunk_size=64, logit_scale=0.5, softcap=5.0
        )
    )
    assert chunked_saved < full_logits
    assert chunked_saved == max(weight.numel(), hidden.numel())  # only inputs and (N,) vectors


def test_the_kept_softmax_is_one_chunk_and_is_released_after_backward():
    """Without a softcap the forward keeps P of one (full) chunk, as (V, C), for the backward, in a ctx attribute (not a saved
    tensor, so the probe above cannot see it): held until backward, then dropped."""
    import gc
    import weakref

    hidden, weight, bias, labels, upstream = make_inputs(rows=ROWS, seed=10)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    logps, _ = chunked_label_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], chunk_size=64)
    start, kept = logps.grad_fn.kept
    assert tuple(kept.shape) == (VOCAB, 64) and start == ROWS - 64  # the last chunk, full size, vocabulary first
    expected = torch.softmax(hidden.detach()[start:] @ weight.detach().T + bias.detach(), dim=-1)
    assert torch.allclose(kept, expected.T, rtol=1e-5, atol=1e-9)
    alive = weakref.ref(kept)
    del kept
    (logps * upstream).sum().backward()
    gc.collect()
    assert logps.grad_fn.kept is None and alive() is None


def test_nothing_is_kept_without_gradients():
    hidden, weight, bias, labels, _ = make_inputs(rows=ROWS, seed=11)
    logps, _ = chunked_label_logprobs(hidden, weight, labels, bias=bias, chunk_size=64)
    assert logps.grad_fn is None
    with torch.no_grad():
        frozen, _ = chunked_label_logprobs(hidden.requires_grad_(), weight, labels, bias=bias, chunk_size=64)
    assert torch.equal(frozen, logps)


@pytest.mark.parametrize("chunk_size", [7, 64, 300, 1024])
def test_a_second_backward_with_retained_graph_gives_the_same_gradients(chunk_size):
    hidden, weight, bias, labels, upstream = make_inputs(rows=ROWS, seed=12)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    logps, _ = chunked_label_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], chunk_size=chunk_size)
    first = torch.autograd.grad((logps * upstream).sum(), leaves, retain_graph=True)  # from the kept chunk
    second = torch.autograd.grad((logps * upstream).sum(), leaves)  # every chunk recomputed
    for kept_path, recomputed in zip(first, second):
        assert_close_relative(kept_path, recomputed, rtol=1e-5)


@pytest.mark.parametrize("rows, chunk_size", [(0, 4), (3, 4), (4, 4), (9, 4), (1000, 1024), (2049, 1024)])
def test_chunk_bounds_cover_every_row_once_with_a_full_last_chunk(rows, chunk_size):
    from preftune.chunked_head import _chunk_bounds

    bounds = _chunk_bounds(rows, chunk_size)
    covered = [row for start, stop in bounds for row in range(start, stop)]
    assert covered == list(range(rows))
    assert all(0 < stop - start <= chunk_size for start, stop in bounds)
    if rows:
        assert bounds[-1][1] - bounds[-1][0] == min(rows, chunk_size)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": torch.tensor([0, 100, 3])}, r"labels must lie in \[0, 100\)"),
        ({"labels": torch.tensor([0, -100, 3])}, "-100"),
        ({"labels": torch.tensor([0, 1])}, r"labels of shape \(3,\)"),
        ({"weight": torch.randn(100, 5)}, "hidden size 4"),
        ({"bias": torch.randn(99)}, r"bias of shape \(100,\)"),
        ({"chunk_size": 0}, "chunk_size must be a positive integer"),
        ({"softcap": 0.0}, "softcap must be positive"),
    ],
)
def test_bad_arguments_raise_value_error_saying_what_was_expected(kwargs, message):
    arguments = {"hidden": torch.randn(3, 4), "weight": torch.randn(100, 4), "labels": torch.tensor([0, 1, 2])}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        chunked_label_logprobs(**arguments)
