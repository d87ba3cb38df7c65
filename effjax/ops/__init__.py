"""Small compiled operations that XLA:CPU does slowly, as XLA FFI custom calls built on first use."""
