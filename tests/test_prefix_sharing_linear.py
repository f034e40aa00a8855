"""Prefix sharing through ``preftune.shared_prefix_attention``: the plain layout's numbers, with no T x T tensor.

The oracle is the plain layout (``collate_pairs``: one padded row per completion, transformers' own causal sdpa
attention): log-probs, a loss weighing every sequence differently and its gradients must match it at fp32
tolerances, at several lengths, with padding, with several negatives, padding-free, under LoRA, for the reference
(adapters disabled) and with gradient checkpointing. The attention function itself (both its CPU path of merged key
blocks and its replaying path) is checked against a naive masked softmax in float64. Memory: every tensor an aten op
creates during the shared forward + backward is counted, and none may hold T x T elements (the dense-mask layout
does, which the same check shows); and what a shared step keeps for its backward must not exceed the plain step's.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from preftune.data.collate import collate_pairs, collate_shared_prefix, dense_shared_prefix_mask
from preftune.logprobs import completion_logprobs
from preftune.reference import AdapterDisabledReference
import preftune.shared_prefix_attention as shared_attention_module
from preftune.shared_prefix_attention import (
    SHARED_PREFIX_ATTENTION,
    SharedPrefixLayout,
    shared_prefix_attention,
    supports_shared_prefix_attention,
)

VOCAB = 97
CONFIGS = {"qwen2": Qwen2Config, "llama": LlamaConfig}
CONFIG_CLASSES = {**CONFIGS, "mistral": MistralConfig}


def tiny_model(model_type: str = "qwen2", seed: int = 0, attention: str = "sdpa", **overrides):
    config = CONFIG_CLASSES[model_type](
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False, **overrides,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()


def random_examples(lengths: list[tuple[int, ...]], seed: int = 0) -> list[dict]:
    """One example per ``(prompt, completion 0, completion 1, …)`` lengths; one negative is a flat list."""
    generator = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(3, VOCAB, (n,), generator=generator).tolist()  # noqa: E731
    examples = []
    for row, (prompt, chosen, *negatives) in enumerate(lengths):
        rejected = draw(negatives[0]) if len(negatives) == 1 else [draw(n) for n in negatives]
        examples.append({"prompt_ids": draw(prompt), "chosen_ids": draw(chosen), "rejected_ids": rejected, "row": row})
    return examples


def logps_loss_and_grads(model, batch):
    """``(K, B)`` log-probs, a loss weighing each completion differently (a mixed-up plan cannot cancel out) and
    the gradient of every trainable parameter."""
    model.zero_grad(set_to_none=True)
    logps = completion_logprobs(model, batch).logps
    weights = torch.linspace(0.5, 1.5, logps.numel()).view_as(logps)
    loss = (logps * weights).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), loss.detach(), grads


def assert_same_as_plain(model, examples, shared_batch=None):
    expected = logps_loss_and_grads(model, collate_pairs(examples, pad_token_id=0))
    actual = logps_loss_and_grads(model, shared_batch or collate_shared_prefix(examples, pad_token_id=0))
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-5, atol=1e-5)
    assert actual[2].keys() == expected[2].keys() and expected[2]
    for name, grad in actual[2].items():
        torch.testing.assert_close(grad, expected[2][name], rtol=1e-4, atol=1e-6, msg=name)


LENGTHS = {
    "one pair": [(7, 5, 6)],
    "long prompt": [(150, 10, 12)],
    "long completions": [(3, 140, 120)],
    "padded rows of different lengths": [(9, 4, 11), (2, 20, 1), (30, 6, 6)],
}


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@pytest.mark.parametrize("case", sorted(LENGTHS))
def test_shared_rows_give_the_plain_layouts_logprobs_loss_and_gradients(model_type, case):
    model = tiny_model(model_type, seed=1)
    assert_same_as_plain(model, random_examples(LENGTHS[case], seed=2))
    assert model.config._attn_implementation == SHARED_PREFIX_ATTENTION  # the forward went through it


def test_shared_rows_under_bf16_autocast_run_and_stay_close_to_the_plain_layout():
    """Under autocast rotary embeddings hand the attention float32 queries and keys beside bf16 values; the merged
    key blocks must take them as ``scaled_dot_product_attention`` does (one low-precision dtype), not fail."""
    model = tiny_model("qwen2", seed=1)
    examples = random_examples(LENGTHS["padded rows of different lengths"], seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = logps_loss_and_grads(model, collate_pairs(examples, pad_token_id=0))
        shared = logps_loss_and_grads(model, collate_shared_prefix(examples, pad_token_id=0))
    torch.testing.assert_close(shared[0], plain[0], rtol=0.02, atol=0.05)
    assert shared[2].keys() == plain[2].keys() and all(grad.isfinite().all() for grad in shared[2].values())


def test_several_negatives_each_see_only_the_prompt_and_themselves():
    examples = random_examples([(8, 5, 9, 3, 7), (3, 12, 2, 6, 4)], seed=3)  # K = 4 completions per example
    assert_same_as_plain(tiny_model(seed=4), examples)


def test_padding_free_shared_rows_equal_the_plain_layout():
    examples = random_examples([(9, 4, 11), (2, 20, 1)], seed=5)
    assert_same_as_plain(tiny_model(seed=6), examples, collate_shared_prefix(examples, pad_token_id=0).without_padding())


def test_rows_padded_to_a_multiple_equal_the_plain_layout():
    examples = random_examples([(5, 4, 6), (2, 3, 1)], seed=7)
    shared = collate_shared_prefix(examples, pad_token_id=0, pad_to_multiple_of=64)
    assert shared.input_ids.shape[1] == 64
    assert_same_as_plain(tiny_model(seed=8), examples, shared)


def test_gradient_checkpointing_recomputes_the_same_shared_attention():
    model = tiny_model(seed=9).train()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same_as_plain(model, random_examples([(6, 8, 5), (11, 2, 9)], seed=10))


def test_lora_adapters_and_the_adapter_disabled_reference_equal_the_plain_layout():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(seed=11), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():  # non-zero B so the adapters change the attention
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    examples = random_examples([(7, 9, 4), (3, 5, 12)], seed=12)
    assert_same_as_plain(model, examples)
    reference = AdapterDisabledReference(model)
    with torch.no_grad():
        expected = reference.completion_logps(collate_pairs(examples, pad_token_id=0))
        actual = reference.completion_logps(collate_shared_prefix(examples, pad_token_id=0))
        with_adapters = completion_logprobs(model, collate_pairs(examples, pad_token_id=0)).logps
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, with_adapters)  # the reference really ran without the adapters


class LargestTensor(TorchDispatchMode):
    """Records the largest element count of any tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


