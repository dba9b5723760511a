"""The PPO step under ``accelerate launch``: two CPU ranks (gloo DDP) write a new policy."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from feedback_store.types import PreferenceGroup, RewardData
from flywheel.settings import PPOConfig, RewardConfig
from trainer_worker.ppo.core import masked_whiten
from trainer_worker.reward import train_reward_model

TINY_PPO = PPOConfig(steps=1, rollout_batch_size=4, ppo_epochs=1, num_minibatches=1,
                     max_new_tokens=8, lr=1e-3, critic_lr=1e-3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_whitening_over_two_shards_matches_one_process_on_the_union() -> None:
    """Two threads stand in for two ranks; ``reduce_sum`` adds what both put in."""
    torch.manual_seed(0)
    values, mask = torch.randn(4, 6), (torch.rand(4, 6) > 0.3).long()  # (B, T)
    shards = [(values[:1], mask[:1]), (values[1:], mask[1:])]  # unequal token counts
    barrier, slots, out = threading.Barrier(2), [torch.zeros(0)] * 2, [torch.zeros(0)] * 2

    def run(rank: int) -> None:
        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        out[rank] = masked_whiten(*shards[rank], reduce_sum=reduce_sum)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.allclose(torch.cat(out), masked_whiten(values, mask), atol=1e-6)


@pytest.mark.slow
def test_ppo_step_under_accelerate_launch(tiny_model_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(0)
    groups = [PreferenceGroup([rng.randrange(100, 160) for _ in range(4)],
                              [[rng.randrange(100, 160) for _ in range(5)] for _ in range(2)],
                              "ranking") for _ in range(4)]
    train_reward_model(tiny_model_dir, RewardData(groups=groups),
                       RewardConfig(epochs=1), tmp_path / "rm",
                       progress=False)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps([rng.randrange(100, 160) for _ in range(5)]) + "\n"
                               for _ in range(8)))
    config = tmp_path / "flywheel.yaml"
    config.write_text(yaml.safe_dump({"ppo": TINY_PPO.model_dump()}))
    out = tmp_path / "policy"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    # ``--cpu --num_processes 2`` would start one process (accelerate wants mpirun for that);
    # ``--multi_gpu`` starts two under torchrun and ACCELERATE_USE_CPU picks gloo on the CPU.
    env |= {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()),
         "-m", "trainer_worker.ppo.distributed", "--policy", str(tiny_model_dir),
         "--ref", str(tiny_model_dir), "--reward", str(tmp_path / "rm"),
         "--prompts", str(prompts), "--out", str(out), "--config", str(config)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["ppo/processes"] == 2  # really DDP over two ranks, not one process
    assert metrics["ppo/steps"] == 1 and metrics["ppo/updates"] == 1
    for name in ("config.json", "generation_config.json", "model.safetensors",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    AutoModelForCausalLM.from_pretrained(out)  # a complete HF directory
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
