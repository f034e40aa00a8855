"""The DPO paper's controlled-sentiment experiment in miniature: the reward / KL(π‖π_ref) frontier on stories260K.

Top to bottom:
1. story openings (written programmatically, no downloads), split into training and held-out prompts;
2. the pretrained model (`../shared/assets/stories260K-hf`) samples --num-samples continuations per training
   prompt (preftune.generation);
3. a rule reward labels them: `preftune.judges:sentiment_word_score` = #positive − #negative words; the best and the
   worst continuation of each prompt make a pair (ties skipped);
4. DPO at each β, with preftune (`preftune.DPOTrainer`) and with TRL 1.16 (`trl.DPOTrainer`), same pairs and settings;
5. each trained policy samples from the held-out prompts: mean reward, win rate over the reference's samples, and the
   sampled KL(π‖π_ref) = mean over the policy's samples of Σ_t [log π(y_t|…) − log π_ref(y_t|…)] (temperature 1,
   so an unbiased estimate), through `preftune.evaluation`;
6. frontier.png (reward vs KL, one marker per β, both engines), frontier.md (the table), frontier.json.

`--methods` adds on-policy training at the same budget of judged samples (offline: train_prompts × num_samples):
- `iterative`: `preftune.loop.run_loop`, --rounds rounds of train_prompts / rounds fresh openings × num_samples,
  each round sampled from the previous round's model, judged, paired best vs worst and trained with DPO (the same
  settings, num_train_epochs per round; the reference stays the pretrained model);
- `online`: `preftune.online` (per batch of prompts: two samples from the current policy, judged, one DPO step
  on the pair), one pass over train_prompts × num_samples / 2 distinct openings (the training openings, then
  openings after the held-out ones), batch_size prompts per step.

    python examples/reward_kl_frontier/run.py            # full run (< 20 min on 2 CPU cores)
    python examples/reward_kl_frontier/run.py --smoke    # tiny version (< 60 s), for the test suite
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune import DPOConfig, DPOTrainer
from preftune.loop import run_loop
from preftune.losses import LossParams
from preftune.models import disable_dropout
from preftune.online import OnlineDPO, run_online
from preftune.optim import build_adamw, build_scheduler
from preftune.evaluation import outcomes_from_scores, per_prompt_mean, sampled_kl, sequence_logps, win_rate
from preftune.generation import SamplingParams, append_candidates, candidate_row, generate_samples
from preftune.judges import pairs_from_candidates, score_candidates, sentiment_word_score, load_judge

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from openings import story_openings  # noqa: E402  (this folder's openings.py)

DEFAULT_MODEL = HERE.parents[1].parent / "shared" / "assets" / "stories260K-hf"
JUDGE = "preftune.judges:sentiment_word_score"

FULL = dict(train_prompts=400, eval_prompts=100, num_samples=4, eval_samples=4, max_new_tokens=48,
            betas=[0.05, 0.1, 0.5, 1.0], epochs=2.0, learning_rate=5e-4, batch_size=8, rounds=4)
SMOKE = dict(train_prompts=16, eval_prompts=6, num_samples=4, eval_samples=2, max_new_tokens=12,
             betas=[0.1], epochs=1.0, learning_rate=5e-4, batch_size=8, rounds=2)
METHODS = ("offline", "iterative", "online")

logger = logging.getLogger("frontier")


# --------------------------------------------------------------------------------------------------------------
# 1. Prompts: simple story openings
# --------------------------------------------------------------------------------------------------------------

# story_openings(count): `count` distinct openings from 8 templates x small word lists, shuffled with a fixed seed
# (openings.py; e.g. "One day, Lily went to the park.", "Max found a kite in the garden.").


# --------------------------------------------------------------------------------------------------------------
# 2-3. Sample candidates, label pairs
# --------------------------------------------------------------------------------------------------------------


def make_pairs(model, tokenizer, prompts: list[str], params: SamplingParams, work: Path, model_name: str):
    """Sample, score with the sentiment rule, pair best vs worst. Writes candidates.jsonl and pairs.jsonl."""
    samples = generate_samples(model, tokenizer, prompts, params, progress=False)
    rows = [candidate_row(str(i), prompt, [s.text for s in group], model_name, params)
            for i, (prompt, group) in enumerate(zip(prompts, samples))]
    (work / "candidates.jsonl").unlink(missing_ok=True)
    append_candidates(work / "candidates.jsonl", rows)
    scores = score_candidates(load_judge(JUDGE), rows)
    pairs, stats = pairs_from_candidates(rows, scores, mode="best_vs_worst")
    (work / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    flat = [score for group in scores for score in group]
    logger.info("%d prompts x %d samples: mean reward %.3f; %d pairs, %d ties skipped", len(prompts),
                params.num_samples, sum(flat) / len(flat), stats.pairs, stats.ties_skipped)
    return pairs, stats


# --------------------------------------------------------------------------------------------------------------
# 4. DPO with preftune and with TRL, same settings
# --------------------------------------------------------------------------------------------------------------


def train_preftune(model_dir: Path, pairs: list[dict], beta: float, settings: dict, out: Path, **extra):
    """preftune DPO; `extra` DPOConfig keys (e.g. rpo_alpha) on top of the shared settings."""
    config = DPOConfig(output_dir=str(out), beta=beta, learning_rate=settings["learning_rate"],
                       num_train_epochs=settings["epochs"], per_device_train_batch_size=settings["batch_size"],
                       max_length=settings["max_length"], seed=0, logging_steps=10, save_strategy="no",
                       plot_loss=False, overwrite_cache=True, **extra)
    trainer = DPOTrainer(model=str(model_dir), args=config, train_dataset=pairs)
    trainer.train()
    return trainer.model.eval()


def train_trl(model_dir: Path, tokenizer, pairs: list[dict], beta: float, settings: dict, out: Path):
    import trl
    from datasets import Dataset

    logging.getLogger("trl").setLevel(logging.ERROR)
    config = trl.DPOConfig(output_dir=str(out), beta=beta, learning_rate=settings["learning_rate"],
                           num_train_epochs=settings["epochs"], per_device_train_batch_size=settings["batch_size"],
                           max_length=settings["max_length"], seed=0, logging_steps=10, save_strategy="no",
                           use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
                           disable_tqdm=True)
    rows = [{key: pair[key] for key in ("prompt", "chosen", "rejected")} for pair in pairs]
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=config,
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    return trainer.model.eval()


# --------------------------------------------------------------------------------------------------------------
# 4b. On-policy DPO at the same budget of judged samples
# --------------------------------------------------------------------------------------------------------------


def write_prompts_file(prompts: list[str], path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": f"opening-{i}", "prompt": text}) + "\n" for i, text in enumerate(prompts)))
    return path


def train_iterative(model_dir: Path, prompts: list[str], beta: float, settings: dict, out: Path):
    """`settings["rounds"]` rounds of `preftune.loop` on fresh slices of `prompts`: sample num_samples continuations
    from the current policy, judge, pair best vs worst, DPO for `epochs` epochs (reference: the pretrained model).
    Returns (the last round's model, per-round {sample reward, pairs, steps})."""
    loop = dict(prompts=str(write_prompts_file(prompts, out.parent / f"{out.name}_prompts.jsonl")), judge=JUDGE,
                rounds=settings["rounds"], prompts_per_round=len(prompts) // settings["rounds"],
                prompt_selection="fresh", num_samples=settings["num_samples"], temperature=1.0,
                max_new_tokens=settings["max_new_tokens"], sampling_seed=0, sampling_batch_size=256,
                pair_mode="best_vs_worst", reference="initial")
    config = DPOConfig(model_name_or_path=str(model_dir), output_dir=str(out), beta=beta,
                       learning_rate=settings["learning_rate"], num_train_epochs=settings["epochs"],
                       per_device_train_batch_size=settings["batch_size"], max_length=settings["max_length"], seed=0,
                       logging_steps=10, save_strategy="no", plot_loss=False, overwrite_cache=True, loop=loop)
    summary = run_loop(config, progress=False)
    rounds = [{"round": r["round"], "sample_reward": r["sample_reward"]["mean"], "pairs": r["pairs"],
               "steps": r["train"]["global_step"]} for r in summary["rounds"]]
    policy = AutoModelForCausalLM.from_pretrained(out / f"round-{settings['rounds']}" / "model")
    return policy.eval(), rounds


def train_online(model_dir: Path, tokenizer, prompts: list[str], beta: float, settings: dict):
    """Online DPO (`preftune.online`), one pass over `prompts`, batch_size prompts per step, with the offline run's
    optimizer (AdamW, linear decay over the steps), dropout off and the pretrained model as the reference.
    Returns (the policy, {steps, mean score of the samples drawn while training})."""
    config = DPOConfig(output_dir="unused", beta=beta, learning_rate=settings["learning_rate"],
                       per_device_train_batch_size=settings["batch_size"], max_length=settings["max_length"], seed=0)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    disable_dropout(policy)
    steps = math.ceil(len(prompts) / settings["batch_size"])
    optimizer = build_adamw(policy, config)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=settings["max_new_tokens"], seed=0, batch_size=256)
    trainer = OnlineDPO(policy, tokenizer, JUDGE, loss=LossParams.from_config(config), sampling=sampling,
                        optimizer=optimizer, scheduler=build_scheduler(optimizer, config, steps),
                        max_length=settings["max_length"], max_grad_norm=config.max_grad_norm)
    history = run_online(trainer, [(f"opening-{i}", text) for i, text in enumerate(prompts)], steps,
                         batch_size=settings["batch_size"])
    scores = [row["objective/scores"] for row in history]
    return policy.eval(), {"steps": steps, "sample_reward": sum(scores) / len(scores),
                           "sample_reward_last_10_steps": sum(scores[-10:]) / len(scores[-10:])}


