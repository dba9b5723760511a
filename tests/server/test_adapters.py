"""LoRA policies served as one base product plus each policy's low-rank difference
(``adapters.py``, ``routing.py``): read from the trainer's own checkpoints, checked against the
merged weights, and every row still on its own policy's weights."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from flywheel.checkpoints import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CheckpointReader
from flywheel.settings import PPOConfig
from server.engines.adapters import LowRank, adapter_of, difference, explains, read_adapter
from server.engines.base import SamplingParams
from server.engines.batch import PaddedBatch
from server.engines.model_loading import load_model
from server.engines.routing import RowRuns, _LowRankRouted, _Routed, routed
from tests.server.test_engine_canary import ask, engine_on
from tests.server.test_transformers_engine import chat, greedy_reference
from trainer_worker.ppo.causal_lm import add_lora, load_causal_lm, save_policy

CPU = torch.device("cpu")


def lora_policy(base: Path, dst: Path, seed: int) -> Path:
    """A LoRA policy on ``base`` as the trainer writes one (merged weights, the adapter beside
    them), its adapters' B matrices random so that it differs from the base."""
    torch.manual_seed(seed)
    policy = add_lora(load_causal_lm(base, "cpu"), PPOConfig(use_lora=True, lora_rank=4),
                      "CAUSAL_LM")
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    save_policy(policy, base, dst, use_lora=True)
    return dst


