"""One benchmark run in this process: load a built case, train one engine for a few steps, measure.

Engines: ``preftune``, ``trl`` (TRL 1.16 ``DPOTrainer``, reference forward in each step) and ``trl-precompute``
(TRL with ``precompute_ref_log_probs=True``: reference log-probs computed in ``__init__``, before training).

Both engines get the same things: policy and reference loaded separately from the case's model directory in
float32, the same tokenizer object, the same pairs in the same batches, the same optimizer settings.
Batches: preftune shuffles its pairs with ``torch.randperm(n, generator seeded with seed)``; TRL is given the
pairs already in that order with ``train_sampling_strategy="sequential"``. ``StepClock`` checks that both saw the
same batches by counting the real tokens the policy was fed in each step.

Timing: ``StepClock`` takes a timestamp after every optimizer step (a global ``torch.optim`` step hook, the same
for both engines, nothing in either engine is patched); the timed window runs from the end of the warm-up steps
to the end of the last step, so it holds whole steps only: data collation, the policy forward/backward, the
reference forward, the loss, clipping, the optimizer, logging. Model loading, tokenization and TRL's
reference precompute happen before it and are reported separately (``load_seconds``, ``setup_seconds``).
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from cases import load_case
from flops import step_flops

ENGINES = ("preftune", "trl", "trl-precompute")


@dataclass
class RunSpec:
    """What one worker runs (the parent passes it as JSON)."""

    engine: str
    case_dir: str
    steps: int = 8
    warmup: int = 1
    batch_size: int = 4
    learning_rate: float = 5e-6
    beta: float = 0.1
    seed: int = 0
    device: str = "cpu"
    optim: str = "adamw_torch_fused"
    gradient_checkpointing: bool = False
    output_dir: str | None = None
    progress_file: str | None = None  # when set: "train <time>" before training, "step <time>" after each step


class StepClock:
    """Timestamps after every optimizer step, and the real tokens the policy was fed before each step.

    Uses public PyTorch hooks only: a global optimizer step post-hook (fires for any ``torch.optim`` optimizer,
    also under accelerate's wrapper) and a forward pre-hook on the policy that counts the real tokens (``attention_mask``
    ones; in a 4-D boolean mask, the queries that see the row's first token) of forwards run with gradients enabled: the policy's training forwards
    (the reference runs without gradients).
    """

    def __init__(self, policy: torch.nn.Module, *, synchronize_cuda: bool, progress_file: str | None = None) -> None:
        self.step_ends: list[float] = []
        self._progress_file = progress_file
        self.step_tokens: list[int] = []
        self._pending_tokens = 0
        self.optimizers: set[str] = set()
        self._synchronize = synchronize_cuda
        self._handles = [
            register_optimizer_step_post_hook(self._after_step),
            policy.register_forward_pre_hook(self._before_forward, with_kwargs=True),
        ]

    def _before_forward(self, module, args, kwargs):
        if not torch.is_grad_enabled():
            return None
        if self._pending_tokens is None:
            return None
        mask = kwargs.get("attention_mask")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is None and input_ids is not None:
            self._pending_tokens += int(input_ids.numel())
        elif mask is not None and mask.dim() == 2:
            self._pending_tokens += int(mask.sum())
        elif mask is not None and mask.dim() == 4 and mask.dtype == torch.bool:
            # (rows, 1, T, T) "may attend" mask: every real token of a causal row sees the row's first token;
            # padding sees only itself (never key 0, which is always a real token)
            self._pending_tokens += int(mask[..., 0].sum())
        else:
            self._pending_tokens = None  # a mask layout this clock cannot read: the batch check says "unknown"
        return None

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._synchronize:
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())
        write_progress(self._progress_file, "step")
        self.step_tokens.append(self._pending_tokens)
        self.optimizers.add(f"{type(optimizer).__name__}(fused={optimizer.defaults.get('fused')}, foreach={optimizer.defaults.get('foreach')})")
        self._pending_tokens = 0

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def write_progress(path: str | None, event: str) -> None:
    """Append ``"<event> <wall time>"`` to the progress file a watching parent reads (nothing when ``path`` is None)."""
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{event} {time.time()}\n")


def preftune_options(engine: str) -> dict:
    """preftune config options named in an engine spec: ``preftune+prefix_sharing`` turns an option on,
    ``preftune+prefix_sharing=false`` sets it (``true``/``false``/``null``/a number, else a string)."""
    options = {}
    for item in engine.split("+")[1:]:
        key, sep, text = item.partition("=")
        if not sep:
            options[key] = True
            continue
        lowered = text.lower()
        if lowered in ("true", "false", "null", "none"):
            options[key] = {"true": True, "false": False}.get(lowered)
        else:
            try:
                options[key] = int(text)
            except ValueError:
                try:
                    options[key] = float(text)
                except ValueError:
                    options[key] = text
    return options


def preftune_order(count: int, seed: int) -> list[int]:
    """The order in which preftune's first epoch visits ``count`` pairs (its shuffle: randperm seeded by seed)."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()


def load_models(model_dir: Path, device: str):
    """``(policy, reference, tokenizer)`` of a built case's model folder: two fp32 copies of the model on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    load = lambda: AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)  # noqa: E731
    return load(), load(), tokenizer


def _shared_settings(spec: RunSpec, max_length: int, output_dir: Path) -> dict:
    """The training settings both engines get, under the key names both DPOConfigs accept."""
    return dict(
        output_dir=str(output_dir),
        use_cpu=spec.device == "cpu",
        bf16=False,
        per_device_train_batch_size=spec.batch_size,
        max_steps=spec.steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim=spec.optim,
        beta=spec.beta,
        max_length=max_length,
        truncation_mode="keep_start",
        logging_steps=1,
        save_strategy="no",
        seed=spec.seed,
        gradient_checkpointing=spec.gradient_checkpointing,
    )


def preftune_trainer(spec: RunSpec, policy, reference, tokenizer, rows, max_length: int, output_dir: Path):
    """preftune's ``DPOTrainer`` with the shared settings and the options of ``spec.engine`` (``preftune+KEY=VALUE``)."""
    from preftune import DPOConfig, DPOTrainer

    config = DPOConfig(
        **_shared_settings(spec, max_length, output_dir),
        overwrite_cache=True,
        plot_loss=False,
        **preftune_options(spec.engine),  # variants such as preftune+prefix_sharing=false
    )
    return DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=rows, processing_class=tokenizer)


