"""Activation memory for long pairs: gradient checkpointing in every layout, activation offloading, and LM-head
chunks within a memory budget.

Oracles: the same model without checkpointing / offloading (log-probs, a loss weighing every completion differently
and every parameter gradient, 1e-5), autograd through full log-softmax logits for the chunk budget, and simple
formulas for what checkpointing and offloading must keep (layers x rows x length x hidden floats).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from preftune import chunked_head
from preftune.activation_offload import ActivationOffload, OffloadingObjective, offloading_objective
from preftune.chunked_head import chunked_label_logprobs, rows_per_chunk
from preftune.config import DPOConfig
from preftune.data.collate import collate_pairs, collate_shared_prefix
from preftune.logprobs import completion_logprobs, token_logps
from preftune.model_setup import enable_activation_checkpointing
from preftune.objective import logprob_options
from preftune.reference import AdapterDisabledReference, build_reference

VOCAB, HIDDEN, LAYERS = 97, 32, 3
CONFIGS = {"qwen2": Qwen2Config, "llama": LlamaConfig}
LAYOUTS = {
    "plain": collate_pairs,
    "shared_prefix": collate_shared_prefix,
    "plain_padding_free": lambda examples, **kw: collate_pairs(examples, **kw).without_padding(),
    "shared_prefix_padding_free": lambda examples, **kw: collate_shared_prefix(examples, **kw).without_padding(),
}
LENGTHS = [(9, 4, 11), (2, 20, 1), (30, 6, 6)]


def tiny_model(model_type: str = "qwen2", seed: int = 0, vocab: int = VOCAB):
    config = CONFIGS[model_type](
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()


def random_examples(lengths=LENGTHS, seed: int = 0, vocab: int = VOCAB) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(3, vocab, (n,), generator=generator).tolist()  # noqa: E731
    return [{"prompt_ids": draw(p), "chosen_ids": draw(c), "rejected_ids": draw(r), "row": i}
            for i, (p, c, r) in enumerate(lengths)]


def logps_loss_and_grads(model, batch, **options):
    model.zero_grad(set_to_none=True)
    logps = completion_logprobs(model, batch, **options).logps
    loss = (logps * torch.linspace(0.5, 1.5, logps.numel()).view_as(logps)).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), loss.detach(), grads


def assert_same(actual, expected):
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-5, atol=1e-5)
    assert expected[2] and actual[2].keys() == expected[2].keys()
    for name, grad in actual[2].items():
        torch.testing.assert_close(grad, expected[2][name], rtol=1e-5, atol=1e-6, msg=name)


def count_checkpoint_calls(model) -> list[int]:
    """Wrap every decoder layer's checkpoint function with a counter; returns the (live) count."""
    calls = [0]
    for layer in model.modules():
        original = getattr(layer, "_gradient_checkpointing_func", None)
        if original is not None and getattr(layer, "gradient_checkpointing", False):
            def counted(*args, _original=original, **kwargs):
                calls[0] += 1
                return _original(*args, **kwargs)

            layer._gradient_checkpointing_func = counted
    return calls


