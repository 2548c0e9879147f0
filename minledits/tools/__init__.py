"""Tools for comparing and studying edits: trace (every step's tensors and a picture of them), sweep (a grid of
settings on one inversion), compare (the methods side by side), metrics (PSNR, SSIM, CLIP scores), ranks
(torchrun)."""
