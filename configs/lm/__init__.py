"""Language-model configs: `python -m experiments.train --config=configs/lm/<name>.py`."""