# ------------------------------------------------------------------------------------------ gradient checkpointing
@pytest.mark.parametrize("model_type, use_reentrant", [("qwen2", False), ("qwen2", True), ("llama", False)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_checkpointed_policy_gives_the_same_logps_loss_and_gradients_in_every_layout(layout, model_type, use_reentrant):
    model = tiny_model(model_type, seed=1)
    checkpointed = copy.deepcopy(model)
    enable_activation_checkpointing(checkpointed, {"use_reentrant": use_reentrant})
    calls = count_checkpoint_calls(checkpointed)
    batch = LAYOUTS[layout](random_examples(seed=2), pad_token_id=0)
    expected = logps_loss_and_grads(model, batch)
    actual = logps_loss_and_grads(checkpointed, batch)
    assert_same(actual, expected)
    assert calls[0] >= LAYERS  # every layer really went through the checkpoint function


def test_checkpointing_with_a_small_chunked_head_and_tied_embeddings_is_exact():
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    checkpointed = copy.deepcopy(model)
    enable_activation_checkpointing(checkpointed, None)
    batch = collate_shared_prefix(random_examples(seed=4), pad_token_id=0)
    options = {"chunked_head": True, "chunk_size": 5}
    assert_same(logps_loss_and_grads(checkpointed, batch, **options), logps_loss_and_grads(model, batch, **options))


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("layout", ["plain", "shared_prefix_padding_free"])
def test_lora_with_checkpointing_trains_the_adapters_exactly_and_the_reference_is_not_checkpointed(layout, use_reentrant):
    peft = pytest.importorskip("peft")
    base = tiny_model(seed=5)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():  # non-zero B so the adapters change the forward
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    checkpointed = copy.deepcopy(model)
    enable_activation_checkpointing(checkpointed, {"use_reentrant": use_reentrant})
    calls = count_checkpoint_calls(checkpointed)
    batch = LAYOUTS[layout](random_examples(seed=6), pad_token_id=0)
    expected, actual = logps_loss_and_grads(model, batch), logps_loss_and_grads(checkpointed, batch)
    assert_same(actual, expected)
    assert any("lora_A" in name for name in actual[2]) and not any("lora" not in name for name in actual[2])
    calls[0] = 0
    reference = AdapterDisabledReference(checkpointed)
    with torch.no_grad():
        reference_logps = reference.completion_logps(batch)
    assert calls[0] == 0  # a forward without gradients runs the layers as they are
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(reference_logps, completion_logprobs(model, batch).logps, rtol=1e-5, atol=1e-5)


def test_a_separate_reference_model_is_left_unwrapped():
    policy = tiny_model(seed=7)
    reference = build_reference(policy, None)  # a frozen copy of the policy as loaded
    enable_activation_checkpointing(policy, None)
    layers = [m for m in reference.model.modules() if hasattr(m, "gradient_checkpointing")]
    assert layers and not any(m.gradient_checkpointing for m in layers)
    assert all(m.gradient_checkpointing for m in policy.modules() if type(m).__name__.endswith("DecoderLayer"))


class SavedBytes(saved_tensors_hooks):
    """Counts the bytes of every tensor autograd saves for the backward (parameters excluded)."""

    def __init__(self, model) -> None:
        parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.bytes = 0

        def pack(tensor):
            if tensor.untyped_storage().data_ptr() not in parameters:
                self.bytes += tensor.element_size() * tensor.nelement()
            return tensor

        super().__init__(pack, lambda tensor: tensor)

    def __enter__(self) -> "SavedBytes":
        super().__enter__()
        return self


@pytest.mark.parametrize("layout", ["plain", "shared_prefix"])
def test_checkpointing_saves_only_each_layers_input_during_the_forward(layout):
    model = tiny_model(seed=8)
    checkpointed = copy.deepcopy(model)
    enable_activation_checkpointing(checkpointed, {"use_reentrant": False})
    batch = LAYOUTS[layout](random_examples([(60, 40, 50), (30, 70, 20)], seed=9), pad_token_id=0)
    saved = {}
    for name, candidate in (("plain", model), ("checkpointed", checkpointed)):
        with SavedBytes(candidate) as counter:
            completion_logprobs(candidate, batch).logps.sum()
        saved[name] = counter.bytes
    layer_inputs = LAYERS * batch.input_ids.numel() * HIDDEN * 4  # one float32 hidden state per layer and token
    assert saved["checkpointed"] >= layer_inputs
    assert saved["checkpointed"] < saved["plain"] / 4
    assert saved["checkpointed"] < 3 * layer_inputs  # + embeddings, final norm and the head's selected rows


# ---------------------------------------------------------------------------------------------- activation offload
def test_offloaded_activations_give_the_same_gradients_and_no_parameter_moves():
    model = tiny_model(seed=10)
    batch = collate_shared_prefix(random_examples(seed=11), pad_token_id=0)
    expected = logps_loss_and_grads(model, batch)
    offload = ActivationOffload(model.parameters(), device_type="cpu")  # on CPU the "host copy" is a fresh tensor
    moved = []
    pack = offload._pack

    def recording_pack(tensor):
        packed = pack(tensor)
        if packed is not tensor:
            moved.append(tensor.untyped_storage().data_ptr())
        return packed

    offload.pack_hook = recording_pack
    model.zero_grad(set_to_none=True)
    with offload:
        logps = completion_logprobs(model, batch).logps
    loss = (logps * torch.linspace(0.5, 1.5, logps.numel()).view_as(logps)).sum()
    loss.backward()
    actual = (logps.detach(), loss.detach(),
              {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert_same(actual, expected)
    assert offload.offloaded_count > 0 and offload.restored_count >= offload.offloaded_count
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert moved and not parameter_storages.intersection(moved)


def test_offloading_with_checkpointing_moves_at_least_every_layers_input():
    model = tiny_model(seed=12)
    expected = logps_loss_and_grads(model, collate_pairs(random_examples(seed=13), pad_token_id=0))
    enable_activation_checkpointing(model, {"use_reentrant": False})
    batch = collate_pairs(random_examples(seed=13), pad_token_id=0)
    model.zero_grad(set_to_none=True)
    with ActivationOffload(model.parameters(), device_type="cpu") as offload:
        logps = completion_logprobs(model, batch).logps
    (logps * torch.linspace(0.5, 1.5, logps.numel()).view_as(logps)).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[2][name], rtol=1e-5, atol=1e-6, msg=name)
    layer_inputs = LAYERS * batch.input_ids.numel() * HIDDEN * 4
    assert layer_inputs <= offload.offloaded_bytes < 3 * layer_inputs


def test_under_autocast_the_low_precision_weight_copies_stay_and_gradients_match():
    model = tiny_model(seed=17)
    batch = collate_pairs(random_examples(seed=18), pad_token_id=0)

    def run(offload):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), offload:
            logps = completion_logprobs(model, batch).logps
        logps.sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    expected = run(saved_tensors_hooks(lambda t: t, lambda t: t))
    offload = ActivationOffload(model.parameters(), device_type="cpu")
    moved_shapes = []
    pack = offload._pack

    def recording_pack(tensor):
        packed = pack(tensor)
        if packed is not tensor:
            moved_shapes.append(tuple(tensor.shape))
        return packed

    offload.pack_hook = recording_pack
    actual = run(offload)
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    assert moved_shapes and not weight_shapes.intersection(moved_shapes)
    torch.testing.assert_close(actual[0], expected[0])
    for name, grad in actual[1].items():
        torch.testing.assert_close(grad, expected[1][name], msg=name)


def test_a_tensor_saved_by_several_operations_is_copied_once():
    weight = torch.randn(64, 64, requires_grad=True)
    hidden = torch.randn(32, 64, requires_grad=True)
    with ActivationOffload([weight], device_type="cpu") as offload:
        activation = torch.tanh(hidden)  # saved once by tanh (its output) ...
        out = (activation @ weight).sum() + (activation @ weight.T).sum()  # ... and read by two matmuls
    out.backward()
    assert offload.offloaded_count == 1 and offload.offloaded_bytes == 32 * 64 * 4  # saved by tanh and both matmuls
    expected_hidden = hidden.grad.clone()
    hidden.grad = None
    activation = torch.tanh(hidden)
    ((activation @ weight).sum() + (activation @ weight.T).sum()).backward()
    torch.testing.assert_close(hidden.grad, expected_hidden)


def test_activation_offloading_on_cpu_warns_and_changes_nothing(caplog):
    objective = object()
    with caplog.at_level(logging.WARNING):
        assert offloading_objective(objective, True, torch.device("cpu")) is objective
    assert "no effect on CPU" in caplog.text
    assert offloading_objective(objective, False, torch.device("cuda")) is objective
    assert isinstance(offloading_objective(objective, True, torch.device("cuda")), OffloadingObjective)


def test_activation_offloading_is_an_accepted_config_key():
    assert DPOConfig(activation_offloading=True).activation_offloading is True


# ------------------------------------------------------------------------------------------- head chunk budget
@pytest.mark.parametrize(
    "vocab, budget_mib, expected_rows",
    [(32000, 256, 1024), (50257, 256, 1024), (65536, 256, 1024), (128256, 256, 523), (151936, 256, 441),
     (262144, 256, 256), (262144, 1, 1), (262144, None, 1024)],
)
def test_rows_per_chunk_keep_one_chunks_float32_logits_within_the_budget(vocab, budget_mib, expected_rows):
    budget = None if budget_mib is None else budget_mib << 20
    assert rows_per_chunk(1024, vocab, budget) == expected_rows
    if budget is not None and 1 < expected_rows < 1024:  # shrunk: the most rows whose logits fit
        assert expected_rows * vocab * 4 <= budget < (expected_rows + 1) * vocab * 4


def test_the_default_budget_keeps_todays_chunks_for_vocabularies_up_to_64k():
    options = logprob_options(DPOConfig(), holds_whole_output_layer=True)
    assert options["chunk_size"] == 1024 and options["max_chunk_bytes"] == 256 << 20
    assert rows_per_chunk(options["chunk_size"], 65536, options["max_chunk_bytes"]) == 1024
    assert rows_per_chunk(options["chunk_size"], 262144, options["max_chunk_bytes"]) == 256


def test_a_large_vocabulary_gets_smaller_chunks_with_exact_logps_and_gradients(monkeypatch):
    vocab, rows, hidden_size = 4096, 300, 16
    torch.manual_seed(14)
    hidden = torch.randn(rows, hidden_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,))
    seen = []
    bounds = chunked_head._chunk_bounds
    monkeypatch.setattr(chunked_head, "_chunk_bounds", lambda n, size: seen.append(size) or bounds(n, size))
    budget = 40 * vocab * 8 + 100  # float64 compute: 40 rows fit, 41 do not
    logps, _ = chunked_label_logprobs(hidden, weight, labels, chunk_size=1024, max_chunk_bytes=budget)
    grads = torch.autograd.grad((logps * torch.linspace(0.5, 1.5, rows, dtype=torch.float64)).sum(), (hidden, weight))
    assert seen and set(seen) == {40}
    full = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, labels[:, None]).squeeze(1)
    expected = torch.autograd.grad((full * torch.linspace(0.5, 1.5, rows, dtype=torch.float64)).sum(), (hidden, weight))
    torch.testing.assert_close(logps, full)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_the_full_logits_path_respects_the_budget_too():
    logits, targets = torch.randn(50, 1000), torch.randint(0, 1000, (50,))
    expected = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    got, _ = token_logps(logits, targets, chunk_size=1024, max_chunk_bytes=7 * 1000 * 4)
    torch.testing.assert_close(got, expected)
    assert rows_per_chunk(1024, 1000, 7 * 1000 * 4) == 7


