"""Speculative decoding: a small draft LM proposes, the target LM verifies (issue 5).

`speculative_generate` runs the whole loop in one jit; `verify` holds the acceptance math; `metrics`
turns the loop's counters into TAR, tau, alpha and predicted speedups; `view` renders each round's
accepted, rejected and corrected tokens for a terminal or an HTML page.
"""
from effjax.speculative.decode import (RoundRecord, SpecMetrics, SpecOutput, check_pair,
                                       lm_forward, predicted_speedup, run_loop,
                                       speculative_generate)
from effjax.speculative.verify import (VerifyResult, acceptance_rate, residual_distribution,
                                       verify_greedy, verify_sampled)

__all__ = ["RoundRecord", "SpecMetrics", "SpecOutput", "VerifyResult", "acceptance_rate",
           "check_pair", "lm_forward", "predicted_speedup", "residual_distribution", "run_loop",
           "speculative_generate", "verify_greedy", "verify_sampled"]
