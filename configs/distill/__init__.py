"""Distillation experiment configs (`python -m experiments.distill --config=configs/distill/<name>.py`)."""
