"""Medusa (Cai et al. 2024): extra decoding heads, candidate trees, tree-attention decoding, training."""
from effjax.medusa.decode import (MedusaOutput, TypicalParams, compact_cache, decode_metrics,
                                  generate, typical_accept)
from effjax.medusa.heads import (HeadsConfig, MedusaHeads, apply_heads, check_compatible,
                                 infer_config, init_heads)
from effjax.medusa.tree import (DEFAULT_CHOICES, MedusaTree, best_tree, default_tree,
                                rank_accuracy_from_topk, validate_choices)
from effjax.medusa.tune import tune_tree

__all__ = ["DEFAULT_CHOICES", "HeadsConfig", "MedusaHeads", "MedusaOutput", "MedusaTree",
           "TypicalParams", "apply_heads", "best_tree", "check_compatible", "compact_cache",
           "decode_metrics", "default_tree", "generate", "infer_config", "init_heads",
           "rank_accuracy_from_topk", "tune_tree", "typical_accept", "validate_choices"]
