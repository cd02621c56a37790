"""dit-scaling: the scaling study of Diffusion Transformers (Peebles & Xie, 2023), end to end."""
