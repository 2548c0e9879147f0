"""minledits: LEDITS (edit-friendly DDPM inversion + SEGA guidance) on Stable Diffusion, in plain PyTorch.

    sd = minledits.load("stable-diffusion-v1-5/stable-diffusion-v1-5")
    inv = minledits.invert(sd, "photo.jpg")
    w0 = minledits.edit(sd, inv, concepts=[minledits.Concept("glasses")])
    minledits.decode(sd, w0).save("edited.png")
"""
from .inversion import Inversion, invert
from .ledits import EditStep, decode, edit
from .sega import Concept, Guidance, SegaParams, sega

try:  # the loader and the models land in their own modules
    from .load import StableDiffusion, load
except ImportError:  # pragma: no cover
    pass

__all__ = ["load", "StableDiffusion", "invert", "Inversion", "edit", "decode", "EditStep", "Concept", "sega",
           "SegaParams", "Guidance"]
