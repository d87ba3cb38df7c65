"""Generation: sampling, the one-jit decoding engine and streaming."""
from effjax.generate.engine import (DecodeState, GenerateOutput, bucket_length, generate, prefill,
                                    project_logits)
from effjax.generate.sampling import (GREEDY, SamplingParams, logits_to_logprobs, logits_to_probs,
                                      sample, sample_from_probs)
from effjax.generate.streaming import StreamChunk, TokenStream, stream, stream_text

__all__ = ["DecodeState", "GREEDY", "GenerateOutput", "SamplingParams", "StreamChunk",
           "TokenStream", "bucket_length", "generate", "logits_to_logprobs", "logits_to_probs",
           "prefill", "project_logits", "sample", "sample_from_probs", "stream", "stream_text"]
