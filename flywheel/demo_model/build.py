"""Building the demo model directory: corpus, tokenizer, training, an atomic save."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from flywheel.demo_model.corpus import generate_corpus
from flywheel.demo_model.tokenizer import ROLE_MARKERS, encode_chats, train_tokenizer
from flywheel.demo_model.train import (
    PRESETS,
    Preset,
    fixed_threads,
    make_batches,
    model_config,
    resolve_steps,
    train_model,
)
from flywheel.hf_progress import transformers_bars

INFO_NAME = "demo_model.json"
_BUILDING = ".building-"


def build_demo_model(
    out_dir: str | Path, *, preset: str = "demo", seed: int = 0, progress: bool = True
) -> Path:
    """Train the demo model and write it to ``out_dir`` as a Hugging Face directory.

    The directory is assembled under a temporary sibling name and renamed into place, so
    ``out_dir`` holds either the previous content or the complete new model, never half of one.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    tmp = out.parent / f".{out.name}{_BUILDING}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with fixed_threads(PRESETS[preset].threads):
            _build_into(tmp, PRESETS[preset], preset, seed, progress)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _build_into(tmp: Path, preset: Preset, name: str, seed: int, progress: bool) -> None:
    steps = resolve_steps(preset)
    conversations = generate_corpus(max(steps * preset.batch_size, 1), seed)
    texts = [m["content"] for conv in conversations[: preset.tokenizer_conversations] for m in conv]
    tokenizer = train_tokenizer(texts, preset.vocab_size, preset.max_positions)
    batches = make_batches(
        encode_chats(tokenizer, conversations), preset.batch_size, tokenizer.pad_token_id, seed
    )[:steps]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(preset, tokenizer))
    losses = train_model(model, batches, preset.lr, progress)
    _save(tmp, model, tokenizer, progress)
    info = {
        "preset": name, "seed": seed, "steps": len(batches),
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
    }
    (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")


def _save(
    tmp: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, progress: bool
) -> None:
    # Sample from the model's own distribution by default: PPO needs the true logprobs.
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=64,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with transformers_bars(progress):
        model.save_pretrained(tmp)
    # The template inside tokenizer_config.json, where every loader looks for it.
    tokenizer.save_pretrained(tmp, save_jinja_files=False)
    _write_compat_tokenizer_files(tmp, tokenizer)


def _write_compat_tokenizer_files(tmp: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    """Name the generic fast class and add special_tokens_map.json, for older loaders too."""
    config_path = tmp / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special = {
        "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
        "additional_special_tokens": list(ROLE_MARKERS.values()),
    }
    (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale_builds(out: Path) -> None:
    """Delete temporary directories left by builds of ``out`` whose process has died."""
    for path in out.parent.glob(f".{out.name}{_BUILDING}*"):
        pid = path.name.rsplit(_BUILDING, 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
