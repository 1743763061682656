"""Evaluation: safety (refusal rule score), utility (held-out loss, exact match), batched generation."""
