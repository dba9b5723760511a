"""Policy version names: ``policy-0`` is the base model, ``policy-N`` the N-th trained policy.

At the bottom of the layers (docs/architecture.md) so that the store, both sides and the engines
name the base version with one constant.
"""

from __future__ import annotations

BASE_POLICY = "policy-0"  # the base model's version, recorded on first start and never pruned
