"""What the logprobs Flywheel stores cost vLLM's engine, apart from any HTTP server.

    python bench/vllm_logprobs.py [--model DIR] [--batch 16] [--max-tokens 64] [--rounds 6]

Flywheel asks vLLM for the sampled token's logprob of every answer it serves (``logprobs=0``,
``flat_logprobs``: flywheel/vllm/params.py), to store it with the answer; vLLM's own server
computes none unless a request asks. This runs vLLM's offline engine (``vllm.LLM``, with the
engine arguments ``flywheel serve`` gives it) on ``--batch`` chat prompts at a time, every answer
``--max-tokens`` long, alternately with and without those logprobs, and prints tokens/s and the
CPU per token of the engine's processes, and the ratios. The first round warms up and is not
counted. Run it with the interpreter of ``scripts/vllm-venv.sh`` on CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serving import QUESTIONS, cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path(".flywheel/models/base"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batches", type=int, default=8, help="batches generated per round")
    args = parser.parse_args()
    os.environ.setdefault("FLYWHEEL_MODEL", str(args.model))
    os.environ.setdefault("FLYWHEEL_VLLM_KV_CACHE_BYTES", str(1 << 30))

    from vllm import LLM
    from vllm import SamplingParams as VLLMSamplingParams

    from flywheel.settings import Settings
    from flywheel.vllm.params import engine_args, sampling_kwargs
    from server.engines.base import SamplingParams

    llm = LLM(**engine_args(Settings(), on_cpu=True))
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in QUESTIONS]
    prompts = [prompts[i % len(prompts)] for i in range(args.batch)]
    served = sampling_kwargs(SamplingParams(max_tokens=args.max_tokens))
    variants = {
        "with Flywheel's logprobs": VLLMSamplingParams(**served, ignore_eos=True),
        "without logprobs": VLLMSamplingParams(**{**served, "logprobs": None,
                                                  "flat_logprobs": False}, ignore_eos=True),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    cpus: dict[str, list[float]] = {name: [] for name in variants}
    print(f"model {args.model}, batch {args.batch}, {args.max_tokens} tokens each")
    for round_ in range(args.rounds + 1):
        names = list(variants) if round_ % 2 == 0 else list(variants)[::-1]
        for name in names:
            cpu, start, tokens = cpu_seconds(os.getpid())[0], time.perf_counter(), 0
            for _ in range(args.batches):
                outputs = llm.generate(prompts, variants[name], use_tqdm=False)
                tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
            seconds, cpu = time.perf_counter() - start, cpu_seconds(os.getpid())[0] - cpu
            if round_ == 0:
                continue
            rates[name].append(tokens / seconds)
            cpus[name].append(1e5 * cpu / tokens)
            print(f"  round {round_}: {tokens / seconds:7.0f} tok/s, "
                  f"{1e5 * cpu / tokens:5.1f} CPU ms/100 tokens  {name}", flush=True)
    with_, without = variants  # the two names, in order
    ratios = sorted(a / b for a, b in zip(rates[with_], rates[without], strict=True))
    print(f"{with_} / {without}: {statistics.median(ratios):.3f}x tokens/s (median of "
          f"{len(ratios)} rounds, {ratios[0]:.3f}x to {ratios[-1]:.3f}x); CPU per token "
          f"{statistics.median(cpus[with_]) / statistics.median(cpus[without]):.3f}x")


if __name__ == "__main__":
    main()
