"""Speculative-decoding experiment configs (`python -m experiments.speculative --config=...`)."""