def largest_tensor_of_a_step(model, batch) -> int:
    with LargestTensor() as record:
        logps_loss_and_grads(model, batch)
    return record.largest


def test_no_tensor_of_t_squared_elements_exists_in_a_shared_forward_and_backward():
    examples = random_examples([(40, 200, 180)], seed=13)
    batch = collate_shared_prefix(examples, pad_token_id=0)
    length = batch.input_ids.shape[1]  # 420: T² = 176,400 elements, above every activation and weight here
    assert largest_tensor_of_a_step(tiny_model(seed=14), batch) < length * length
    dense = tiny_model(seed=14, attention="eager")  # no shared-prefix attention: the dense mask, T² by construction
    assert largest_tensor_of_a_step(dense, batch) >= length * length


def test_models_without_the_shared_attention_fall_back_to_the_dense_mask_exactly():
    eager = tiny_model(seed=15, attention="eager")
    sliding = tiny_model("mistral", seed=15, sliding_window=16)
    assert not supports_shared_prefix_attention(eager) and not supports_shared_prefix_attention(sliding)
    examples = random_examples([(9, 12, 20)], seed=16)
    assert_same_as_plain(eager, examples)
    assert eager.config._attn_implementation == "eager"  # never switched


def test_dense_fallback_mask_hides_chosen_from_rejected():
    mask = dense_shared_prefix_mask(torch.tensor([[2, 2, 1]]), 6)[0, 0]
    expected = torch.tensor([  # prompt 0-1, chosen 2-3, rejected 4, padding 5 (sees itself only)
        [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_the_attention_refuses_a_layout_with_a_mask_or_a_short_sliding_window():
    query = key = value = torch.zeros(1, 2, 6, 4)
    layout = SharedPrefixLayout((2,), ((2, 2),))
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="no attention mask"):
        shared_prefix_attention(module, query, key, value, torch.ones(1, 1, 6, 6, dtype=torch.bool), shared_prefix_layout=layout)
    with pytest.raises(ValueError, match="sliding window"):
        shared_prefix_attention(module, query, key, value, None, shared_prefix_layout=layout, sliding_window=4)
    with pytest.raises(ValueError, match="does not fit"):
        shared_prefix_attention(module, query, key, value, None, shared_prefix_layout=SharedPrefixLayout((5,), ((2, 2),)))


def naive_shared_attention(query, key, value, layout, scale):
    """``(R, T, H, d)`` attention by the definition: each row's visibility matrix written out from its lengths
    (prompt: causal; completion k: the prompt and its own earlier tokens), a masked softmax, zeros on padding."""
    rows, heads, length, _ = query.shape
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    visible = torch.zeros(rows, length, length, dtype=torch.bool)
    for row in range(rows):
        prompt = layout.prompt_lengths[row]
        piece_of = [0] * prompt  # 0 for the prompt, k + 1 for completion k
        for k, n in enumerate(layout.completion_lengths[row]):
            piece_of += [k + 1] * n
        for i, piece_i in enumerate(piece_of):
            for j in range(i + 1):
                visible[row, i, j] = piece_of[j] in (0, piece_i)
    scores = (query @ key.transpose(-1, -2) * scale).masked_fill(~visible[:, None], float("-inf"))
    real = visible.any(-1)[:, None, :, None]  # padding queries see nothing: output zero
    weights = torch.where(real, scores, 0.0).softmax(-1) * real
    return (weights @ value).transpose(1, 2)


ATTENTION_LAYOUTS = {
    "one row": SharedPrefixLayout((5,), ((4, 6),)),
    "padded rows, several negatives": SharedPrefixLayout((3, 7), ((2, 5, 1, 4), (6, 1, 3, 0))),
    "no prompt": SharedPrefixLayout((0,), ((5, 3),)),
    "long pieces": SharedPrefixLayout((40, 9), ((70, 55), (30, 80))),
}


@pytest.mark.parametrize("path", ["merged key blocks", "replayed prompt"])
@pytest.mark.parametrize("case", sorted(ATTENTION_LAYOUTS))
def test_shared_attention_and_its_gradients_equal_a_naive_masked_softmax(monkeypatch, path, case):
    if path == "replayed prompt":  # the path off CPU and with attention dropout
        monkeypatch.setattr(shared_attention_module, "merged_blocks_apply", lambda query, dropout: False)
    layout = ATTENTION_LAYOUTS[case]
    rows = len(layout.prompt_lengths)
    length = max(layout.real_length(row) for row in range(rows)) + 3  # and padding
    generator = torch.Generator().manual_seed(21)
    def draw(heads):  # (rows, heads, length, 8) over (rows, length, heads, 8) memory, as the model's projections
        return torch.randn(rows, length, heads, 8, generator=generator, dtype=torch.float64).transpose(1, 2)

    query, key, value = (draw(h).requires_grad_() for h in (4, 2, 2))  # 4 query heads on 2 key/value heads
    upstream = torch.randn(rows, length, 4, 8, generator=generator, dtype=torch.float64)
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    actual, _ = shared_prefix_attention(module, query, key, value, None, scaling=0.3, shared_prefix_layout=layout)
    actual_grads = torch.autograd.grad((actual * upstream).sum(), (query, key, value))
    expected = naive_shared_attention(query, key, value, layout, 0.3)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (query, key, value))
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)
    for name, got, want in zip("qkv", actual_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=name)


