"""oneDNN linear layers (``cpu_linear.py``): the same logits, parameters and routing as before."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from server.engines import cpu_linear
from server.engines.cpu_linear import PackedLinear, pack_linears
from server.engines.routing import RowRuns, fusion_key, routed, routes_alike


@pytest.fixture(autouse=True)
def _small_weights_packed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT", 1)  # the test models' weights are small


def _llama(seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def test_packed_layers_give_the_plain_layers_logits() -> None:
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    plain = _llama(0)
    packed = pack_linears(copy.deepcopy(plain))
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 2 * 7 + 1
    assert fusion_key(packed) == fusion_key(plain)
    ids = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    with torch.inference_mode():
        want = plain(input_ids=ids).logits
        got = packed(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_packed_models_still_route_row_by_row() -> None:
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    models = [pack_linears(_llama(seed)) for seed in (0, 1)]
    runs = RowRuns(2, torch.device("cpu"))
    with torch.inference_mode():
        assert routes_alike(routed(models, runs), runs, models)


def test_other_dtypes_keep_their_layers() -> None:
    model = pack_linears(_llama(0, torch.float64))
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
