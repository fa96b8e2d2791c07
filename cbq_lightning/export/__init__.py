"""Saving quantized models: the fake-quant Hugging Face checkpoint and the integer quantization state."""