def trl_trainer(spec: RunSpec, policy, reference, tokenizer, rows, max_length: int, output_dir: Path, *, precompute: bool):
    """TRL 1.16's ``DPOTrainer`` with the shared settings, fed the rows in preftune's order."""
    import trl
    from datasets import Dataset

    config = trl.DPOConfig(
        **_shared_settings(spec, max_length, output_dir),
        fp16=False,
        report_to=[],
        precompute_ref_log_probs=precompute,
        train_sampling_strategy="sequential",
    )
    ordered = [rows[i] for i in preftune_order(len(rows), spec.seed)]
    return trl.DPOTrainer(
        model=policy, ref_model=reference, args=config, train_dataset=Dataset.from_list(ordered), processing_class=tokenizer
    )


def batch_check(fed: list, plain: list[int], shared_prefix: list[int]) -> str:
    """Whether the engine was fed the expected batches, judged by real tokens per step: ``same`` (every step holds
    the expected prompt+chosen and prompt+rejected tokens), ``same (prefix-shared)`` (some steps held each prompt
    once: the engine shares prompts between chosen and rejected), ``DIFFER``, or ``unknown`` (unreadable mask)."""
    if any(tokens is None for tokens in fed):
        return "unknown"
    if fed == plain:
        return "same"
    if all(tokens in (a, b) for tokens, a, b in zip(fed, plain, shared_prefix)) and len(fed) == len(plain):
        return "same (prefix-shared)"
    return "DIFFER"


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux: ``5`` into ``/proc/self/clear_refs`` resets VmHWM), so
    that the peak of the training phase alone can be read; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def high_water_rss_mib() -> float | None:
    """VmHWM, the peak resident set size since the last reset (MiB), from ``/proc/self/status``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _finite_or_none(value) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def run_engine(spec: RunSpec) -> dict:
    """Train ``spec.engine`` on the case for ``spec.steps`` steps and return its measurements as a JSON-able dict:
    rates over the timed steps (``pairs_per_second``, ``tokens_per_second``, ``useful_flops_per_second``), times
    (``train_seconds`` timed window, ``step_seconds``, ``load_seconds``, ``setup_seconds``), memory (MiB), losses
    per step, and the batch check (see ``batch_check``)."""
    if spec.engine.split("+")[0] not in ENGINES:
        raise ValueError(f"unknown engine {spec.engine!r}; expected one of {', '.join(ENGINES)}")
    if spec.warmup < 0 or spec.steps <= spec.warmup:
        raise ValueError(f"steps ({spec.steps}) must exceed warmup ({spec.warmup})")
    meta, rows = load_case(Path(spec.case_dir))
    if spec.steps * spec.batch_size > len(rows):
        raise ValueError(f"{spec.steps} steps of {spec.batch_size} pairs need {spec.steps * spec.batch_size} pairs; the case has {len(rows)}")
    max_length = meta["settings"]["max_length"]
    output_dir = Path(spec.output_dir or tempfile.mkdtemp(prefix=f"bench-{spec.engine}-"))
    torch.manual_seed(spec.seed)

    start = time.perf_counter()
    policy, reference, tokenizer = load_models(Path(spec.case_dir) / "model", spec.device)
    loaded = time.perf_counter()
    if spec.engine.split("+")[0] == "preftune":
        trainer = preftune_trainer(spec, policy, reference, tokenizer, rows, max_length, output_dir)
    else:
        trainer = trl_trainer(
            spec, policy, reference, tokenizer, rows, max_length, output_dir, precompute=spec.engine == "trl-precompute"
        )
    set_up = time.perf_counter()
    del reference  # from here on only the trainer decides whether a reference model stays in memory
    gc.collect()

    peak_rss_before_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    peak_reset = reset_peak_rss()
    clock = StepClock(policy, synchronize_cuda=spec.device.startswith("cuda"), progress_file=spec.progress_file)
    write_progress(spec.progress_file, "train")
    train_start = time.perf_counter()
    try:
        trainer.train()
    finally:
        clock.close()
    train_end = time.perf_counter()

    if len(clock.step_ends) != spec.steps:
        raise RuntimeError(f"{spec.engine}: saw {len(clock.step_ends)} optimizer steps, expected {spec.steps}")
    timed_seconds = clock.step_ends[-1] - clock.step_ends[spec.warmup - 1] if spec.warmup else clock.step_ends[-1] - train_start
    timed_steps = spec.steps - spec.warmup
    timed_pairs = timed_steps * spec.batch_size

    order = preftune_order(len(rows), spec.seed)
    lengths = meta["lengths"]
    step_pairs = [[lengths[i] for i in order[s * spec.batch_size : (s + 1) * spec.batch_size]] for s in range(spec.steps)]
    expected_step_tokens = [sum(2 * p + c + r for p, c, r in pairs) for pairs in step_pairs]
    shared_prefix_step_tokens = [sum(p + c + r for p, c, r in pairs) for pairs in step_pairs]
    timed_tokens = sum(expected_step_tokens[spec.warmup :])
    reference_in_step = spec.engine != "trl-precompute"
    timed_flops = sum(step_flops(meta["model"], pairs, reference_in_step=reference_in_step) for pairs in step_pairs[spec.warmup :])

    history = trainer.state.log_history
    losses = [(int(r["step"]), float(r["loss"])) for r in history if "loss" in r and "step" in r]
    losses.sort()
    step_seconds = [b - a for a, b in zip([train_start] + clock.step_ends[:-1], clock.step_ends)]
    result = {
        "engine": spec.engine,
        "case": meta["settings"]["name"],
        "device": spec.device,
        "torch_threads": torch.get_num_threads(),
        "steps": spec.steps,
        "warmup_steps": spec.warmup,
        "timed_steps": timed_steps,
        "batch_size": spec.batch_size,
        "pairs": timed_pairs,
        "tokens": timed_tokens,
        "completion_tokens": sum(c + r for pairs in step_pairs[spec.warmup :] for _, c, r in pairs),
        "fed_step_tokens": clock.step_tokens,
        "expected_step_tokens": expected_step_tokens,
        "batch_check": batch_check(clock.step_tokens, expected_step_tokens, shared_prefix_step_tokens),
        "train_seconds": timed_seconds,
        "step_seconds": step_seconds,
        "median_step_seconds": statistics.median(step_seconds[spec.warmup :]),
        "pairs_per_second": timed_pairs / timed_seconds,
        "tokens_per_second": timed_tokens / timed_seconds,
        "useful_flops": timed_flops,
        "useful_flops_per_second": timed_flops / timed_seconds,
        "load_seconds": loaded - start,
        "setup_seconds": set_up - loaded,
        "train_call_seconds": train_end - train_start,
        "warmup_seconds": (clock.step_ends[spec.warmup - 1] - train_start) if spec.warmup else 0.0,
        "peak_rss_before_train_mib": peak_rss_before_train,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "train_peak_rss_mib": high_water_rss_mib() if peak_reset else None,
        "peak_cuda_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if spec.device.startswith("cuda") else None,
        "first_loss": _finite_or_none(losses[0][1]) if losses else None,
        "final_loss": _finite_or_none(losses[-1][1]) if losses else None,
        "losses": [loss for _, loss in losses],
        "optimizer": sorted(clock.optimizers),
        "spec": asdict(spec),
    }
    return result


def matmul_ceiling(*, size: int = 2048, repeats: int = 10, device: str = "cpu") -> dict:
    """FLOP/s of a square float32 matmul (``size``³ · 2 FLOPs) with this process's thread count: the best and the
    median of ``repeats`` timed products after two warm-up products."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    out = torch.empty(size, size, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):
        torch.mm(a, b, out=out)
    sync()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        rates.append(2.0 * size**3 / (time.perf_counter() - t0))
    rates.sort()
    return {
        "engine": "matmul",
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "size": size,
        "best_flops_per_second": rates[-1],
        "median_flops_per_second": rates[len(rates) // 2],
    }


def worker_main(spec_json: str) -> int:
    """Run one worker from its JSON spec; print exactly one JSON object on stdout (library output goes to stderr)."""
    real_stdout = os.dup(1)
    os.dup2(2, 1)  # anything a library prints lands in stderr; stdout carries only the result
    spec = json.loads(spec_json)
    if spec.get("engine") == "matmul":
        result = matmul_ceiling(size=spec.get("size", 2048), repeats=spec.get("repeats", 10), device=spec.get("device", "cpu"))
    else:
        result = run_engine(RunSpec(**spec))
    with os.fdopen(real_stdout, "w") as handle:
        handle.write(json.dumps(result) + "\n")
    return 0
