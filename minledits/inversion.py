"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov & Michaeli), with LEDITS' semantics.

Notation (code name -> symbol); sampler symbols as in sampler.py
    x        x_0               the image, in [-1, 1]
    w0       w_0 = f E(x)      its latent: scaled posterior mean of the VAE encoder (f = scaling factor)
    xts[j]   x_{tau_k}         noisy latent at tau_k, k = skip + j, drawn independently by the sampler's add_noise:
                               sqrt(abar) w0 + sqrt(1 - abar) eps_k  (eps_k ~ N(0, I), not a trajectory); for
                               dpmsolver++ alpha_k w0 + sigma_k eps_k (its own float32 scalars, as the scheduler's)
    xts[-1]  w_0
    out      eps(x_t, t)       noise estimate; with a source prompt: eps_u + s_src (eps_src - eps_u)
                               (for a v-prediction model: the same on v, converted to eps by the sampler)
    zs[j]    z_k               the noise map that makes the sampler's step land exactly on the next latent:
                               z_k = noise_map(k, x_{tau_k}, x_{tau_{k+1}}, out) = (x_{tau_{k+1}} - mu_k) / sigma_k;
                               dpmsolver++: (x_{tau_{k+1}} - mu_k) / C_k, its mu_k second order from k = skip + 1
                               on (with D_{k-1}: the maps follow one another); the last zero_noise_steps maps
                               are 0 (1; 3 for SDXL with dpmsolver++, as LEditsPPPipelineStableDiffusionXL)
                               unless keep_last_noise (then dpmsolver++'s grid ends at sigma_min: see invert)
sampler="ddim", deterministic DDIM inversion (diffusers' DDIMInverseScheduler), a trajectory instead:
    xts[j]   x_{tau_k}         unstep(k, x_{tau_{k+1}}, out(x_{tau_{k+1}}, tau_k)) for k = N-1 down to skip, from
                               x_{tau_N} = w0: each latent from the next cleaner one, the model run at the cleaner
                               latent and tau_k (ddim.py), so the UNet runs N - skip times one after the other
    zs[j]    z_k               0: the DDIM step injects no noise; the edit regenerates from xts[0] alone
                               (keep_last_noise and zero_noise_steps have no meaning and are refused)
sampler="flow" (a rectified flow, SD3 and FLUX: flowmatch.py), the same trajectory: x_k = unstep(k, x_{k+1}, v) =
x_{k+1} + (sigma_k - sigma_{k+1}) v, v the (guided) velocity at (x_{k+1}, T sigma_{k+1}), the ODE run forward;
its timesteps T sigma_k are float32 numbers (FLUX's shifted for the latent's size: Inversion.new_sampler).
Regenerating it returns w_0 only up to Euler's first-order error (flowmatch.py says what holds exactly)
An RF-Inversion (rfinversion.py: settings.gamma set) has this layout; only rfinversion.edit takes it (check_model)
Index convention: k counts the N inference steps from the noisiest (k = 0); the edit starts at k = skip,
so an Inversion keeps only k >= skip (xts[j], zs[j] belong to k = skip + j) and the UNet never runs for
the steps the edit does not use. The noise eps_k is drawn for every k in ascending t from one generator,
so a larger skip gives the same tensors, sliced.

sampler="dpmsolver++" is the inversion of diffusers' LEditsPPPipelineStableDiffusion (docs/references.md maps its
num_inversion_steps and skip fraction to our steps and skip); the batching and the pipeline's recurrence at
batch_size 1 are parity.batches and parity.feeds_back.
"""
import math
from dataclasses import asdict, dataclass, replace

import torch

from . import parity
from .errors import InversionError, MinleditsError, shorten
from .io.image import to_tensor
from .model import StableDiffusion, StableDiffusionXL, repeat_rows, rows
from .sampler import SAMPLERS, Sampler, numbers, takes

BATCH_SIZE = 4  # inversion timesteps per UNet call (docs/benchmarks.md)


@dataclass(frozen=True)
class InversionSettings:
    """Everything besides the model and the image that decides an inversion's tensors."""
    steps: int = 100              # N
    skip: int | None = None       # steps skipped at the noisy end (more keeps more of the input); None: the
                                  # sampler's method's default for these steps (sampler.default_skip)
    seed: int = 0                 # of the noise eps_k
    size: int = 512               # side in pixels (the longest side with keep_aspect), a multiple of 64
    source_prompt: str = ""
    source_guidance: float = 3.5  # s_src
    keep_last_noise: bool = False  # False: the last maps 0 as the references; True: exact reconstruction (invert())
    keep_aspect: bool = False     # keep the aspect ratio (sides multiples of 64) instead of centre-cropping
    sampler: str = "ddpm"         # a name in sampler.SAMPLERS: "ddpm" (LEDITS), "dpmsolver++" (LEDITS++), "ddim"
                                  # (deterministic DDIM inversion: the DDIM + P2P baseline)
    zero_noise_steps: int | None = None  # the last maps set to 0 unless keep_last_noise; None: the model's (invert)
    gamma: float | None = None    # set by rfinversion.invert alone (its controller strength): an RF-Inversion

    def __post_init__(self):
        for name, kind in [("seed", int), ("source_prompt", str), ("keep_last_noise", bool), ("keep_aspect", bool)]:
            if not isinstance(getattr(self, name), kind) or kind is int and isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be {kind.__name__}, got {shorten(getattr(self, name))}")
        if not -2**63 <= self.seed < 2**64:  # what torch.Generator.manual_seed takes
            raise ValueError(f"seed must be an integer from -2**63 to 2**64 - 1, got {self.seed}")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not (isinstance(self.sampler, str) and self.sampler in SAMPLERS):
            raise ValueError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}, got {self.sampler!r}")
        if self.skip is None:
            object.__setattr__(self, "skip", SAMPLERS[self.sampler].default_skip(self.steps))
        if not (isinstance(self.skip, int) and 0 <= self.skip < self.steps):
            raise ValueError(f"skip must be an integer with 0 <= skip < steps ({self.steps}), got {self.skip!r}")
        if not (isinstance(self.source_guidance, (int, float)) and math.isfinite(self.source_guidance)):
            raise ValueError(f"source guidance must be finite, got {self.source_guidance!r}")
        if not (isinstance(self.size, int) and self.size >= 64 and self.size % 64 == 0):
            raise ValueError(f"size must be a multiple of 64 (at least 64), got {self.size!r}")
        z = self.zero_noise_steps
        if SAMPLERS[self.sampler].trajectory and (self.keep_last_noise or z is not None):
            raise ValueError(f"{'keep_last_noise' if self.keep_last_noise else 'zero_noise_steps'} has no meaning for "
                             f"the {self.sampler} sampler: its noise maps are all 0 (its steps inject no noise)")
        if z is not None and not (type(z) is int and z >= 0):
            raise ValueError(f"zero_noise_steps must be an integer >= 0, got {self.zero_noise_steps!r}")
        if z is not None and z > self.steps - self.skip:  # it counts the last of the maps the edit runs on
            raise ValueError(f"zero_noise_steps {z} is more than the {self.steps - self.skip} noise maps the edit runs "
                             f"on (steps {self.steps} - skip {self.skip})")

    def dict(self) -> dict:
        return asdict(self)

    def new_sampler(self, schedule, latent_size: tuple[int, int] | None = None) -> Sampler:
        """A fresh sampler of this kind over the N steps (sampler.py); refuses N past the schedule. The flow sampler
        takes the latent's size (h, w): FLUX's dynamic shift depends on its token count (refused without it there)."""
        return SAMPLERS[self.sampler].for_inversion(schedule, self.steps, self.keep_last_noise, latent_size)


@dataclass
class Inversion:
    """What the edit needs: timesteps [N - skip] descending (ints; a flow's float32 values as floats), xts
    [N - skip + 1, C, h, w] (the last is w0), zs [N - skip, C, h, w]."""
    timesteps: list[int] | list[float]
    xts: torch.Tensor
    zs: torch.Tensor
    image: torch.Tensor | None    # the preprocessed input [1, 3, H, W], for comparisons
    settings: InversionSettings
    model_id: str = ""            # the model it was made with (StableDiffusion.model_id / .fingerprint)
    fingerprint: str = ""

    @property
    def w0(self) -> torch.Tensor:
        return self.xts[-1:]

    @property
    def rf(self) -> bool:
        """Whether it is an RF-Inversion (rfinversion.invert)."""
        return self.settings.gamma is not None

    def new_sampler(self, schedule) -> Sampler:
        """A fresh sampler for the edit: the settings' kind, for this inversion's latent size."""
        return self.settings.new_sampler(schedule, tuple(self.xts.shape[-2:]))

    @property
    def latent_scale(self) -> int:
        """Pixels per latent pixel of the model it was made with (its image's height over its latents')."""
        return max(self.image.shape[-2] // max(self.xts.shape[-2], 1), 1)

    def check_tensors(self, source: str = "the inversion") -> None:
        """Refuse tensors that disagree with each other or the settings, or hold inf / NaN (a damaged file)."""
        n, (H, W), f = self.settings.steps - self.settings.skip, self.image.shape[-2:], self.latent_scale
        if not (len(self.timesteps) == len(self.zs) == len(self.xts) - 1 == n and self.xts.ndim == 4
                and self.xts.shape[1:] == self.zs.shape[1:] and (H, W) == tuple(f * d for d in self.xts.shape[-2:])
                and f & (f - 1) == 0 and max(H, W) == self.settings.size):
            raise InversionError(f"{source} is damaged: its tensors (xts {list(self.xts.shape)}, zs "
                                 f"{list(self.zs.shape)}, image {list(self.image.shape)}) disagree with each other "
                                 f"or with its settings (steps {self.settings.steps}, skip {self.settings.skip})")
        for name in ("xts", "zs", "image"):
            if not getattr(self, name).isfinite().all():
                raise InversionError(f"{source} is damaged: its {name} hold inf or NaN values; invert again")

    def check_model(self, sd: StableDiffusion, source: str = "the inversion", rf: bool | None = False) -> None:
        """Refuse a model other than the one the inversion was made with (its noise maps belong to that one), and an
        inversion of the other kind than rf says (True: RF-Inversion's edit, False: the others, None: either)."""
        if rf is not None and self.rf != rf:
            raise InversionError(
                f"{source} is an RF-Inversion (gamma {self.settings.gamma}): only RF-Inversion's edit "
                "(rfinversion.edit, --method rf-inversion) takes it; for this method invert again with the flow sampler"
                if self.rf else f"{source} is no RF-Inversion (its sampler: {self.settings.sampler}): RF-Inversion's "
                "edit needs one from rfinversion.invert; invert again with it")
        if not takes(SAMPLERS[self.settings.sampler], sd.prediction_type):
            raise InversionError(f"{source} was made with the {self.settings.sampler} sampler, for another kind of "
                                 f"model than this one (it predicts {sd.prediction_type}): invert again with this "
                                 "model")
        if self.xts.shape[1] != sd.vae.config["latent_channels"]:
            raise InversionError(f"{source} holds {self.xts.shape[1]}-channel latents; this model's take "
                                 f"{sd.vae.config['latent_channels']}: invert again with this model")
        if self.latent_scale != sd.latent_scale:
            raise InversionError(f"{source} has latents 1/{self.latent_scale} of its image's size; this model's VAE "
                                 f"makes 1/{sd.latent_scale}: invert again with this model")
        if self.fingerprint != str(sd.fingerprint):
            same = " (same name, other weights: another variant or dtype, or the files changed)" \
                if self.model_id == str(sd.model_id) else ""
            raise InversionError(f"{source} was made with model {shorten(self.model_id)} (fingerprint "
                                 f"{shorten(self.fingerprint)}), "
                                 f"not {sd.model_id} (fingerprint {sd.fingerprint}){same}: "
                                 "invert again with this model")
        if numbers(self.new_sampler(sd.schedule).timesteps)[self.settings.skip:] != list(self.timesteps):
            raise InversionError(f"{source}'s timesteps do not match this model's schedule: invert again")


def noisy_latents(sampler, w0: torch.Tensor, seed: int) -> torch.Tensor:
    """xts[k] = sqrt(abar_{tau_k}) w0 + sqrt(1 - abar_{tau_k}) eps_k for every k (eps_k drawn in ascending t); w0."""
    g, N = torch.Generator().manual_seed(seed), sampler.N
    eps = {k: torch.randn(w0.shape, generator=g, dtype=torch.float32) for k in reversed(range(N))}
    return torch.cat([sampler.add_noise(k, w0, eps[k].to(w0)) for k in range(N)] + [w0])


def source_context(sd, s: InversionSettings):
    """The inversion's text: "" and the source prompt if any, with their keys and values."""
    return parity.text_kv(sd, parity.embed(sd, [""], [s.source_prompt] if s.source_prompt else []))


def noise_maps(sd, sampler, xts, skip, context, source_guidance, batch_size=1, callback=None) -> torch.Tensor:
    """z_k for k = skip .. N-1 (xts[j] is x_{tau_{skip+j}}), up to batch_size timesteps per UNet call: the x_t are
    independent, so batching changes only rounding and speed (parity.batches says where the batches end)."""
    zs, n, c = [], len(xts) - 1, rows(context)  # c = 1, or 2 with a source prompt
    for a, e in parity.batches(n, batch_size):
        k, x = slice(skip + a, skip + e), xts[a:e]
        t = torch.tensor(sampler.timesteps[k] * c, device=x.device)
        out_u, *out_src = sd.predict(x.repeat(c, 1, 1, 1), t, repeat_rows(context, e - a)).chunk(c)
        out = out_u + source_guidance * (out_src[0] - out_u) if out_src else out_u
        zs.append(sampler.noise_map(k, x, xts[a + 1:e + 1], out).to(x.dtype))
        if parity.feeds_back(sampler, batch_size) and e < n:
            xts[e] = sampler.step(skip + a, x, out, zs[-1])
        if callback:
            callback(e, n)
    return torch.cat(zs)


def trajectory(sd, sampler, w0, skip, context, source_guidance, callback=None) -> torch.Tensor:
    """xts for k = skip .. N-1, then w0: x_{tau_k} = unstep(k, x_{tau_{k+1}}, out) from k = N-1 (x_{tau_N} = w0) down,
    out at (x_{tau_{k+1}}, inv_timesteps[k]), one UNet call per step (each needs the one before)."""
    xts, n, c = [w0], sampler.N - skip, rows(context)
    for j, k in enumerate(reversed(range(skip, sampler.N))):
        x = xts[-1]
        out_u, *out_src = sd.predict(x.repeat(c, 1, 1, 1), sampler.inv_timesteps[k], context).chunk(c)
        out = out_u + source_guidance * (out_src[0] - out_u) if out_src else out_u
        xts.append(sampler.unstep(k, x, out).to(x.dtype))
        if callback:
            callback(j + 1, n)
    return torch.cat(xts[::-1])


def with_zero_noise_steps(s: InversionSettings, sd: StableDiffusion) -> InversionSettings:
    """s with zero_noise_steps decided: given, else 3 for SDXL's dpmsolver++ (LEditsPPPipelineStableDiffusionXL's
    num_zero_noise_steps), else 1 (LEDITS, and LEditsPPPipelineStableDiffusion); at most the maps there are; None
    for ddim (every map is 0)."""
    if s.zero_noise_steps is not None or SAMPLERS[s.sampler].trajectory:
        return s
    n = 3 if isinstance(sd, StableDiffusionXL) and s.sampler == "dpmsolver++" else 1
    return replace(s, zero_noise_steps=min(n, s.steps - s.skip))


def settings_of(sd: StableDiffusion, settings: InversionSettings | None, fields: dict) -> InversionSettings:
    """invert's settings (an InversionSettings and/or its fields; the size sd.default_size where neither gives it),
    checked against the model, zero_noise_steps decided (with_zero_noise_steps)."""
    if settings is not None and not isinstance(settings, InversionSettings):
        raise TypeError(f"invert's settings must be an InversionSettings, got {type(settings).__name__}")
    s = replace(settings, **fields) if settings else InversionSettings(**{"size": sd.default_size, **fields})
    if not takes(SAMPLERS[s.sampler], sd.prediction_type):
        fits = [name for name, kind in SAMPLERS.items() if takes(kind, sd.prediction_type)]
        raise ValueError(f"the {s.sampler} sampler does not work on this model (it predicts {sd.prediction_type}); "
                         f"use {' or '.join(fits) or 'another model'}")
    if s.gamma is not None:
        raise ValueError("gamma is RF-Inversion's: invert with rfinversion.invert for it")
    return with_zero_noise_steps(s, sd)


@torch.inference_mode()
def invert(sd: StableDiffusion, image, settings: InversionSettings | None = None, *, batch_size: int = BATCH_SIZE,
           callback=None, **fields) -> Inversion:
    """Invert an image (path or PIL): the latents and noise maps from which the edit regenerates it.

    settings: an InversionSettings, and/or its fields as keywords (steps, skip, seed, size, source_prompt,
    source_guidance, keep_last_noise, keep_aspect, sampler, zero_noise_steps; size defaults to sd.default_size,
    512 for SD and 1024 for SDXL; skip to the sampler's method's default for the steps). keep_last_noise=True makes the
    inversion exact: regenerating it without guidance returns w0 (DDPM keeps z_{N-1}; dpmsolver++ ends its grid at
    sigma_min instead of the pipeline's 0, where the last step lands on its x0 prediction whatever the noise).
    sampler="ddim" walks w0 up to x_{tau_skip} with DDIM's inverse step (deterministic: seed unused, maps all 0);
    sampler="flow" so does a rectified flow (SD3) with the Euler step of its ODE run forward.
    batch_size: timesteps per UNet call (the x_t are independent: batching only changes float rounding and speed;
    at 1, dpmsolver++ feeds each call the recomputed latent, as the pipeline: parity.feeds_back; ddim's steps
    follow one another, one per call).
    callback(done, total) reports progress of the UNet work.
    """
    if not (type(batch_size) is int and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {shorten(batch_size)}")
    s = settings_of(sd, settings, fields)
    sd.check_fits(s.size, s.size)
    x = to_tensor(image, s.size, s.keep_aspect)
    sampler = s.new_sampler(sd.schedule, tuple(d // sd.latent_scale for d in x.shape[-2:]))  # refuses N > T
    w0 = sd.encode(x)
    if sampler.trajectory:
        xts = trajectory(sd, sampler, w0, s.skip, source_context(sd, s), s.source_guidance, callback)
        zs = torch.zeros_like(xts[1:])
    else:
        xts = noisy_latents(sampler, w0, s.seed)[s.skip:]
        zs = noise_maps(sd, sampler, xts, s.skip, source_context(sd, s), s.source_guidance, batch_size, callback)
    if not (zs.isfinite().all() and xts.isfinite().all()):
        what = "latents" if sampler.trajectory else "noise maps"
        raise MinleditsError(f"the inversion's {what} hold inf or NaN: the model's output is not finite "
                             "(damaged weights, or fp16 overflow: try --dtype fp32 / dtype=torch.float32)")
    if not s.keep_last_noise and s.zero_noise_steps:
        zs[-s.zero_noise_steps:] = 0
    return Inversion(numbers(sampler.timesteps)[s.skip:], xts, zs, x, s, str(sd.model_id), str(sd.fingerprint))
