"""Runners orchestrate the pieces below them; they never re-implement them."""
