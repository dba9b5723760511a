"""The whole loop on randomly initialised models of other families: serve, feedback, a training
cycle, the swap to its candidate. Qwen2 and Mistral with the demo's chat template; a GPT-2-style
model without any (text completions only)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

from feedback_store import Store
from flywheel.settings import PPOConfig, RewardConfig, Settings, TrainSettings
from server.app import create_app
from trainer_worker.cycle import CycleContext, run_cycle

pytestmark = pytest.mark.slow

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
FAMILIES: dict[str, tuple[Callable[..., PretrainedConfig], dict[str, Any], bool]] = {
    "qwen2": (Qwen2Config, SMALL, True),
    "mistral": (MistralConfig, {**SMALL, "sliding_window": None}, True),
    "gpt2": (GPT2Config, {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256}, False),
}
PROMPTS = [f"Question {i}: what do you think of the number {i}?" for i in range(12)]


def build(family: str, tokenizer_dir: Path, out: Path) -> Path:
    """A randomly initialised model of `family` with the demo model's tokenizer."""
    make, sizes, chat = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not chat:
        tok.chat_template = None
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    config = make(vocab_size=len(tok), **sizes, **ids)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    GenerationConfig(**ids).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _ask(client: TestClient, chat: bool, prompt: str) -> dict[str, Any]:
    if chat:
        body = {"messages": [{"role": "user", "content": prompt}], "n": 2, "max_tokens": 8}
        response = client.post("/v1/chat/completions", json=body)
    else:
        body = {"prompt": prompt, "n": 2, "max_tokens": 8}
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_loop_runs_on(family: str, tmp_path: Path, tiny_model_dir: Path,
                          sqlite_url: str) -> None:
    chat = FAMILIES[family][2]
    model = build(family, tiny_model_dir, tmp_path / family)
    settings = Settings(
        data_dir=tmp_path, database_url=sqlite_url, model=str(model), device="cpu",
        train=TrainSettings(device="cpu", eval_prompts=2, gate_samples=4, min_holdout_pairs=1,
                            reward_accuracy_floor=0.0, min_improvement=-1e9, kl_budget=1e9,
                            max_length_drift=1e9, max_eos_drift=1e9),
        ppo=PPOConfig(steps=1, rollout_batch_size=4, num_minibatches=1, ppo_epochs=1,
                      max_new_tokens=8),
        reward=RewardConfig(epochs=1, batch_size=4),
    )
    store = Store(sqlite_url)
    with TestClient(create_app(settings, store=store, watch=False)) as client:
        # 1. Serve and take feedback.
        for prompt in PROMPTS:
            answer = _ask(client, chat, prompt)
            assert answer["system_fingerprint"] == "policy-0"
            for index, rating in ((0, "up"), (1, "down")):
                assert client.post("/v1/feedback", json={
                    "completion_id": answer["id"], "choice_index": index,
                    "rating": rating}).status_code == 201
        assert store.holdout_prompt_count() > 0
        # 2. A training cycle: RM, PPO, gate.
        ctx = CycleContext(settings, store, "cpu", should_stop=lambda: False, progress=False)
        result = run_cycle(ctx, run_id=1)
        assert result.status == "succeeded", result.metrics
        candidate = store.get_policy(result.policy_id)
        # 3. The swap: the engine serves the candidate's weights.
        engine = client.app.state.flywheel.engine  # type: ignore[attr-defined]
        client.portal.call(engine.swap_weights, candidate["path"], candidate["id"])
        assert _ask(client, chat, PROMPTS[0])["system_fingerprint"] == candidate["id"]
    store.close()
