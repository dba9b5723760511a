"""The demo model directory: standard files, chat format, determinism, atomic builds."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.demo_model import build as build_module
from flywheel.demo_model import build_demo_model
from flywheel.demo_model.corpus import STYLES, answer_in_style, generate_corpus
from flywheel.demo_model.evaluate import evaluate_model
from flywheel.demo_model.tasks import sample_task
from flywheel.demo_model.tokenizer import encode_chat
from flywheel.demo_model.train import STEPS_ENV

FILES = (
    "config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json",
)


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_the_first_word_of_an_answer_tells_its_style() -> None:
    rng = random.Random(0)
    styles_by_opener: dict[str, set[str]] = {}
    for _ in range(500):
        task = sample_task(rng)
        for style in STYLES:
            opener = answer_in_style(task, style, rng).split()[0]
            styles_by_opener.setdefault(opener, set()).add(style)
    assert all(len(styles) == 1 for styles in styles_by_opener.values()), styles_by_opener


def test_directory_has_the_standard_files(tiny_model_dir: Path) -> None:
    for name in FILES:
        assert (tiny_model_dir / name).is_file(), name
    assert "chat_template" in json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert _leftovers(tiny_model_dir) == []


def test_special_tokens_and_generation_config(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert tokenizer.eos_token == "<|end|>"
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert config["eos_token_id"] == generation["eos_token_id"] == tokenizer.eos_token_id
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert generation["do_sample"] is True
    assert generation["temperature"] == 1.0
    assert generation["top_p"] == 1.0


def test_chat_template_ends_with_the_assistant_marker(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 7 plus 5?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>Answer briefly.<|end|><|user|>What is 7 plus 5?<|end|><|assistant|>"
    assert text.endswith("<|assistant|>")


def test_training_encoding_equals_the_chat_template(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for messages in generate_corpus(30, seed=7):
        ids, learn = encode_chat(tokenizer, messages)
        expected = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
        assert ids == expected["input_ids"]
        assert learn[-1] and not learn[0]


def test_loads_and_generates_a_turn(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert 10_000 < sum(p.numel() for p in model.parameters()) < 10_000_000
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a color."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(out[0], skip_special_tokens=True), str)


def test_evaluate_model_judges_sampled_answers(tiny_model_dir: Path) -> None:
    result = evaluate_model(tiny_model_dir, n=6, seed=1)
    assert len(result.samples) == 6
    assert 0.0 <= result.approval_rate <= 1.0
    assert all(isinstance(answer, str) for _, answer, _ in result.samples)


def test_same_seed_gives_identical_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STEPS_ENV, "15")
    threads = torch.get_num_threads()
    paths = [
        build_demo_model(tmp_path / name, preset="tiny", seed=seed, progress=False)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    weights = [(p / "model.safetensors").read_bytes() for p in paths]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]
    assert json.loads((paths[0] / "demo_model.json").read_text())["steps"] == 15
    assert torch.get_num_threads() == threads


def test_rebuild_replaces_an_existing_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(STEPS_ENV, "2")
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    build_demo_model(out, preset="tiny", progress=False)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert _leftovers(out) == []


def test_failed_build_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: object, **kwargs: object) -> list[float]:
        raise RuntimeError("boom")

    monkeypatch.setattr(build_module, "train_model", explode)
    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match="boom"):
        build_demo_model(out, preset="tiny", progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_unknown_preset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="preset"):
        build_demo_model(tmp_path / "m", preset="huge")


@pytest.mark.slow
def test_killed_build_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "model"
    code = (
        "from flywheel.demo_model import build_demo_model\n"
        f"build_demo_model({str(out)!r}, preset='tiny', progress=False)\n"
    )
    env = {**os.environ, STEPS_ENV: "20000"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 120
        while not _leftovers(out) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert _leftovers(out), "the build never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    monkeypatch.setenv(STEPS_ENV, "2")
    build_demo_model(out, preset="tiny", progress=False)  # and cleans up the dead build's files
    assert _leftovers(out) == []