@pytest.fixture(scope="module")
def policies(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    return {"a": lora_policy(tiny_model_dir, root / "a", seed=1),
            "b": lora_policy(tiny_model_dir, root / "b", seed=2)}


def load(path: Path) -> torch.nn.Module:
    return load_model(str(path), CPU, torch.float32)


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.weight for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def test_the_adapter_read_explains_the_merged_weights(tiny_model_dir: Path,
                                                      policies: dict[str, Path]) -> None:
    base, policy = load(tiny_model_dir), load(policies["a"])
    factors = adapter_of(policy)
    assert adapter_of(base) == {}
    layers = {n for n in linear_weights(policy) if n.startswith("model.layers.")}
    assert set(factors) == layers  # every linear layer of the decoder, none else
    before, after = linear_weights(base), linear_weights(policy)
    for name, low_rank in factors.items():
        assert low_rank.rank == 4
        assert torch.allclose(after[name], before[name] + low_rank.weight(), atol=1e-6)
        assert not torch.allclose(after[name], before[name], atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_explains_takes_a_merge_and_rejects_any_change_beyond_its_rounding(
        dtype: torch.dtype) -> None:
    """Two rank-16 adapters on one 2,500 x 300 weight (three chunks of rows), merged in the
    weights' dtype as the trainer merges: their difference explains the one merged weight
    beside the other. Not: one small element moved by eight of its own roundings (well within
    a bound taken from its row's largest magnitude), an infinite weight, another adapter's
    difference."""
    generator = torch.Generator().manual_seed(0)

    def adapter() -> LowRank:
        return LowRank(torch.randn(16, 300, generator=generator) / 300 ** 0.5,
                       torch.randn(2500, 16, generator=generator) * 0.02)

    base = torch.randn(2500, 300, generator=generator) * 0.05
    a, b = adapter(), adapter()
    first, second = (base + a.weight()).to(dtype), (base + b.weight()).to(dtype)
    delta = difference(a, b)
    assert delta is not None and explains(second, first, delta)
    assert explains(first, first, None) and not explains(second, first, None)

    row = 2100  # in the third chunk
    magnitudes = second[row].float().abs()
    column = int((magnitudes - 0.05 * float(magnitudes.max())).abs().argmin())  # a small one
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    rounding = (eps * float(magnitudes[column] + first[row, column].float().abs())
                + delta.rank * eps32 * float(delta.up[row].abs() @ delta.down[:, column].abs()))
    moved = second.clone()
    moved[row, column] += 8 * rounding
    if dtype == torch.bfloat16:  # where the weights' rounding, not the product's, dominates
        assert 8 * rounding < eps * float(magnitudes.max())  # a bound per row would take it
    assert not explains(moved, first, delta)

    for weights in ((second.clone(), first), (second, first.clone())):
        weights[0][3, 5] = float("inf")
        weights[0][3, 6] += 1.0
        assert not explains(*weights, delta)
    assert not explains(second, first, difference(a, adapter()))


@pytest.mark.parametrize("change", [{"use_dora": True}, {"alpha_pattern": {"q_proj": 4}},
                                    {"modules_to_save": ["lm_head"]}])
def test_adapters_it_does_not_read_are_served_as_full_weights(
        policies: dict[str, Path], tmp_path: Path, change: dict[str, object]) -> None:
    copy = Path(shutil.copytree(policies["a"], tmp_path / "policy"))
    config = json.loads((copy / ADAPTER_CONFIG).read_text())
    (copy / ADAPTER_CONFIG).write_text(json.dumps({**config, **change}))
    assert read_adapter(CheckpointReader(copy, None)) == {}
    assert read_adapter(CheckpointReader(policies["a"], None)) != {}


@pytest.mark.parametrize("damage", ["json", "weights", "shape"])
def test_a_damaged_adapter_leaves_the_merged_weights_to_serve_alone(
        policies: dict[str, Path], tmp_path: Path, damage: str) -> None:
    copy = Path(shutil.copytree(policies["a"], tmp_path / "policy"))
    if damage == "json":
        (copy / ADAPTER_CONFIG).write_text("{not json")
    elif damage == "weights":
        weights = copy / ADAPTER_WEIGHTS
        weights.write_bytes(weights.read_bytes()[:100])
    else:  # factors of another model's width
        tensors = safetensors.torch.load_file(copy / ADAPTER_WEIGHTS)
        key = next(k for k in tensors if k.endswith("lora_A.weight"))
        tensors[key] = torch.zeros(tensors[key].shape[0], 7)
        safetensors.torch.save_file(tensors, copy / ADAPTER_WEIGHTS)
    model = load(copy)
    assert adapter_of(model) == {}
    ids = torch.tensor([[3, 4, 5]])
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, load(policies["a"])(input_ids=ids).logits)


def routed_kinds(model: torch.nn.Module) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for module in model.modules():
        kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + 1
    return kinds


@torch.inference_mode()
@pytest.mark.parametrize("first", ["base", "a"])
def test_each_row_decodes_on_its_own_lora_policy(tiny_model_dir: Path, policies: dict[str, Path],
                                                 first: str) -> None:
    parts = [load(tiny_model_dir if first == "base" else policies["a"]), load(policies["b"])]
    runs = RowRuns(len(parts), CPU)
    model = routed(parts, runs)
    kinds = routed_kinds(model)
    assert kinds.get("_LowRankRouted") == len(adapter_of(parts[1])) and "_Routed" not in kinds
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    for sizes in ([2, 1], [1, 2], [0, 3], [3, 0]):
        runs.set(sizes)
        batch, logits = PaddedBatch.prefill(model, prompts, pad_id=0)
        alone = [PaddedBatch.prefill(part, prompts[start:stop], pad_id=0)
                 for part, (start, stop) in zip(parts, runs.bounds, strict=True) if stop > start]
        assert torch.allclose(logits, torch.cat([lg for _, lg in alone]), atol=1e-5)
        busy = [part for part, size in zip(parts, sizes, strict=True) if size]
        for _ in range(3):
            batch.tokens = logits.argmax(-1, keepdim=True)  # (B, 1)
            row = 0
            for own, _ in alone:
                own.tokens = batch.tokens[row:row + own.size]
                row += own.size
            logits = batch.decode(model)
            own_logits = torch.cat([own.decode(part) for part, (own, _) in
                                    zip(busy, alone, strict=True)])
            assert torch.allclose(logits, own_logits, atol=1e-5)


@torch.inference_mode()
def test_half_precision_weights_that_differ_a_little_are_never_taken_as_equal(
        tiny_model_dir: Path, policies: dict[str, Path]) -> None:
    """In bfloat16 a small change is within a few roundings of the weights: still routed."""
    parts = [load_model(str(path), CPU, torch.bfloat16) for path in (tiny_model_dir,
                                                                     policies["b"])]
    with torch.no_grad():  # a full-weight policy: a small change on one layer, no adapter
        parts[1].model.layers[0].mlp.up_proj.weight.mul_(1.004)
    del parts[1].flywheel_adapter
    runs = RowRuns(2, CPU)
    model = routed(parts, runs)
    assert isinstance(model.model.layers[0].mlp.up_proj, _Routed)
    assert "_LowRankRouted" not in routed_kinds(model)


@torch.inference_mode()
def test_large_layers_through_onednn_take_their_low_rank_difference_too(tmp_path: Path) -> None:
    """Layers of ``cpu_linear.MIN_WEIGHT`` elements and more are packed for oneDNN
    (``PackedLinear``): the first model's packed product, then the difference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from server.engines.adapters import LowRank, attach
    from server.engines.cpu_linear import PackedLinear, pack_linears

    config = LlamaConfig(vocab_size=64, hidden_size=512, intermediate_size=512,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    policy = LlamaForCausalLM(config).eval()
    policy.load_state_dict(base.state_dict())
    factors = {}
    for name, module in policy.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            low_rank = LowRank(torch.randn(4, module.in_features) * 0.05,
                               torch.randn(module.out_features, 4) * 0.05)
            module.weight.add_(low_rank.weight())
            factors[f"model.layers.{name}"] = low_rank
    parts = [pack_linears(base), attach(pack_linears(policy), factors)]
    assert isinstance(parts[0].model.layers[0].mlp.up_proj, PackedLinear)
    runs = RowRuns(2, CPU)
    model = routed(parts, runs)
    assert isinstance(model.model.layers[0].mlp.up_proj, _LowRankRouted)
    runs.set([2, 1])
    ids = torch.tensor([[3, 4, 5, 6]] * 3)
    together = model(input_ids=ids, use_cache=False).logits
    alone = torch.cat([parts[0](input_ids=ids[:2], use_cache=False).logits,
                       parts[1](input_ids=ids[2:], use_cache=False).logits])
    assert torch.allclose(together, alone, atol=1e-4)


@torch.inference_mode()
def test_weights_the_adapter_does_not_explain_are_routed_whole(
        tiny_model_dir: Path, policies: dict[str, Path], tmp_path: Path) -> None:
    """A policy whose weights changed beyond its adapter (here one layer's, by hand) keeps the
    adapter where it explains the weights and full weights where it does not."""
    from transformers import AutoModelForCausalLM

    edited = Path(shutil.copytree(policies["b"], tmp_path / "edited"))
    model = AutoModelForCausalLM.from_pretrained(edited)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    model.save_pretrained(edited)
    parts = [load(policies["a"]), load(edited)]
    runs = RowRuns(2, CPU)
    model = routed(parts, runs)
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, _Routed)
    assert isinstance(model.model.layers[0].mlp.down_proj, _LowRankRouted)
    runs.set([1, 1])
    ids = torch.tensor([[3, 4, 5, 6]] * 2)
    together = model(input_ids=ids, use_cache=False).logits
    alone = torch.cat([p(input_ids=ids[:1], use_cache=False).logits for p in parts])
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.slow
async def test_a_lora_canary_serves_its_own_answers_beside_the_active_lora_policy(
        policies: dict[str, Path]) -> None:
    eng = await engine_on(policies["a"], ignore_eos=True)
    try:
        await eng.set_canary(str(policies["b"]), "policy-b")
        params = SamplingParams(max_tokens=16, temperature=0.0)
        arms = [False, True, False, True, False]
        results = await asyncio.gather(*(ask(eng, "Hello!", params, f"r{i}", canary)
                                         for i, canary in enumerate(arms)))
        for canary, result in zip(arms, results, strict=True):
            model = eng.canary_model if canary else eng.model  # type: ignore[attr-defined]
            assert result["ids"] == greedy_reference(model, chat(eng, "Hello!"), 16, ())
        assert results[0]["ids"] != results[1]["ids"]
        lanes = list(eng._core._scheduler._lanes)  # type: ignore[attr-defined]
        assert len(lanes) == 1 and "_LowRankRouted" in routed_kinds(lanes[0]._routing[1])
    finally:
        await eng.stop()
