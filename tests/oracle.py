"""Reference LEDITS built only from diffusers / transformers pieces: the oracles for inversion and edit.

Inversion (semantics: minledits/inversion.py): the same noise through DDIMScheduler.add_noise, the reference
UNet for eps (separate calls for the source-prompt CFG, as the LEDITS demo does), DDIMScheduler.step for mu.
Edit (minledits/ledits.py): SemanticStableDiffusionPipeline with a DDIMScheduler that starts at step `skip` and
injects the inversion's noise maps as variance noise (docs/design.md §7 says why the tests force its x_t).
LEDITS++ (minledits/leditspp.py): diffusers' LEditsPPPipelineStableDiffusion, leditspp_pipeline() below, and on
SDXL LEditsPPPipelineStableDiffusionXL, leditspp_xl_pipeline().
"""
import copy
import warnings
from functools import lru_cache

import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    LEditsPPPipelineStableDiffusion,
    LEditsPPPipelineStableDiffusionXL,
    PNDMScheduler,
    SemanticStableDiffusionPipeline,
)

from tests import hub


@lru_cache(maxsize=None)
def tokenizer(folder):
    """The reference CLIPTokenizer of a model folder, read once (read-only afterwards)."""
    return hub.reference_tokenizer(folder / "tokenizer")


