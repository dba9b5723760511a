"""One training cycle of the worker, timed: reward model, PPO, evaluation, peak RSS.

The feedback is the simulated user's: answers sampled from the model, judged and ranked in
groups of four. Prints rollout tokens/s and training samples/s of PPO, the reward model's
held-out accuracy, the candidate's score gain and KL, and the peak RSS (target under 3 GiB with
the demo model). On a GPU machine, ``--device cuda --random-params 500e6`` runs the same cycle on
a randomly initialised Llama of about 0.5B parameters and reports peak GPU memory.

    python bench/ppo_cycle.py --model .flywheel/models/base
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
from flywheel.settings import PPOConfig, RewardConfig
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=".flywheel/models/base")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = Path(args.model).resolve()
    if not (model / "config.json").exists():
        build_demo_model(model)
    device = resolve_device(args.device)
    ppo, reward = PPOConfig(), RewardConfig()
    t0 = time.perf_counter()
    data, prompts = judged_groups(model, args.prompts, 4, args.seed)
    print(f"feedback: {len(data.groups)} ranked groups of 4 in {time.perf_counter() - t0:.1f}s")
    with tempfile.TemporaryDirectory() as tmp:
        rm_dir, policy_dir = Path(tmp) / "rm", Path(tmp) / "policy"
        t0 = time.perf_counter()
        rm = train_reward_model(model, data, reward, rm_dir, device=device, progress=False)
        rm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics = run_ppo(model, model, rm_dir, prompts, ppo, policy_dir, device=device,
                          progress=False)
        ppo_s = time.perf_counter() - t0
        held_out = prompts[: min(32, len(prompts))]
        new = evaluate_policy(policy_dir, model, rm_dir, held_out,
                              max_new_tokens=ppo.max_new_tokens, device=device)
        old = evaluate_policy(model, model, rm_dir, held_out,
                              max_new_tokens=ppo.max_new_tokens, device=device)
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"reward model: {rm_s:.1f}s, held-out accuracy {rm['reward/accuracy']:.2f} "
          f"on {int(rm['reward/holdout_pairs'])} pairs")
    print(f"ppo: {ppo.steps} steps x {ppo.rollout_batch_size} samples in {ppo_s:.1f}s; "
          f"rollout {metrics['ppo/rollout_tokens_per_s']:.0f} tokens/s, "
          f"training {metrics['ppo/samples_per_s']:.1f} samples/s ({device})")
    print(f"gate: score {old['eval/score_mean']:+.3f} -> {new['eval/score_mean']:+.3f}, "
          f"KL to base {new['eval/kl_ref']:.2f} nats")
    print(f"peak RSS {rss_gib:.2f} GiB (target < 3 GiB)")
    if device.startswith("cuda"):
        import torch

        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
