"""Policy versions and training runs: `/v1/policies`, `/v1/training/runs`."""
