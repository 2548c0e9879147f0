"""minledits: LEDITS (edit-friendly DDPM inversion + SEGA guidance) on Stable Diffusion, in plain PyTorch."""
