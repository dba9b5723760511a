"""One settings tree, built once at start-up and passed down (env ``FLYWHEEL_*``, YAML)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


class RewardConfig(BaseModel):
    """Reward model: Bradley-Terry on rankings and thumbs pairs, logistic on lone thumbs."""

    model_config = ConfigDict(frozen=True)

    lr: float = 5e-5  # OAI-2019 RM learning rate; small models tolerate it
    epochs: int = 2  # few passes: InstructGPT saw RMs overfit after one epoch over correlated pairs
    batch_size: int = 16  # groups (one ranking = one group) per optimiser step
    pointwise_weight: float = 0.5  # weight of the logistic term for thumbs without a partner
    max_grad_norm: float = 1.0  # gradient clipping, as every reference does
    weight_decay: float = 0.0  # the trunk is small; decay only slows a few-step run
    max_length: int = 1024  # TRL RewardConfig default; longer sequences lose prompt tokens first
    seed: int = 0  # split, shuffling and head init are reproducible


class PPOConfig(BaseModel):
    """PPO on the policy (defaults from the InstructGPT, N+ implementation details and TRL
    references: each field's comment names its source)."""

    model_config = ConfigDict(frozen=True)

    kl_coef: float = 0.05  # per-token KL penalty to the frozen reference (N+, TRL)
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"  # unbiased log-ratio in the reward (OAI, TRL)
    adaptive_kl: bool = False  # Ziegler controller; off by default in most frameworks
    kl_target: float = 6.0  # target KL (nats per sequence) for the adaptive controller
    kl_horizon: int = 10_000  # adaptive controller horizon
    gamma: float = 1.0  # no discounting within an answer (every reference)
    lam: float = 0.95  # GAE lambda (OAI, N+, TRL, DeepSpeed-Chat)
    cliprange: float = 0.2  # policy ratio clip epsilon
    cliprange_value: float = 0.2  # value clip around the rollout values
    vf_coef: float = 0.1  # value-loss weight (N+, TRL); the critic has its own Adam group
    entropy_coef: float = 0.0  # no entropy bonus by default (every reference)
    missing_eos_penalty: float = 1.0  # subtracted from the RM score of answers that never stop
    ppo_epochs: int = 4  # passes over each rollout batch (OAI, N+, TRL)
    num_minibatches: int = 2  # minibatches per epoch
    rollout_batch_size: int = 32  # prompts x samples per PPO step
    steps: int = 8  # PPO steps (rollout + update) per training cycle
    # None: chosen by the policy's size (trainer_worker/ppo/defaults.py): 1e-4 / 3e-4 for the
    # ~2M-param demo (1e-5 barely moved it), 3e-6 / 1e-5 from 100M, 1e-6 / 1e-5 from 1B (N+, TRL).
    lr: float | None = None
    critic_lr: float | None = None  # the critic learns faster than the policy (references: ~10x)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA
    max_grad_norm: float = 1.0  # gradient clipping
    target_kl: float | None = 0.1  # stop the epochs of a step early past this approx KL
    max_new_tokens: int = 48  # rollout length bound
    temperature: float = 1.0  # sample rollouts from the policy as served
    whiten_rewards: bool = False  # TRL default; advantages are whitened regardless
    use_lora: bool = False  # peft LoRA adapters for large models
    lora_rank: int = 16  # LoRA rank when use_lora
    lora_alpha: int = 32  # alpha = 2 x rank, the usual peft scaling
    seed: int = 0  # prompt order, sampling and minibatch order are reproducible
    # Who samples rollouts: "hf" (the trainer's own model, Hugging Face generate-style) or
    # "vllm" (a vLLM engine in the worker, synced to the policy each step; the vllm extra).
    rollout_engine: Literal["hf", "vllm"] = "hf"
    # Truncated importance sampling cap C for vLLM rollouts: per-token weights
    # min(pi_trainer / pi_vllm, C). 2 is the value of the TIS paper (Yao et al. 2025) and of
    # veRL's and OpenRLHF's examples; above 1, as a cap of 1 or less shrinks on-policy tokens too.
    tis_cap: float = Field(default=2.0, gt=1.0)
    # vLLM's share of GPU memory beside the trainer on the same GPU (CPU: the KV cache is sized
    # in bytes by vllm_kv_cache_bytes instead). The trainer keeps the rest for the update.
    rollout_gpu_memory_utilization: float = Field(default=0.3, gt=0.0, lt=1.0)


class TrainSettings(BaseModel):
    """When and how the worker trains, and the offline gate that picks canaries."""

    min_new_feedback: int = 64  # feedback events that trigger a cycle
    poll_seconds: float = 2.0  # how often the worker looks for new feedback
    eval_prompts: int = 32  # distinct held-out prompts the gate samples answers to
    gate_samples: int = 128  # answers per policy the gate compares, at least (several per prompt)
    kl_budget: float = 10.0  # nats per answer: candidates further from the base are rejected
    min_improvement: float = 0.0  # lower 95% bound of the paired RM score gain must exceed it
    reward_accuracy_floor: float = 0.55  # RM unused unless held-out accuracy's lower bound beats it
    # Held-out pairs before a reward model is trained at all. Twelve: 10 of 12 right already
    # clears a floor of 0.55 (Wilson), so a small group's first model is judged soon; the floor,
    # not this count, keeps weak models out (a lower bound is as strict at 12 pairs as at 24).
    min_holdout_pairs: int = 12
    max_length_drift: float = 0.5  # relative change of mean answer length allowed per cycle
    max_eos_drift: float = 0.2  # absolute change of the EOS rate allowed per cycle
    keep_checkpoints: int = 3  # newest checkpoints kept on disk besides the active one
    lock_ttl_seconds: float = 30.0  # leader lock lifetime, renewed at a third of it
    device: str = "auto"  # "cpu", "cuda" or "auto"


class FeedbackLimits(BaseModel):
    """How much feedback a cycle reads, how much one identity may weigh, how fast it may post."""

    model_config = ConfigDict(frozen=True)

    new_examples: int = Field(default=20_000, ge=1)  # newest events since the RM in service
    # read per cycle: tens of MB of token ids at most, minutes of RM training on one GPU
    replay_examples: int = Field(default=4_000, ge=0)  # older events sampled back each cycle
    # against forgetting: a fifth of the new budget (replay ratios of 10-50% in continual RLHF)
    holdout_examples: int = Field(default=2_000, ge=1)  # held-out events the RM is judged on:
    # the 95% interval of an accuracy near 0.7 is then +/- 2 points
    user_share: float = Field(default=0.1, gt=0.0, le=1.0)  # most of a cycle's RM data one
    # identity may give (with fewer than 1/share identities: equal shares)
    disagreeing_weight: float = Field(default=0.1, ge=0.0, le=1.0)  # loss weight of identities
    # whose agreement with the RM in service is significantly below chance (inverted raters)
    implicit_weight: float = Field(default=0.0, ge=0.0, le=1.0)  # loss weight of an implicit
    # signal (copy: a weak up; regenerate, edit: a weak down) as a lone thumb in the RM's data;
    # 0: not trained on (the default). Weak evidence: a user regenerates good answers too.
    rate_per_minute: float = Field(default=0.0, ge=0.0)  # feedback posts per identity and
    # replica; 0: no limit (the default, and `flywheel up`)
    rate_burst: int = Field(default=30, ge=1)  # posts an identity may send at once

    @model_validator(mode="after")
    def _replay_within_budget(self) -> FeedbackLimits:
        if self.replay_examples > self.new_examples:
            raise ValueError(
                f"feedback.replay_examples ({self.replay_examples}) is larger than the cycle's "
                f"new data (feedback.new_examples = {self.new_examples}): older feedback would "
                "outweigh what users said since the last cycle")
        return self


class CanarySettings(BaseModel):
    """Live rollout: a new version serves a share of users until their thumbs decide it."""

    model_config = ConfigDict(frozen=True)

    auto: bool = False  # a candidate that passes the gate starts as a canary (on in `flywheel up`)
    fraction: float = Field(default=0.2, gt=0.0, lt=1.0)  # share of new requests on the canary
    min_ratings: int = 100  # thumbs per arm before any decision: the CLT needs a few dozen
    margin: float = 0.02  # promote when the canary is at most this much worse (approval points)
    alpha: float = 0.05  # error rate of each decision, valid under continuous monitoring
    max_hours: float = 24.0  # no decision by then: the canary ends, the active version stays
    # An undecided canary gives way to a newer waiting candidate (it goes on canary next) once
    # each arm has `supersede_after` x min_ratings counted thumbs while they show a gain under
    # `supersede_gain`, and from `supersede_always_after` x min_ratings whatever they show (0:
    # never). A small gain takes many thumbs to decide, and better candidates trained on more
    # feedback should not wait behind it; a clear gain keeps its place (approval.GiveWay).
    supersede_after: float = Field(default=1.0, ge=0.0)
    supersede_gain: float = Field(default=0.05, ge=-1.0, le=1.0)
    supersede_always_after: float = Field(default=3.0, ge=0.0)

    auto_rollback: bool = False  # roll back when a stored version beats the active (on in `up`)
    min_rollback_ratings: int = 100  # thumbs a version needs before it can be called better
    # What a canary assigns to an arm: "request" (every rater sees both arms and the judge
    # compares them within raters: a handful of raters can decide), "user" (sticky per rater: a
    # crowd's experience never flips), or "auto": per request below `sticky_raters` raters
    # among the last RECENT_THUMBS thumbs, sticky from there.
    unit: Literal["auto", "request", "user"] = "auto"
    sticky_raters: int = Field(default=200, ge=1)
    # The worker re-pools every version's thumbs across raters (`live.pooled`, `best`, the
    # rollback alarm) at most this often, when new thumbs came: one scan of the rated answers.
    pool_seconds: float = Field(default=300.0, gt=0.0)
    # The worker's judge decides the canary, releases waiting candidates, pools and rolls back
    # this often, in a thread of its own, whether or not a training cycle runs.
    judge_seconds: float = Field(default=1.0, gt=0.0)


class Settings(BaseSettings):
    """Everything a Flywheel process needs; the public names are in docs/operations.md."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    data_dir: Path = Path(".flywheel")
    database_url: str = ""  # default: sqlite:///<data_dir>/flywheel.db
    redis_url: str = ""  # default: embedded Redis under `flywheel up`; none for `serve`
    redis_namespace: str = "flywheel"  # prefix of every Redis key and channel
    model: str = ""  # default: <data_dir>/models/base (the demo model)
    served_model_name: str = "flywheel"
    engine: Literal["transformers", "vllm"] = "transformers"
    device: str = "auto"  # "cpu", "cuda", "cuda:1" or "auto"
    dtype: str = "auto"  # "float32", "bfloat16", "float16" or "auto" (fp32 on CPU, bf16 on GPU)
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: str = ""  # comma-separated bearer keys; empty: no auth
    admin_key: str = ""
    # Keys of app backends that vouch for their end users: each `user` they send is a rater of
    # its own. Every other key's users together count as one rater (feedback_store.types.Rater).
    trusted_keys: str = ""
    checkpoint_dir: Path | None = None  # default: <data_dir>/checkpoints
    max_batch_size: int = 32  # sequences decoded together by the transformers engine
    # The transformers engine decodes in a process of its own, off the API's GIL; None: on CPU
    # (1.5x the tokens/s at 16 streaming clients, bench/serving.py), in-process on GPU (unmeasured).
    engine_process: bool | None = None
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    stream_interval_ms: float = 0.0  # coalesce stream deltas produced within this window
    # A server whose event loop has not turned for this long exits 70 so that its supervisor
    # restarts it (server/watchdog.py); 0 turns the watchdog off.
    watchdog_seconds: float = Field(default=60.0, ge=0.0)
    gpu_memory_utilization: float = 0.85  # vLLM only
    # vLLM only: the KV cache in bytes. None: 1 GiB on CPU (its backend would otherwise reserve
    # gpu_memory_utilization x RAM, which fails beside other processes), that share on GPU.
    vllm_kv_cache_bytes: int | None = Field(default=None, gt=0)
    vllm_cache_dir: Path | None = None  # vLLM's compile cache (VLLM_CACHE_ROOT); <data_dir>/vllm
    vllm_enforce_eager: bool = False  # no torch.compile: starts in seconds, not a minute (CPU)
    max_request_bytes: int = 2 * 1024 * 1024  # request bodies above this get 413, unread
    max_waiting_requests: int = 256  # admitted but not yet decoding; beyond it 429 + Retry-After
    # A request's line and headers must arrive within this of the connection's start (or of its
    # previous response), its body within this between chunks: slow senders hold no sockets.
    header_timeout_s: float = Field(default=10.0, gt=0.0)
    body_timeout_s: float = Field(default=30.0, gt=0.0)
    # Most tokens one request may ask for: prompts x n x max_tokens (as resolved); costlier
    # requests get 400. 64k: a full 32k-context answer twice over, or 16 prompts x n=8 x 512.
    max_request_tokens: int = Field(default=65_536, ge=1)
    # Each key (each client address without keys) gets a share of the queue and of the batch,
    # and waiting requests are taken round robin by key (server/shares.py,
    # server/engines/fair_queue.py); off: one FIFO queue, as before.
    fair_share: bool = True
    # Requests one key may have waiting; None: max_waiting_requests less an eighth kept for
    # newcomers, split between the keys with requests waiting (at least 1 each): 224 for a key
    # alone by default, 112 each for two.
    max_waiting_per_key: int | None = Field(default=None, ge=1)
    # Transformers engine: most of the batch one key's rows may take while other keys are active
    # (a newcomer's request joins within a few steps, not after a flood's longest answer).
    max_batch_share: float = Field(default=0.75, gt=0.0, le=1.0)
    stream_write_timeout_s: float = 30.0  # a stream reader this slow to take a chunk is dropped
    # Host names answered (server/browser_guard.py); "": the loopback names and the bind address
    # without keys, any with keys; "*": any (behind a proxy that checks them).
    allowed_hosts: str = ""
    # Origins besides the server's own from which a browser may change anything; "*": any.
    allowed_origins: str = ""
    expose_docs: bool | None = None  # /docs, /openapi.json; None: open only when no keys are set
    expose_metrics: bool | None = None  # /metrics; None: open only when no keys are set
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"  # json: one object per line, for log shippers

    train: TrainSettings = Field(default_factory=TrainSettings)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    canary: CanarySettings = Field(default_factory=CanarySettings)
    feedback: FeedbackLimits = Field(default_factory=FeedbackLimits)

    @model_validator(mode="after")
    def _derive_defaults(self) -> Settings:
        data_dir = self.data_dir
        derived: dict[str, object] = {}
        if not self.database_url:
            derived["database_url"] = f"sqlite:///{(data_dir / 'flywheel.db').resolve()}"
        if not self.model:
            derived["model"] = str((data_dir / "models" / "base").resolve())
        if self.checkpoint_dir is None:
            derived["checkpoint_dir"] = (data_dir / "checkpoints").resolve()
        if self.vllm_cache_dir is None:
            derived["vllm_cache_dir"] = (data_dir / "vllm").resolve()
        for key, value in derived.items():
            object.__setattr__(self, key, value)
        return self

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @property
    def trusted_key_list(self) -> list[str]:
        return [k.strip() for k in self.trusted_keys.split(",") if k.strip()]


    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("FLYWHEEL_CONFIG")
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)


def load_settings(config_file: str | Path | None = None, **overrides: object) -> Settings:
    """Build the settings tree: explicit overrides, then environment, then the YAML file."""
    if config_file is not None:
        os.environ["FLYWHEEL_CONFIG"] = str(config_file)
    return Settings(**overrides)  # type: ignore[arg-type]