# --------------------------------------------------------------------------------------------------------------
# 5. Reward and KL of a policy's samples
# --------------------------------------------------------------------------------------------------------------


def sample_and_score(model, tokenizer, prompts: list[str], params: SamplingParams):
    """(samples[prompt][sample], sentiment scores[prompt][sample]) of the model on the held-out prompts."""
    samples = generate_samples(model, tokenizer, prompts, params, progress=False)
    scores = [sentiment_word_score([prompt] * len(group), [s.text for s in group])
              for prompt, group in zip(prompts, samples)]
    return samples, scores


def max_weight_difference(ours: dict, theirs: dict) -> float:
    """Largest absolute difference between two state dicts' common tensors (tied weights counted once)."""
    common = ours.keys() & theirs.keys()
    if not common:
        return float("nan")
    return max((ours[name].float() - theirs[name].float()).abs().max().item() for name in common)


def evaluate_policy(policy, reference, tokenizer, prompts, params, reference_scores) -> dict:
    samples, scores = sample_and_score(policy, tokenizer, prompts, params)
    flat = [sample for group in samples for sample in group]
    ids = ([s.prompt_ids for s in flat], [s.completion_ids for s in flat])
    pad = tokenizer.pad_token_id
    policy_logps = sequence_logps(policy, *ids, pad_token_id=pad, batch_size=64)
    reference_logps = sequence_logps(reference, *ids, pad_token_id=pad, batch_size=64)
    n = params.num_samples
    regroup = lambda values: [values[i * n: (i + 1) * n] for i in range(len(prompts))]  # noqa: E731
    kl = sampled_kl(regroup(policy_logps), regroup(reference_logps))
    reward = per_prompt_mean(scores)
    wins = win_rate(outcomes_from_scores(scores, reference_scores))
    return {"reward": reward.mean, "reward_stderr": reward.stderr or 0.0, "kl": kl.mean, "kl_stderr": kl.stderr or 0.0,
            "win_rate": wins.rate, "win_rate_interval": [wins.lower, wins.upper],
            "example": prompts[0] + samples[0][0].text}


