"""``medusa bench``: Spec-Bench across decoding methods, and the step cost curve against tree size."""
