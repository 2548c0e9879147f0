"""RF-Inversion as diffusers' community pipeline runs it on FLUX (examples/community/pipeline_flux_rf_inversion.py:
RFInversionFluxPipeline.invert and __call__ with inverted latents), rewritten on diffusers 0.42.1's FluxPipeline pieces
(its VAE, encode_prompt, transformer, scheduler, packing and position ids): the oracle of tests/test_rfinversion.py.
Its semantics, step by step (latents packed [1, (h/2)(w/2), 4C] throughout, as the pipeline keeps them):
- invert: y_0 = (a sample of the VAE's posterior - shift) * scale, the sample's noise a torch.randn draw from torch's
  global generator (seeded by the caller, here by `seed`); then y_1 = torch.randn_like(y_0), the next draw;
- the scheduler set as FluxPipeline sets it: sigmas = linspace(1, 1/N, N) and mu = calculate_shift(image tokens,
  base_image_seq_len, max_image_seq_len, base_shift, max_shift) from the scheduler config; its sigmas [N + 1] end in 0;
- the source prompt (default "") through encode_prompt; the guidance embedding's value source_guidance_scale
  (default 0.0), as a [1] tensor (None without the embedding);
- the controlled forward ODE, i = 0 .. N - 1: t_i = i / (N + 1) as a float32 tensor (N + 1 = len(sigmas), so the
  path never reaches t = 1); u = transformer(Y, timestep t_i); u_cond = (y_1 - Y) / (1 - t_i);
  Y += (u + gamma (u_cond - u)) (sigmas[i] - sigmas[i + 1]): the time the transformer and u_cond see runs up from 0
  unshifted while the step sizes are the shifted schedule's, taken from its noisy end first;
- __call__ with the inverted latents: the same scheduler setting for the height and width it is given;
  start = int(start_timestep N), stop = min(int(stop_timestep N), N); the guidance embedding guidance_scale (3.5);
  for each timestep t of the schedule: t_i = 1 - t / 1000; v = -transformer(X, timestep t / 1000);
  v_cond = (y_0 - X) / (1 - t_i); eta_i = eta for start <= i < stop, else 0 (times (1 - i / N) ** eta_decay_power
  with decay_eta); X += (v + eta_i (v_cond - v)) (sigmas[i] - sigmas[i + 1]).
What differs from the community file: the image comes in preprocessed (a tensor in [-1, 1]; the pipeline resizes a PIL
image with VaeImageProcessor to the height and width given); the seed is an argument (the pipeline leaves seeding to its
caller); strength is 1 (its default) and no custom timesteps; the trajectory of the forward ODE is returned as well.
"""
import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift, retrieve_timesteps


def set_schedule(pipe, steps: int, height: int, width: int):
    """The pipeline's scheduler set for `steps` steps of a height x width picture (pixels): (timesteps, sigmas)."""
    tokens = (height // pipe.vae_scale_factor // 2) * (width // pipe.vae_scale_factor // 2)
    c = pipe.scheduler.config
    mu = calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, torch.device("cpu"), None,
                                      np.linspace(1.0, 1 / steps, steps), mu=mu)
    return timesteps, pipe.scheduler.sigmas


def guidance_row(pipe, value):
    """The guidance embedding's input: [value] (float32), or None for a transformer without the embedding."""
    return torch.full([1], value, dtype=torch.float32) if pipe.transformer.config.guidance_embeds else None


def text(pipe, prompt: str):
    """(prompt_embeds, pooled, text_ids) of one prompt, as the pipeline encodes it (prompt_2 = prompt)."""
    return pipe.encode_prompt(prompt=prompt, prompt_2=prompt, device=torch.device("cpu"))


def velocity(pipe, latents, timestep, guidance, embeds, ids):
    prompt_embeds, pooled, text_ids = embeds
    return pipe.transformer(hidden_states=latents, timestep=timestep, guidance=guidance, pooled_projections=pooled,
                            encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]


@torch.no_grad()
def invert(pipe, x: torch.Tensor, *, source_prompt="", source_guidance_scale=0.0, num_inversion_steps=28, gamma=0.5,
           seed=0):
    """(inverted latents Y_N, image latents y_0, latent image ids, [Y_0 .. Y_N]) for a picture x [1, 3, H, W] in
    [-1, 1] (module docstring); the latents packed."""
    H, W = x.shape[-2:]
    torch.manual_seed(seed)
    sample = pipe.vae.encode(x).latent_dist.sample()
    w0 = (sample - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    C, h, w = w0.shape[1:]
    y_0 = FluxPipeline._pack_latents(w0, 1, C, h, w)
    ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, torch.device("cpu"), torch.float32)
    _, sigmas = set_schedule(pipe, num_inversion_steps, H, W)
    embeds, guidance = text(pipe, source_prompt), guidance_row(pipe, source_guidance_scale)
    Y = y_0
    y_1 = torch.randn_like(Y)
    n, path = len(sigmas), [y_0]
    for i in range(n - 1):
        t_i = torch.tensor(i / n, dtype=Y.dtype)
        u = velocity(pipe, Y, t_i.reshape(1), guidance, embeds, ids)
        u_cond = (y_1 - Y) / (1 - t_i)
        Y = Y + (u + gamma * (u_cond - u)) * (sigmas[i] - sigmas[i + 1])
        path.append(Y)
    return Y, y_0, ids, path


@torch.no_grad()
def edit(pipe, inverted_latents, image_latents, latent_image_ids, *, height: int, width: int, prompt: str, eta=1.0,
         start_timestep=0.0, stop_timestep=0.25, num_inference_steps=28, guidance_scale=3.5, decay_eta=False,
         eta_decay_power=1.0):
    """The edited latents (packed) of the controlled reverse ODE from inverted_latents towards image_latents
    (module docstring); height and width in pixels, as the pipeline takes them."""
    N = num_inference_steps
    timesteps, sigmas = set_schedule(pipe, N, height, width)
    start, stop = int(start_timestep * N), min(int(stop_timestep * N), N)
    embeds = text(pipe, prompt)
    guidance = guidance_row(pipe, guidance_scale)
    X, y_0 = inverted_latents, image_latents.clone()
    for i, t in enumerate(timesteps):
        t_i = 1 - t / 1000
        v = -velocity(pipe, X, t.expand(1).to(X.dtype) / 1000, guidance, embeds, latent_image_ids)
        v_cond = (y_0 - X) / (1 - t_i)
        eta_i = eta if start <= i < stop else 0.0
        if decay_eta:
            eta_i = eta_i * (1 - i / N) ** eta_decay_power
        X = X + (v + eta_i * (v_cond - v)) * (sigmas[i] - sigmas[i + 1])
    return X
