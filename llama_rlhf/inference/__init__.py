"""Inference: the engine (KV cache, prefill/decode), sampling, the solver_generate job and its scoring."""
