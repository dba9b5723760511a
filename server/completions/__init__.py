"""`/v1/chat/completions` and `/v1/completions`: OpenAI wire format over the engine."""