def test_model_forwards_on_cpu_take_the_merged_key_blocks(monkeypatch):
    decisions = []
    decide = shared_attention_module.merged_blocks_apply
    record = lambda query, dropout: decisions.append(decide(query, dropout)) or decisions[-1]  # noqa: E731
    monkeypatch.setattr(shared_attention_module, "merged_blocks_apply", record)
    assert_same_as_plain(tiny_model(seed=22), random_examples([(6, 9, 4, 7)], seed=23))
    assert decisions and all(decisions)  # every layer of the forward (and none fell back to replaying)


def storage_bytes_kept_for_backward(model, batch=None, **inputs) -> int:
    """Bytes of every distinct storage autograd saves during one forward (of ``batch`` through
    ``completion_logprobs``, or of the model on ``inputs``), parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        if batch is not None:
            result = completion_logprobs(model, batch).logps
        else:
            result = model(**inputs, use_cache=False).logits
    del result
    return sum(kept.values())


@pytest.mark.parametrize("lengths", [(8, 300, 280), (300, 20, 24), (10, 150, 140, 160)])
def test_a_shared_row_keeps_for_its_backward_what_one_causal_row_of_its_length_keeps(lengths):
    """What sdpa keeps (queries, keys, values, output, log-sum-exp) and no more: no joined copies of the prompt's
    keys, no replayed outputs. (A plain step keeps more: its K rows together are longer than the shared row.)"""
    model = tiny_model(seed=24).train()
    batch = collate_shared_prefix(random_examples([lengths], seed=25), pad_token_id=0)
    ones = torch.ones_like(batch.input_ids)
    causal = storage_bytes_kept_for_backward(model, input_ids=batch.input_ids, attention_mask=ones)
    layout = SharedPrefixLayout.from_segments(batch.segments)
    model.set_attn_implementation(SHARED_PREFIX_ATTENTION)
    shared = storage_bytes_kept_for_backward(model, input_ids=batch.input_ids, attention_mask=ones,
                                             position_ids=batch.position_ids, shared_prefix_layout=layout)
    assert shared <= causal


# --- the auto choice (preftune.layout) ---------------------------------------------------------------------------

from preftune.batches import BatchMaker  # noqa: E402
from preftune.layout import collate_auto, layout_work, shared_prefix_pays  # noqa: E402


def test_layout_work_counts_padded_rows_of_each_layout():
    examples = random_examples([(10, 5, 7), (3, 20, 2)])
    # plain: 4 rows padded to max(15, 17, 23, 5) = 23; shared: 2 rows padded to max(22, 25) = 25
    assert layout_work(examples) == (4 * 23, 2 * 25)


def test_auto_shares_whenever_shared_rows_do_less_work_and_keeps_plain_rows_otherwise():
    assert shared_prefix_pays(random_examples([(2000, 100, 120)]))
    tiny_prompts = random_examples([(5, 8, 8)] * 16)  # saves 80 tokens of 416 for 32 completions: pays
    assert layout_work(tiny_prompts) == (32 * 13, 16 * 21) and shared_prefix_pays(tiny_prompts)
    one_token_prompts = random_examples([(1, 30, 30)] * 8)  # saves 8 tokens of 496 for 16 completions: does not
    assert layout_work(one_token_prompts) == (16 * 31, 8 * 61) and not shared_prefix_pays(one_token_prompts)
    assert not shared_prefix_pays(random_examples([(0, 30, 30)] * 8))  # nothing to share: the same work
    # with the dense mask (no shared-prefix attention) 80 tokens do not pay for 32 masked completions
    assert not shared_prefix_pays(tiny_prompts, shared_attention=False)


def test_batches_the_auto_choice_shares_keep_less_for_their_backward_than_plain_rows():
    model = tiny_model(seed=26).train()
    for lengths in ([(6, 30, 30)] * 4, [(3, 200, 10), (40, 5, 150)], [(1, 60, 50, 40, 70)], [(90, 8, 9)]):
        examples = random_examples(lengths, seed=27)
        assert shared_prefix_pays(examples)
        plain = storage_bytes_kept_for_backward(model, collate_pairs(examples, pad_token_id=0))
        shared = storage_bytes_kept_for_backward(model, collate_shared_prefix(examples, pad_token_id=0))
        assert shared <= plain, lengths


def test_auto_without_the_shared_attention_refuses_a_dense_mask_growing_past_its_limit():
    long_rows = random_examples([(3000, 800, 800)])  # 4600² elements > 2^24
    assert shared_prefix_pays(long_rows) and not shared_prefix_pays(long_rows, shared_attention=False)
    assert shared_prefix_pays(random_examples([(900, 100, 100)]), shared_attention=False)


def test_auto_collate_gives_the_plain_layouts_numbers_either_way():
    model = tiny_model(seed=17)
    for examples in (random_examples([(120, 9, 14)], seed=18), random_examples([(0, 6, 6)] * 3, seed=19)):
        batch = collate_auto(examples, pad_token_id=0)
        assert (batch.segments is not None) == shared_prefix_pays(examples)
        assert_same_as_plain(model, examples, batch)


def test_batch_maker_with_auto_prefix_sharing_decides_per_batch():
    import datasets

    rows = random_examples([(300, 10, 12), (0, 5, 5), (0, 4, 5)], seed=20)  # rows 1, 2: nothing to share
    dataset = datasets.Dataset.from_list(rows)
    make = BatchMaker(pad_token_id=0, prefix_sharing=None, padding_free=False)
    assert make(dataset, [0]).collate().segments is not None
    assert make(dataset, [1, 2]).collate().segments is None
