"""Saving quantized models: the fake-quant Hugging Face checkpoint, the integer quantization state, and
packed checkpoints (compressed-tensors, GPTQ) built from them."""
