"""cbq-lightning: CBQ (Cross-Block Quantization) for LLMs as a PyTorch Lightning training loop."""

__version__ = "0.1.0"