def test_a_model_with_a_large_vocabulary_scores_the_same_under_a_small_budget():
    model = tiny_model(seed=15, vocab=3000)
    batch = collate_shared_prefix(random_examples(seed=16, vocab=3000), pad_token_id=0)
    unbudgeted = logps_loss_and_grads(model, batch, chunk_size=1024)
    budgeted = logps_loss_and_grads(model, batch, chunk_size=1024, max_chunk_bytes=8 * 3000 * 4)  # 8-row chunks
    assert_same(budgeted, unbudgeted)


# ------------------------------------------------------------------------------------------------ through the trainer
STORY_PAIRS = [
    {"prompt": "Once upon a time, there was a little girl named Lily.", "chosen": " She loved to play outside.",
     "rejected": " The dog ran away and hid."},
    {"prompt": "Tom had a red ball.", "chosen": " He was happy.", "rejected": " It was sad and cold."},
    {"prompt": "The cat sat on the mat. It was", "chosen": " warm and soft.", "rejected": " very big and loud."},
    {"prompt": "Ben wanted to bake a cake.", "chosen": " His mom helped him.", "rejected": " The oven was broken."},
]


def train_two_steps(model_dir, output_dir, **overrides):
    from preftune import DPOTrainer

    settings = dict(output_dir=str(output_dir), learning_rate=1e-3, max_steps=2, logging_steps=1, save_strategy="no",
                    per_device_train_batch_size=4, max_length=64, seed=0, overwrite_cache=True, adam_epsilon=1.0)
    trainer = DPOTrainer(model=str(model_dir), args=DPOConfig(**{**settings, **overrides}), train_dataset=STORY_PAIRS)
    trainer.train()
    return trainer


