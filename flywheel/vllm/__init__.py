"""The vLLM adapter both the server's engine (``server/engines/vllm_engine.py``) and the
trainer's rollout engine (``trainer_worker/ppo/vllm_rollout.py``) use, so that neither imports
the other: one owner each for how vLLM is built (``bindings``, ``params``), how its weights are
swapped in place (``swap``) and the worker extension its CPU backend needs (``worker_ext``).

Nothing here imports vLLM at import time: ``bindings.load_vllm_bindings`` does, when an engine
starts (vLLM is an optional extra).
"""
