"""Perplexity evaluation with the GPTQ / OmniQuant / CBQ protocol."""
