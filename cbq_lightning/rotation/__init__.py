"""Orthogonal rotations folded into the model before quantization (an extension of CBQ, ``rotation:``)."""
