"""The chat page for people at `/`: conversations, thumbs, rankings and implicit signals, all
through the public /v1 API."""
