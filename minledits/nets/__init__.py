"""The networks, named like the official diffusers / transformers keys so that the weights load as they are:
layers (the shared blocks and attention), unet, vae, clip (the text encoders), tokenizer (CLIP's BPE), and
clipvision (CLIP's image tower, for the metrics)."""
