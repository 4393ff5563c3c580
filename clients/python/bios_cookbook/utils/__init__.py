"""Small helpers for inspecting training data."""
