"""`/v1/feedback`, `/v1/feedback/implicit`, `/v1/rankings` and `/v1/feedback/export`."""
