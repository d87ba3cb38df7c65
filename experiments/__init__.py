"""Entry points: the only modules that define flags. All logic lives in `effjax`."""
