"""Distillation: divergence losses, students initialised from teacher layers, teacher-generated and
on-policy data, and the two experiments (speculative-decoding drafts; DistilBERT from MiniLM)."""
