"""Data: the byte-level tokenizer, the embedded CPython-stdlib corpus, TFDS builders and grain pipelines."""
