"""Attention: one dispatch point (`dot_product_attention`) and its mask description (`MaskSpec`)."""
from effjax.attention.dispatch import IMPLS, dot_product_attention, resolve_impl
from effjax.attention.mask import MASK_VALUE, MaskSpec

__all__ = ["IMPLS", "MASK_VALUE", "MaskSpec", "dot_product_attention", "resolve_impl"]
