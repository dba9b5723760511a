"""A rollout engine kept across PPO runs (the worker's vLLM engine between cycles), with a
stand-in engine that holds its own copy of the weights, as vLLM does. tests/trainer_worker/
test_rollout_vllm_real.py keeps the real engine across runs."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from flywheel.settings import PPOConfig
from trainer_worker.ppo import TrainingInterrupted, run_ppo
from trainer_worker.ppo import trainer as ppo_trainer
from trainer_worker.ppo.causal_lm import load_causal_lm
from trainer_worker.ppo.rollout import Rollout, make_rollout
from trainer_worker.ppo.rollout_engines import KeptRollouts
from trainer_worker.reward.model import RewardModel

PPO = PPOConfig(steps=2, rollout_batch_size=4, max_new_tokens=6, ppo_epochs=1,
                num_minibatches=1, lr=1e-3, critic_lr=1e-3, rollout_engine="vllm")


class CopyEngine:
    """Samples from a copy of the policy it was opened with; `sync` copies the weights over."""

    opened: ClassVar[list[CopyEngine]] = []

    def __init__(self, policy: nn.Module, eos: Sequence[int], pad: int) -> None:
        self.model = copy.deepcopy(policy).eval()
        self.eos, self.pad = list(eos), pad
        self.synced: list[dict[str, torch.Tensor]] = []
        self.closed = False
        CopyEngine.opened.append(self)

    def sample(self, prompts: Sequence[Sequence[int]]) -> Rollout:
        assert not self.closed
        return make_rollout(self.model, prompts, max_new_tokens=PPO.max_new_tokens,
                            temperature=1.0, eos_token_ids=self.eos, pad_token_id=self.pad,
                            device="cpu", generator=torch.Generator().manual_seed(0))

    def sync(self, policy: nn.Module) -> None:
        state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        self.model.load_state_dict(state)
        self.synced.append(state)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> list[CopyEngine]:
    CopyEngine.opened = []

    def open_engine(cfg, settings, policy_dir, policy, *, eos_token_ids, pad_token_id, device,
                    generator):
        return CopyEngine(policy, eos_token_ids, pad_token_id)

    monkeypatch.setattr(ppo_trainer, "open_rollout_engine", open_engine)
    return CopyEngine.opened


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[list[list[int]], Path]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=True,
                                             add_generation_prompt=True, return_dict=False)
               for m in ("Hello!", "Name a color.", "What is 2 plus 3?", "Hi there.")]
    reward = tmp_path_factory.mktemp("kept") / "rm"
    RewardModel.from_base(tiny_model_dir, seed=1).save_pretrained(reward)
    return [list(p) for p in prompts], reward


def test_one_engine_serves_every_run_synced_to_each_runs_policy(
        stand_in: list[CopyEngine], setup: tuple[list[list[int]], Path], tiny_model_dir: Path,
        tmp_path: Path) -> None:
    prompts, reward = setup
    kept = KeptRollouts()
    first = run_ppo(tiny_model_dir, tiny_model_dir, reward, prompts, PPO, tmp_path / "p1",
                    progress=False, kept=kept)
    run_ppo(tmp_path / "p1", tiny_model_dir, reward, prompts, PPO, tmp_path / "p2",
            progress=False, kept=kept)
    (engine,) = stand_in  # opened once, left open between the runs
    assert kept.engine is engine and not engine.closed
    assert first["ppo/rollout_engine_start_seconds"] >= 0
    # Each run synced before each of its steps, the first sync to the weights it started from:
    # the second run's are the first run's output, not what the engine held.
    assert len(engine.synced) == 2 * PPO.steps
    start_of_second = load_causal_lm(tmp_path / "p1", "cpu").state_dict()
    synced = engine.synced[PPO.steps]
    assert all(torch.equal(synced[k], v) for k, v in start_of_second.items())
    kept.close()
    assert engine.closed and kept.engine is None


def test_a_failed_run_discards_the_engine_and_a_stopped_one_keeps_it(
        stand_in: list[CopyEngine], setup: tuple[list[list[int]], Path], tiny_model_dir: Path,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts, reward = setup
    kept = KeptRollouts()
    with pytest.raises(TrainingInterrupted):
        run_ppo(tiny_model_dir, tiny_model_dir, reward, prompts, PPO, tmp_path / "a",
                progress=False, kept=kept, should_stop=lambda: True)
    assert kept.engine is stand_in[0] and not stand_in[0].closed  # a stop is no fault

    def broken(prompts: Sequence[Sequence[int]]) -> Rollout:
        raise RuntimeError("engine core died")

    monkeypatch.setattr(stand_in[0], "sample", broken)
    with pytest.raises(RuntimeError, match="engine core died"):
        run_ppo(tiny_model_dir, tiny_model_dir, reward, prompts, PPO, tmp_path / "b",
                progress=False, kept=kept)
    assert stand_in[0].closed and kept.engine is None
    run_ppo(tiny_model_dir, tiny_model_dir, reward, prompts, PPO, tmp_path / "c",
            progress=False, kept=kept)
    assert len(stand_in) == 2 and kept.engine is stand_in[1]  # the next run opened a new one
    kept.close()


def test_hf_rollouts_are_never_kept(stand_in: list[CopyEngine],
                                    setup: tuple[list[list[int]], Path], tiny_model_dir: Path,
                                    tmp_path: Path) -> None:
    prompts, reward = setup
    kept = KeptRollouts()
    run_ppo(tiny_model_dir, tiny_model_dir, reward, prompts,
            PPO.model_copy(update={"rollout_engine": "hf"}), tmp_path / "p", progress=False,
            kept=kept)
    assert kept.engine is None