@pytest.mark.slow  # two short trainings per case (20-55 s on the shared 2-core machine)
@pytest.mark.parametrize("settings", [
    {"prefix_sharing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}},
    {"prefix_sharing": False, "padding_free": True},
    {"finetuning_type": "lora", "lora_rank": 4, "gradient_checkpointing_kwargs": {"use_reentrant": True}},
])
def test_training_with_gradient_checkpointing_follows_the_same_trajectory(stories_model_dir, tmp_path, settings):
    plain = train_two_steps(stories_model_dir, tmp_path / "plain", **settings)
    checkpointed = train_two_steps(stories_model_dir, tmp_path / "checkpointed", gradient_checkpointing=True,
                                   **settings)
    layers = [m for m in checkpointed.model.modules() if type(m).__name__.endswith("DecoderLayer")]
    assert layers and all(m.gradient_checkpointing for m in layers)
    losses = [[entry["loss"] for entry in t.state.log_history if "loss" in entry] for t in (plain, checkpointed)]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], abs=1e-6)
    trained = 0
    for (name, a), (_, b) in zip(plain.model.named_parameters(), checkpointed.model.named_parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
        trained += a.requires_grad
    assert trained


def test_activation_offloading_trains_on_cpu_with_a_warning(stories_model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        trainer = train_two_steps(stories_model_dir, tmp_path, activation_offloading=True)
    assert "activation_offloading has no effect on CPU" in caplog.text
    assert trainer.state.global_step == 2
