"""minledits: LEDITS (edit-friendly DDPM inversion + SEGA guidance) on Stable Diffusion, in plain PyTorch.

    sd = minledits.load("stable-diffusion-v1-5/stable-diffusion-v1-5")
    inv = minledits.invert(sd, "photo.jpg")
    w0 = minledits.edit(sd, inv, concepts=[minledits.Concept("glasses")])
    minledits.decode(sd, w0).save("edited.png")

Reading order (each file opens with its notation): schedule -> sampler -> inversion -> sega -> ledits, then the other
methods, leditspp (LEDITS++) and p2p (Prompt-to-Prompt), and for rectified flows (SD3, FLUX) flowmatch, flowedit
(FlowEdit) and rfinversion (RF-Inversion); model (what the methods call: predict, encode, decode) and
parity (what exists only to match a reference's rounding or to save work). The support sits below: nets/ (the
networks), io/ (models, inversion files, pictures), tools/ (traces, sweeps, comparisons, metrics), cli/ (the command).
"""
# ddim, dpmsolver and flowmatch add "ddim", "dpmsolver++" and "flow" to sampler.SAMPLERS
from . import ddim, dpmsolver, flowedit, flowmatch, ledits, leditspp, p2p, parity, rfinversion
from .errors import InversionError, InversionFileError, LoadError, MinleditsError, SingleFileError
from .inversion import Inversion, InversionSettings, invert
from .io.load import load
from .ledits import EditStep, edit
from .model import StableDiffusion, decode
from .sega import Concept, Guidance, SegaParams, sega

__all__ = ["load", "StableDiffusion", "invert", "Inversion", "InversionSettings", "edit", "decode", "EditStep",
           "Concept", "sega", "SegaParams", "Guidance", "MinleditsError", "LoadError", "SingleFileError",
           "InversionError", "InversionFileError", "ddim", "dpmsolver", "flowedit", "flowmatch", "ledits", "leditspp",
           "p2p", "parity", "rfinversion"]
