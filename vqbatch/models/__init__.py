"""The networks of VQ-Diffusion: VQ-VAE, discrete diffusion transformer, learned classifier-free embeddings."""
