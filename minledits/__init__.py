"""minledits: LEDITS (edit-friendly DDPM inversion + SEGA guidance) on Stable Diffusion, in plain PyTorch.

    sd = minledits.load("stable-diffusion-v1-5/stable-diffusion-v1-5")
    inv = minledits.invert(sd, "photo.jpg")
    w0 = minledits.edit(sd, inv, concepts=[minledits.Concept("glasses")])
    minledits.decode(sd, w0).save("edited.png")
"""
from .errors import MinleditsError
from .inversion import Inversion, invert
from .ledits import EditStep, decode, edit
from .load import LoadError, StableDiffusion, load
from .sega import Concept, Guidance, SegaParams, sega

__all__ = ["load", "StableDiffusion", "invert", "Inversion", "edit", "decode", "EditStep", "Concept", "sega",
           "SegaParams", "Guidance", "MinleditsError", "LoadError"]
