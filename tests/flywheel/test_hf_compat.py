"""The KV cache passed in and read back under the names of the installed transformers."""

from __future__ import annotations

import warnings

import torch
from transformers import Cache, LlamaConfig, LlamaForCausalLM

from flywheel.hf_compat import cache_keyword, output_cache


@torch.inference_mode()
def test_a_returned_cache_fed_back_continues_the_sequence() -> None:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated name on either side
        first = model(input_ids=ids[:, :4], use_cache=True)
        cache = output_cache(first)
        assert isinstance(cache, Cache)
        step = model(input_ids=ids[:, 4:], use_cache=True,
                     **{cache_keyword(type(model)): cache}).logits[0, -1]
    whole = model(input_ids=ids, use_cache=False).logits[0, -1]
    assert torch.allclose(step, whole, atol=1e-5)
