"""Samplers of the diffusion chain: one algorithm per file."""
