"""PPO settings that depend on the model: learning rates by size, precision by device.

The demo's rates (1e-4 policy, 3e-4 critic) move a ~2M-parameter model within a few steps; on a
real model they destroy it in one. Published PPO-for-LMs runs use 1e-6 to 3e-6 for the policy
and about 1e-5 for the critic from ~100M parameters up (N+ implementation details, Huang et al.
2024: 3e-6 at 1B-6.9B; OpenRLHF and veRL examples: actor 5e-7 to 1e-6, critic 9e-6 to 1e-5).
LoRA adapters start at zero on a frozen trunk and take about ten times the full-weight rate
(the peft and TRL LoRA recipes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from flywheel.settings import PPOConfig

log = logging.getLogger(__name__)

DEMO_MAX_PARAMS = 100_000_000  # below: the demo's rates; at or above: real-model rates
LARGE_PARAMS = 1_000_000_000  # from here the policy's rate drops to 1e-6
DEMO_RATES = (1e-4, 3e-4)  # (policy, critic): 1e-5 barely moved the 2M-param demo
MID_RATES = (3e-6, 1e-5)  # 100M-1B
LARGE_RATES = (1e-6, 1e-5)  # 1B and up
LORA_FACTOR = 10.0
SAFE_POLICY_LR = 1e-5  # a policy rate above this on a real model is the demo's, by mistake


@dataclass(frozen=True)
class Rates:
    policy: float
    critic: float


def count_parameters(model: nn.Module) -> int:
    """Every parameter, trainable or not (a LoRA policy is as large as its trunk)."""
    return sum(p.numel() for p in model.parameters())


def default_rates(n_params: int, use_lora: bool) -> Rates:
    """The policy and critic learning rates for a model of ``n_params`` parameters."""
    if n_params < DEMO_MAX_PARAMS:
        policy, critic = DEMO_RATES
    elif n_params < LARGE_PARAMS:
        policy, critic = MID_RATES
    else:
        policy, critic = LARGE_RATES
    if use_lora and n_params >= DEMO_MAX_PARAMS:
        policy, critic = policy * LORA_FACTOR, critic * LORA_FACTOR
    return Rates(policy, critic)


def learning_rates(cfg: PPOConfig, policy: nn.Module) -> Rates:
    """The configured rates, each defaulting by the policy's size; warns when a real model is
    about to train with the demo's."""
    n_params = count_parameters(policy)
    default = default_rates(n_params, cfg.use_lora)
    rates = Rates(cfg.lr if cfg.lr is not None else default.policy,
                  cfg.critic_lr if cfg.critic_lr is not None else default.critic)
    if n_params >= DEMO_MAX_PARAMS and not cfg.use_lora and rates.policy > SAFE_POLICY_LR:
        log.warning("PPO policy learning rate %.1e on a %.0fM-parameter model: that is the demo's "
                    "setting; real models use %.0e (unset FLYWHEEL_PPO__LR for the default)",
                    rates.policy, n_params / 1e6, default.policy)
    on_gpu = next(policy.parameters()).device.type == "cuda"
    if n_params >= DEMO_MAX_PARAMS and on_gpu and not torch.is_autocast_enabled("cuda"):
        log.warning("PPO on a %.0fM-parameter model in float32 on a GPU: twice the memory and "
                    "time of FLYWHEEL_PPO__DTYPE=auto (bf16 forward passes)", n_params / 1e6)
    return rates


def autocast_dtype(cfg: PPOConfig, device: str) -> torch.dtype | None:
    """The dtype of forward passes: bf16 on CUDA ("auto", when the GPU has it), else None (fp32).

    Weights and optimiser state stay fp32 (mixed precision): at policy rates of 1e-6 a bf16
    weight (8 significant bits) would round most updates away.
    """
    if cfg.dtype == "float32" or not str(device).startswith("cuda"):
        return None
    if cfg.dtype == "bfloat16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None
