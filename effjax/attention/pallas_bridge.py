"""Bridge from the dispatch point to the Pallas kernels in `kernels_pallas/`.

Placeholder until the kernels land: it reports that Pallas cannot serve the call, so the dispatcher
falls back (or raises in strict mode).
"""
from __future__ import annotations

from effjax.attention import dispatch


def pallas_attention(q, k, v, spec, *, scale, softcap, interpret, strict):
  reason = "the Pallas kernels are not built yet"
  if strict:
    raise ValueError(f"impl='pallas' cannot serve this call: {reason}; use impl='xla'")
  dispatch._warn_once(f"attention: falling back from pallas: {reason}")
  return None
