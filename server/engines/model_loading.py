"""The transformers engine's model, loaded (torch): device and dtype, the served model with its
tokenizer and scheduler, and checked weights for a hot swap or a canary. Weights and config are
loaded from the bytes that were hashed (``flywheel.checkpoints.CheckpointReader``), never from
the files again after their check.

One loader for both places the model runs: the decode thread in the API process
(``thread_core.py``) and the engine process (``engine_core.py``).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

import safetensors.torch
import torch
from transformers import (
    CONFIG_MAPPING,
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoTokenizer,
    GenerationConfig,
)

from flywheel.checkpoints import CheckpointReader
from server.engines.adapters import attach, read_adapter
from server.engines.core_protocol import CoreConfig, CoreInfo
from server.engines.cpu_linear import pack_linears
from server.engines.decode_threads import DecodeThreads
from server.engines.scheduler import Deliver, Scheduler

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU, bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def decode_threads(device: torch.device, requested: int | None,
                   own_process: bool = False) -> DecodeThreads | None:
    """Intra-op threads for the decode thread on CPU (None: leave torch's setting alone).

    In-process, the event loop, HTTP handling and database calls share the process with
    decoding. With as many OpenMP threads as cores, every one of their turns stalls an OpenMP
    barrier in the forward pass; on a 2-core machine we measured the HTTP throughput drop
    tenfold. One core stays theirs. In an engine process of its own the API's turns are short and
    few: there the decode thread measures both, one core less and every core, per batch size
    (``decode_threads.py``; on 2 cores, timed against one thread: 1.09x the tokens/s at 16
    streaming clients on a 28M Llama, 0.98x on the demo model; docs/benchmarks.md).
    """
    if device.type != "cpu":
        return None
    if requested is not None:
        return DecodeThreads([max(1, requested)])
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    fewer = max(1, (cores or 1) - 1)
    return DecodeThreads([fewer, cores or 1] if own_process else [fewer])


@dataclass(frozen=True)
class WeightLoader:
    """Loads checkpoints as the served model was loaded, checked against it."""

    device: torch.device
    dtype: torch.dtype
    vocab_size: int
    eos_token_ids: tuple[int, ...]

    def load_checked(self, path: str, sha256: str | None = None) -> Any:
        return load_checked(path, self.device, self.dtype, self.vocab_size, self.eos_token_ids,
                            sha256)


def open_scheduler(config: CoreConfig,
                   deliver: Deliver | None = None) -> tuple[Scheduler, CoreInfo, WeightLoader]:
    """Load ``config.model_path`` and its tokenizer into a scheduler (not yet started), with what
    the serving side must know of the model and the loader of later weights."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(config.model_path)
    model = load_model(config.model_path, device, dtype, config.sha256)
    eos = eos_token_ids(config.model_path, model.config, tokenizer)
    pad = tokenizer.pad_token_id
    info = CoreInfo(
        max_model_len=int(config.max_model_len or model.config.max_position_embeddings),
        eos_token_ids=eos,
        vocab_size=model.get_input_embeddings().num_embeddings,
        pad_token_id=pad if pad is not None else (eos or (0,))[0],
        tokenizer=tokenizer,
    )
    scheduler = Scheduler(
        model,
        config.policy_version,
        tokenizer,
        eos_token_ids=frozenset(() if config.ignore_eos else eos),
        pad_token_id=info.pad_token_id,
        max_batch_size=config.max_batch_size,
        stream_interval_s=config.stream_interval_ms / 1000.0,
        threads=decode_threads(device, config.cpu_threads, own_process=deliver is not None),
        deliver=deliver,
        fair_share=config.fair_share,
        max_batch_share=config.max_batch_share,
    )
    return scheduler, info, WeightLoader(device, dtype, info.vocab_size, eos)


def load_model(path: str, device: torch.device, dtype: torch.dtype,
               sha256: str | None = None) -> Any:
    """The causal LM at ``path`` for serving, built from its config's and weights' bytes as read
    and hashed once (one weight file's bytes at a time): with ``sha256``, the digest ``verify``
    checked, those are the checked files or nothing loads (``CheckpointError``). Evaluation
    mode on ``device``; on CPU its large linear layers through oneDNN (``cpu_linear.py``); a
    LoRA policy carries its adapter's factors (``adapters.py``) for a routed forward."""
    reader = CheckpointReader(path, sha256)
    data = json.loads(reader.read("config.json"))
    config = CONFIG_MAPPING[data["model_type"]].from_dict(data)
    state: dict[str, torch.Tensor] = {}
    for name in _weight_files(reader.names):
        state.update(_tensors(name, reader.read(name)))
    adapter = read_adapter(reader)
    reader.check()
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    return attach(pack_linears(model.to(device).eval()), adapter)


def _weight_files(names: list[str]) -> list[str]:
    """The weight files ``from_pretrained`` would read (shards too): safetensors where there
    are any, else PyTorch's."""
    top = [name for name in names if "/" not in name]
    safe = [name for name in top if fnmatch(name, "model*.safetensors")]
    return safe or [name for name in top if fnmatch(name, "pytorch_model*.bin")]


def _tensors(name: str, data: bytes) -> dict[str, torch.Tensor]:
    if name.endswith(".safetensors"):
        return safetensors.torch.load(data)
    loaded: dict[str, torch.Tensor] = torch.load(io.BytesIO(data), map_location="cpu",
                                                 weights_only=True)
    return loaded


def load_checked(path: str, device: torch.device, dtype: torch.dtype, vocab_size: int,
                 eos_token_ids: tuple[int, ...], sha256: str | None = None) -> Any:
    """Load new weights (held to ``sha256``, see ``load_model``) and prove they run before
    anything is handed to the decode thread."""
    model = load_model(path, device, dtype, sha256)
    vocab = model.get_input_embeddings().num_embeddings
    if vocab != vocab_size:
        raise ValueError(f"vocabulary size {vocab} differs from the served {vocab_size}")
    with torch.inference_mode():
        probe = torch.tensor([[eos_token_ids[0] if eos_token_ids else 0]])
        logits = model(input_ids=probe.to(device)).logits
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the new weights produce non-finite logits")
    return model


def eos_token_ids(path: str, config: Any, tokenizer: Any) -> tuple[int, ...]:
    """Every end-of-sequence id named by the generation config, model config or tokenizer."""
    ids: list[int] = []
    try:
        sources: list[Any] = [GenerationConfig.from_pretrained(path).eos_token_id]
    except OSError:
        sources = []
    sources += [getattr(config, "eos_token_id", None), tokenizer.eos_token_id]
    for source in sources:
        for token in source if isinstance(source, list | tuple) else [source]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return tuple(ids)