def embed(ref, prompt: str) -> torch.Tensor:
    ids = tokenizer(ref.folder)([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    return ref.text_encoder(ids.to(ref.text_encoder.device))[0]


@torch.no_grad()
def invert(ref, x, source_prompt="", source_guidance=3.5, steps=10, skip=3, seed=0, all_steps=False):
    """(xts [N+1], zs [N]) indexed by k from 0 (docs/design.md §3); x is the preprocessed image [1, 3, H, W].

    all_steps=True runs the UNet for every k, as the LEDITS demo does (the maps for k < skip are computed but
    never used); the default runs it only for k >= skip. x's device and dtype are used throughout."""
    sched = DDIMScheduler(**hub._clean(ref.scheduler_config))
    sched.set_timesteps(steps)
    ts = sched.timesteps
    w0 = ref.vae.encode(x).latent_dist.mode() * ref.vae.config.scaling_factor
    g = torch.Generator().manual_seed(seed)
    noise = {k: torch.randn(w0.shape, generator=g).to(w0) for k in reversed(range(steps))}
    xts = [sched.add_noise(w0, noise[k], ts[k:k + 1]) for k in range(steps)] + [w0]
    uncond, cond = embed(ref, ""), embed(ref, source_prompt)
    zs = torch.zeros(steps, *w0.shape[1:])
    for k in range(0 if all_steps else skip, steps):
        t = ts[k]
        out = ref.unet(xts[k], t, encoder_hidden_states=uncond).sample
        if source_prompt:
            out = out + source_guidance * (ref.unet(xts[k], t, encoder_hidden_states=cond).sample - out)
        mu = sched.step(out, t, xts[k], eta=1.0, variance_noise=torch.zeros_like(w0)).prev_sample
        sigma = sched._get_variance(t, t - sched.config.num_train_timesteps // steps) ** 0.5
        zs[k] = ((xts[k + 1] - mu) / sigma)[0]
    zs[-1] = 0
    return torch.cat(xts), zs


class InjectedDDIM(DDIMScheduler):
    """DDIMScheduler that runs only timesteps[skip:] and uses the given noise maps as variance noise.

    With `force` (a latent per step), step i returns force[i] instead of its own result, which it keeps in
    `own`: every step then starts from the same x_t as ours, and each step's result can be compared alone."""

    def prepare(self, skip, zs, force=None):
        self.skip, self.zs, self.i, self.force, self.own = skip, zs, 0, force, []
        return self

    def set_timesteps(self, num_inference_steps, device=None):
        super().set_timesteps(num_inference_steps, device)
        self.timesteps = self.timesteps[self.skip:]

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        i, self.i = self.i, self.i + 1
        out = super().step(model_output, timestep, sample, eta=1.0, variance_noise=self.zs[i][None].to(sample))
        self.own.append(out.prev_sample)
        if self.force is not None:
            out.prev_sample = self.force[i].to(sample)
        return out if return_dict else (out.prev_sample,)


@torch.no_grad()
def edit(ref, xts, zs, steps, skip, target_prompt, target_guidance, concepts, momentum_scale, momentum_beta,
         force=None):
    """The edited latents and the pipeline (its uncond/text/edit estimates and sem_guidance per step; its
    scheduler's `own` results per step). force: see InjectedDDIM."""
    sched = InjectedDDIM(**hub._clean(ref.scheduler_config)).prepare(skip, zs, force)
    pipe = SemanticStableDiffusionPipeline(
        vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=tokenizer(ref.folder),
        unet=ref.unet, scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    h, w = xts.shape[-2] * 8, xts.shape[-1] * 8
    kw = dict(editing_prompt=[c.prompt for c in concepts], reverse_editing_direction=[c.reverse for c in concepts],
              edit_guidance_scale=[c.scale for c in concepts], edit_warmup_steps=[c.warmup for c in concepts],
              edit_threshold=[c.threshold for c in concepts],
              edit_cooldown_steps=[steps if c.cooldown is None else c.cooldown for c in concepts],  # None: never
              edit_weights=[c.weight for c in concepts], edit_momentum_scale=momentum_scale,
              edit_mom_beta=momentum_beta) if concepts else {}
    out = pipe(prompt=target_prompt, latents=xts[skip][None], num_inference_steps=steps, guidance_scale=target_guidance,
               eta=1.0, output_type="latent", height=h, width=w, **kw)
    return out.images, pipe


def leditspp_pipeline(ref, scheduler_config=None, scheduler=PNDMScheduler, fix=True, copy_unet=True):
    """LEditsPPPipelineStableDiffusion on the reference modules (a copy of the UNet unless copy_unet is false:
    invert() sets its attention processors). Its scheduler is built from the model's config; the pipeline
    replaces it by its DPM-Solver++ unless it is a DDIMScheduler. fix: patch encode_prompt for two diffusers
    0.42.1 bugs, so that the pipeline computes what LEDITS++ (ml-research/ledits_pp) and minledits compute:
    - invert unpacks encode_prompt's (source prompt, "") embeddings as (uncond, text), so its source guidance is
      eps_src + s (eps_u - eps_src), away from the source prompt: the pair is handed over in the order read;
    - __call__'s tokenizer(..., padding="max_length", return_length=True) reports the padded length 77 (with
      transformers 4.x and 5.x), so it sums every token after the start, end and padding too, into a concept's
      attention map, not the concept's own tokens as its comment intends: the counts are handed over right."""
    pipe = LEditsPPPipelineStableDiffusion(
        vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=tokenizer(ref.folder),
        unet=copy.deepcopy(ref.unet) if copy_unet else ref.unet, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
        scheduler=scheduler.from_config(hub._clean(scheduler_config or ref.scheduler_config)))
    pipe.set_progress_bar_config(disable=True)
    if fix:
        encode = pipe.encode_prompt

        def encode_prompt(*a, **kw):
            edit, uncond, counts = encode(*a, **kw)
            if isinstance(kw["editing_prompt"], str):  # invert's call, with its source prompt
                return uncond, edit, counts
            prompts = kw["editing_prompt"] or []
            return edit, uncond, torch.tensor([len(pipe.tokenizer(p).input_ids) - 2 for p in prompts])
        pipe.encode_prompt = encode_prompt
    return pipe


def leditspp_invert(pipe, x, source_prompt, n, f, seed):
    """pipe.invert (either pipeline's) on the preprocessed image x (in [-1, 1]: the pipeline warns and takes it as it
    is). From leditspp_pipeline, whose fix makes invert guide eps_u + s (eps_src - eps_u) as
    ml-research/ledits_pp's own invert, LEDITS and minledits do (diffusers 0.42.1 swaps the pair)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the [-1, 1] tensor; the scheduler replacement
        pipe.invert(image=x, source_prompt=source_prompt, source_guidance_scale=3.5, num_inversion_steps=n, skip=f,
                    generator=torch.Generator().manual_seed(seed), height=x.shape[-2], width=x.shape[-1])
    return pipe


def leditspp_call(pipe, concepts, mask, steps, forced_onto=None, **kw):
    """pipe(output_type="latent") (either pipeline) with minledits Concepts and mask mode (intersect, cross_attention
    or noise) over `steps` inference steps (a concept without a cooldown stays on to the end); each step's own
    x_{t-1} is kept in pipe.own. forced_onto: our edit's trace, whose x_{t-1} each step puts in place of its own,
    so that each step compares alone."""
    own = []

    def force(pipe, i, t, tensors):
        own.append(tensors["latents"])
        return {"latents": forced_onto[i].x_prev} if forced_onto else {}
    modes = dict(intersect=dict(use_intersect_mask=True), cross_attention=dict(use_intersect_mask=False,
                 use_cross_attn_mask=True), noise=dict(use_intersect_mask=False, use_cross_attn_mask=False))[mask]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = pipe(output_type="latent", editing_prompt=[c.prompt for c in concepts],
                      reverse_editing_direction=[c.reverse for c in concepts],
                      edit_guidance_scale=[c.scale for c in concepts], edit_threshold=[c.threshold for c in concepts],
                      edit_warmup_steps=[c.warmup for c in concepts],
                      edit_cooldown_steps=[steps if c.cooldown is None else c.cooldown for c in concepts],
                      callback_on_step_end=force, **modes, **kw).images
    pipe.own = torch.cat(own)
    return theirs


def leditspp_xl_pipeline(ref, scheduler="dpmsolver++", copy_unet=True):
    """LEditsPPPipelineStableDiffusionXL on the reference modules of an SDXL kind (a copy of the UNet unless copy_unet
    is false). Given SDXL's Euler scheduler it puts its SDE-DPM-Solver++ (2M) in place, as with the Hub model;
    scheduler="ddpm": a DDIMScheduler. One patch, as leditspp_pipeline's: __call__ gets each concept's own token
    count (diffusers 0.42.1 reports the padded length 77 and sums tokens 1..75)."""
    cfg = hub._clean(ref.scheduler_config)
    pipe = LEditsPPPipelineStableDiffusionXL(
        vae=ref.vae, text_encoder=ref.text_encoder, text_encoder_2=ref.text_encoder_2,
        tokenizer=hub.reference_tokenizer(ref.folder / "tokenizer"),
        tokenizer_2=hub.reference_tokenizer(ref.folder / "tokenizer_2"),
        unet=copy.deepcopy(ref.unet) if copy_unet else ref.unet,
        scheduler=(DDIMScheduler if scheduler == "ddpm" else EulerDiscreteScheduler).from_config(cfg),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    encode = pipe.encode_prompt

    def encode_prompt(*a, **kw):
        out = encode(*a, **kw)
        prompts = kw.get("editing_prompt") or []
        return (*out[:4], torch.tensor([len(pipe.tokenizer(p).input_ids) - 2 for p in prompts]))
    pipe.encode_prompt = encode_prompt
    return pipe
