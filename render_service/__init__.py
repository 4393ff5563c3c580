"""bios render service: chat messages -> tokens, weights and per-token attribution."""
