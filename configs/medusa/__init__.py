"""Medusa head configs (`python -m experiments.train_medusa --config=configs/medusa/<name>.py`)."""
