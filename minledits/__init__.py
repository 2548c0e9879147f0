"""minledits: LEDITS (edit-friendly DDPM inversion + SEGA guidance) on Stable Diffusion, in plain PyTorch.

    sd = minledits.load("stable-diffusion-v1-5/stable-diffusion-v1-5")
    inv = minledits.invert(sd, "photo.jpg")
    w0 = minledits.edit(sd, inv, concepts=[minledits.Concept("glasses")])
    minledits.decode(sd, w0).save("edited.png")
"""
from .errors import InversionError, InversionFileError, LoadError, MinleditsError, SingleFileError
from .inversion import Inversion, InversionSettings, invert
from .io.load import load
from .ledits import EditStep, edit
from .model import StableDiffusion, decode
from .sega import Concept, Guidance, SegaParams, sega

__all__ = ["load", "StableDiffusion", "invert", "Inversion", "InversionSettings", "edit", "decode", "EditStep",
           "Concept", "sega", "SegaParams", "Guidance", "MinleditsError", "LoadError", "SingleFileError",
           "InversionError", "InversionFileError"]