# --------------------------------------------------------------------------------------------------------------
# 6. Figure and table
# --------------------------------------------------------------------------------------------------------------


def series(point: dict) -> str:
    """The plot line and table row group of a point: the engine for offline DPO, else the method."""
    method = point.get("method", "offline")
    return point["engine"] if method == "offline" else method


SERIES = {  # name: (legend label, matplotlib style)
    "preftune": ("preftune DPO, offline", dict(color="tab:blue", marker="o", markersize=11, markerfacecolor="none",
                                               linewidth=2)),
    "preftune-rpo": ("preftune-rpo DPO, offline", dict(color="tab:green", marker="^", markersize=8, linewidth=1.5)),
    "trl": ("trl DPO, offline", dict(color="tab:orange", marker="s", markersize=5, linestyle="--", linewidth=1.2)),
    "iterative": ("preftune iterative DPO (loop)", dict(color="tab:red", marker="D", markersize=7, linewidth=1.5)),
    "online": ("preftune online DPO", dict(color="tab:purple", marker="v", markersize=8, linestyle=":",
                                           linewidth=1.5)),
}


def plot_frontier(points: list[dict], reference: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.2, 4.8))
    # preftune as large open circles, TRL as small filled squares on top: where the engines agree, both show.
    for name, (label, style) in SERIES.items():
        mine = sorted((p for p in points if series(p) == name), key=lambda p: p["kl"])
        if not mine:
            continue
        axis.errorbar([p["kl"] for p in mine], [p["reward"] for p in mine], xerr=[p["kl_stderr"] for p in mine],
                      yerr=[p["reward_stderr"] for p in mine], label=label, capsize=3, **style)
        if name == "trl":
            continue  # its points coincide with preftune's
        for p in mine:
            axis.annotate(f"β={p['beta']:g}", (p["kl"], p["reward"]), textcoords="offset points", xytext=(8, -12),
                          fontsize=8, color=style["color"])
    axis.errorbar([0.0], [reference["reward"]], yerr=[reference["reward_stderr"]], color="black", marker="*",
                  markersize=11, linestyle="none", label="reference (pretrained)", capsize=3)
    axis.set_xlabel("KL(π ‖ π_ref), nats per continuation (sampled)")
    axis.set_ylabel("mean sentiment-word reward")
    axis.set_title("stories260K: reward vs KL frontier (held-out prompts)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _agreement(points: list[dict]) -> list[str]:
    """One line per β comparing the engines: rewards and KLs within 2 combined standard errors, or not, and the
    largest difference between their trained weights."""
    lines = []
    points = [p for p in points if p.get("method", "offline") == "offline"]
    for beta in sorted({p["beta"] for p in points}):
        by_engine = {p["engine"]: p for p in points if p["beta"] == beta}
        if not {"preftune", "trl"} <= set(by_engine):
            continue
        ours, theirs = by_engine["preftune"], by_engine["trl"]
        verdicts = []
        for key, label in (("reward", "reward"), ("kl", "KL")):
            gap = ours[key] - theirs[key]
            tolerance = 2 * math.hypot(ours[f"{key}_stderr"], theirs[f"{key}_stderr"])
            verdicts.append(f"{label} {gap:+.2f} ({'within' if abs(gap) <= tolerance else 'OUTSIDE'} 2 SE = "
                            f"{tolerance:.2f})")
        if ours.get("max_weight_difference") is not None:
            verdicts.append(f"largest |weight difference| {ours['max_weight_difference']:.2e}")
        lines.append(f"- β = {beta:g}: preftune − TRL: " + "; ".join(verdicts))
    return lines


def _on_policy_comparison(points: list[dict]) -> list[str]:
    """One line per on-policy point: its reward and KL minus offline preftune DPO's at the same β, with 2 combined
    standard errors."""
    offline = {p["beta"]: p for p in points if series(p) == "preftune"}
    lines = []
    for p in sorted((p for p in points if series(p) in ("iterative", "online")), key=lambda p: (series(p), p["beta"])):
        base = offline.get(p["beta"])
        if base is None:
            continue
        parts = []
        for key, label in (("reward", "reward"), ("kl", "KL")):
            gap = p[key] - base[key]
            tolerance = 2 * math.hypot(p[f"{key}_stderr"], base[f"{key}_stderr"])
            parts.append(f"{label} {gap:+.2f} (2 SE = {tolerance:.2f})")
        lines.append(f"- {series(p)} β = {p['beta']:g} − offline: " + "; ".join(parts))
    return lines


def write_table(points: list[dict], reference: dict, settings: dict, stats: dict, path: Path) -> None:
    lines = [
        "| method | engine | β | mean reward ± SE | KL(π‖π_ref) ± SE | win rate vs reference [95% CI] | train s |",
        "|---|---|---|---|---|---|---|",
        f"| reference | – | – | {reference['reward']:.2f} ± {reference['reward_stderr']:.2f} | 0 | – | – |",
    ]
    order = {name: i for i, name in enumerate(("offline",) + METHODS[1:])}
    for p in sorted(points, key=lambda p: (order[p.get("method", "offline")], p["engine"], p["beta"])):
        low, high = p["win_rate_interval"]
        lines.append(f"| {p.get('method', 'offline')} | {p['engine']} | {p['beta']:g} | {p['reward']:.2f} ± "
                     f"{p['reward_stderr']:.2f} | {p['kl']:.1f} ± {p['kl_stderr']:.1f} | {p['win_rate']:.2f} "
                     f"[{low:.2f}, {high:.2f}] | {p['train_seconds']:.0f} |")
    budget = settings["train_prompts"] * settings["num_samples"]
    setup = (f"Offline: {stats['pairs']} best-vs-worst pairs ({settings['train_prompts']} prompts × "
             f"{settings['num_samples']} samples from the pretrained model, {settings['max_new_tokens']} new tokens, "
             f"temperature 1; {stats['ties_skipped']} ties skipped), {settings['epochs']:g} epochs, lr "
             f"{settings['learning_rate']:g}, batch {settings['batch_size']}, sigmoid loss. "
             f"Every method judges {budget} samples. Iterative (`preftune.loop`): {settings['rounds']} rounds × "
             f"{settings['train_prompts'] // settings['rounds']} fresh prompts × {settings['num_samples']} samples "
             f"from the current policy, {settings['epochs']:g} epochs per round on its pairs, reference = the "
             f"pretrained model. Online (`preftune.online`): {budget // 2} prompts × 2 samples from the current "
             f"policy, one DPO step per batch of {settings['batch_size']} prompts, one pass. Evaluation on "
             f"{settings['eval_prompts']} held-out prompts × {settings['eval_samples']} samples (temperature 1). "
             f"SE = standard error over prompts.")
    comparison = _on_policy_comparison(points)
    text = "\n".join(["# Reward vs KL frontier (stories260K, sentiment-word reward)", "", setup, "", *lines, "",
                      "Engines at the same β (offline):", "", *(_agreement(points) or ["- (one engine only)"]), "",
                      *(["On-policy minus offline preftune DPO at the same β:", "", *comparison, ""] if comparison
                        else [])])
    path.write_text(text)


def write_outputs(results: dict, output: Path) -> None:
    """frontier.json, frontier.png and frontier.md from what is measured so far (rewritten after each point)."""
    (output / "frontier.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    plot_frontier(results["points"], results["reference"], output / "frontier.png")
    write_table(results["points"], results["reference"], results["settings"],
                {"pairs": results["pairs"], "ties_skipped": results["ties_skipped"]}, output / "frontier.md")


def merged_points(path: Path, settings: dict, planned: set) -> tuple[list[dict], dict]:
    """The points of an earlier run's frontier.json that this run does not compute (same prompts, sample counts and
    lengths required), and its offline pair counts."""
    earlier = json.loads(path.read_text())
    for key in ("train_prompts", "eval_prompts", "num_samples", "eval_samples", "max_new_tokens"):
        if earlier["settings"].get(key) != settings[key]:
            raise SystemExit(f"--merge {path}: its {key} is {earlier['settings'].get(key)}, this run's {settings[key]}")
    kept = [p for p in earlier["points"]
            if (p.get("method", "offline"), p["engine"], p["beta"]) not in planned]
    for point in kept:
        point.setdefault("method", "offline")
    return kept, {"pairs": earlier.get("pairs"), "ties_skipped": earlier.get("ties_skipped")}


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (< 60 s), for the test suite")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="stories260K-hf directory")
    parser.add_argument("--output-dir", default=str(HERE), help="where frontier.png/.md/.json go (work files in work/)")
    parser.add_argument("--methods", nargs="+", default=["offline"], choices=METHODS,
                        help="offline: DPO on pairs sampled once from the pretrained model (with --engines); "
                             "iterative: preftune.loop rounds; online: preftune.online (same judged-sample budget)")
    parser.add_argument("--engines", nargs="+", default=["preftune", "trl"], choices=["preftune", "trl", "preftune-rpo"],
                        help="offline engines; preftune-rpo: preftune DPO plus RPO's NLL term on the chosen "
                             "responses (--rpo-alpha)")
    parser.add_argument("--rpo-alpha", type=float, default=1.0, help="RPO weight of the preftune-rpo engine")
    parser.add_argument("--betas", nargs="+", type=float, default=None, help="override the β list")
    parser.add_argument("--train-prompts", type=int, default=None)
    parser.add_argument("--eval-prompts", type=int, default=None)
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="iterative rounds (train_prompts / rounds each)")
    parser.add_argument("--merge", default=None,
                        help="an earlier run's frontier.json: its points this run does not compute are kept")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("preftune", "transformers", "datasets", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = dict(SMOKE if args.smoke else FULL)
    for key in ("betas", "train_prompts", "eval_prompts", "epochs", "rounds"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    settings["max_length"] = 128  # prompt (< 30 tokens) + continuation + EOS: nothing is ever cut
    output, model_dir = Path(args.output_dir), Path(args.model)
    work = output / "work"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    started = time.time()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.unk_token  # stories260K has no pad token
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    budget = settings["train_prompts"] * settings["num_samples"]
    online_count = budget // 2
    held_out_end = settings["train_prompts"] + settings["eval_prompts"]
    openings = story_openings(held_out_end + max(0, online_count - settings["train_prompts"]))
    train_prompts, eval_prompts = openings[: settings["train_prompts"]], openings[settings["train_prompts"]: held_out_end]
    online_prompts = (train_prompts + openings[held_out_end:])[:online_count]  # never a held-out opening

    planned = {(method, engine, beta) for beta in settings["betas"] for method in args.methods
               for engine in (args.engines if method == "offline" else ["preftune"])}
    points, stats = [], {"pairs": None, "ties_skipped": None}
    if args.merge:
        points, stats = merged_points(Path(args.merge), settings, planned)
    pairs = None
    if "offline" in args.methods:
        train_params = SamplingParams(temperature=1.0, max_new_tokens=settings["max_new_tokens"],
                                      num_samples=settings["num_samples"], seed=0, batch_size=256)
        pairs, pair_stats = make_pairs(reference, tokenizer, train_prompts, train_params, work, str(model_dir))
        stats = {"pairs": pair_stats.pairs, "ties_skipped": pair_stats.ties_skipped}
    eval_params = SamplingParams(temperature=1.0, max_new_tokens=settings["max_new_tokens"],
                                 num_samples=settings["eval_samples"], seed=1, batch_size=256)
    _, reference_scores = sample_and_score(reference, tokenizer, eval_prompts, eval_params)
    estimate = per_prompt_mean(reference_scores)
    reference_point = {"reward": estimate.mean, "reward_stderr": estimate.stderr or 0.0}
    logger.info("reference on held-out prompts: reward %.3f ± %.3f", estimate.mean, reference_point["reward_stderr"])

    trainers = {"preftune": lambda beta, out: train_preftune(model_dir, pairs, beta, settings, out),
                "trl": lambda beta, out: train_trl(model_dir, tokenizer, pairs, beta, settings, out),
                "preftune-rpo": lambda beta, out: train_preftune(model_dir, pairs, beta, settings, out,
                                                                 rpo_alpha=args.rpo_alpha)}
    results = {"settings": settings, "methods": args.methods, **stats, "reference": reference_point, "points": points}

    def record(policy, method: str, engine: str, beta: float, seconds: float, **extra) -> dict:
        point = {"method": method, "engine": engine, "beta": beta, "train_seconds": seconds, **extra,
                 **evaluate_policy(policy, reference, tokenizer, eval_prompts, eval_params, reference_scores)}
        logger.info("%-9s %-8s β=%-5g reward %.2f ± %.2f, KL %.1f ± %.1f, win rate %.2f (trained in %.0f s)", method,
                    engine, beta, point["reward"], point["reward_stderr"], point["kl"], point["kl_stderr"],
                    point["win_rate"], seconds)
        points.append(point)
        results["seconds"] = time.time() - started
        write_outputs(results, output)
        return point

    for beta in settings["betas"]:
        if "offline" in args.methods:
            weights, offline_points = {}, {}
            for engine in args.engines:
                clock = time.time()
                policy = trainers[engine](beta, work / f"{engine}_beta{beta:g}")
                weights[engine] = {name: value.detach().clone() for name, value in policy.state_dict().items()}
                offline_points[engine] = record(policy, "offline", engine, beta, time.time() - clock)
                del policy
            if "preftune" in weights and "trl" in weights:
                offline_points["preftune"]["max_weight_difference"] = max_weight_difference(weights["preftune"],
                                                                                           weights["trl"])
                write_outputs(results, output)
        if "iterative" in args.methods:
            clock = time.time()
            out = work / f"iterative_beta{beta:g}"
            policy, rounds = train_iterative(model_dir, train_prompts, beta, settings, out)
            record(policy, "iterative", "preftune", beta, time.time() - clock, rounds=rounds)
        if "online" in args.methods:
            clock = time.time()
            policy, training = train_online(model_dir, tokenizer, online_prompts, beta, settings)
            record(policy, "online", "preftune", beta, time.time() - clock, online=training)

    results["seconds"] = time.time() - started
    write_outputs(results, output)
    logger.info("done in %.0f s: %s", time.time() - started, output / "frontier.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
