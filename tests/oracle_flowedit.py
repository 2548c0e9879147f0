"""FlowEdit as the authors run it (fallenshock/FlowEdit: FlowEditSD3 / calc_v_sd3 and FlowEditFLUX / calc_v_flux in
FlowEdit_utils.py, driven by run_script.py), rewritten on diffusers 0.42.1's StableDiffusion3Pipeline (flowedit_sd3,
the oracle of tests/test_flowedit.py) and FluxPipeline (flowedit_flux, of tests/test_flowedit_flux.py).

On SD3 (flowedit_sd3), its semantics, step by step:
- the scheduler is the pipeline's FlowMatchEulerDiscreteScheduler set to T_steps; the loop runs over its timesteps t,
  skipping the steps i with T_steps - i > n_max; t_i = t / 1000 and t_im1 = the next timestep / 1000 (0 at the end);
- each prompt through pipe.encode_prompt (negative_prompt "" by default), the rows of every transformer call in the
  order [src_uncond, src_cond, tar_uncond, tar_cond], the timestep t expanded to the batch;
- the noise: torch.manual_seed(seed) once (run_script.py seeds before each experiment), then torch.randn_like(x_src)
  for every draw: n_avg per FlowEdit step, one more at i = T_steps - n_min;
- a FlowEdit step: zt_src = (1 - t_i) x_src + t_i noise, zt_tar = zt_edit + zt_src - x_src, one call on
  [zt_src, zt_src, zt_tar, zt_tar], V_delta_avg += (1 / n_avg) (V_tar - V_src) from zeros, then zt_edit upcast to
  float32, zt_edit + (t_im1 - t_i) V_delta_avg, cast back to V_delta_avg's dtype;
- the tail (T_steps - i <= n_min): at its first step xt_src = scheduler.sigmas[i] noise + (1 - sigma) x_src,
  xt_tar = zt_edit + xt_src - x_src; each step one call on [xt_tar] * 4 (all four rows), V_tar of the target rows,
  the same float32 Euler update.
What differs from the authors' file, and why:
- x_src is given, contiguous: run_script.py's latent comes out of diffusers' preprocessing channels-last, so its
  randn_like draws fill memory in that order and are other numbers than a contiguous randn of the same shape; the
  oracle draws as minledits does (the same generator state, a contiguous tensor).
- their tail casts its result to `noise_pred_tar.dtype`, a name defined only inside calc_v_sd3: every n_min > 0 run
  stops there with a NameError. The oracle casts to V_tar's dtype, the obvious intent, so that the tail can be compared.
- they have no path for guidance <= 1: encode_prompt then returns no negative embeddings (the torch.cat of the
  four rows fails on None), and calc_v_sd3's unguided branch hands the transformer a tuple. The oracle keeps, for a
  side at guidance <= 1, only its conditional row and uses that velocity as it is (no classifier-free guidance); the
  tail then calls the transformer on every row of the FlowEdit step's batch at xt_tar, as the reference does.

On FLUX.1 (flowedit_flux, the authors' FlowEditFLUX), its semantics, step by step:
- everything on the packed latent: x_src [1, C, h, w] packed to tokens [1, (h/2)(w/2), 4C] by pipe._pack_latents,
  the image ids of the (h/2) x (w/2) grid, the result unpacked at the end;
- the sigmas FluxPipeline's: set_timesteps(sigmas=linspace(1, 1/T_steps, T_steps), mu=calculate_shift(the packed
  token count, the scheduler config's base/max lengths and shifts)); t_i = scheduler.sigmas[i] (theirs looks i up by
  _init_step_index(t): the timesteps are distinct) and t_im1 the next sigma (the last 0); the transformer's timestep
  t / 1000, t = the scheduler's timesteps[i];
- each prompt through pipe.encode_prompt (no negative prompt: no classifier-free guidance); its text ids;
- each side one transformer call of one row: the source's at zt_src with the guidance embedding's value
  src_guidance_scale, the target's at zt_tar with tar_guidance_scale (None on a transformer without the embedding);
- the noise: torch.manual_seed(seed), then torch.randn_like(the packed x_src) per draw, in the same order as SD3's:
  standard normal in the token layout, so a draw is unpack(randn([1, (h/2)(w/2), 4C])) on the latent;
- a FlowEdit step as SD3's with V = the side's velocity (no guidance formula); the tail at its first step
  xt_src = sigma noise + (1 - sigma) x_src, xt_tar = zt_edit + xt_src - x_src, then the target's velocity alone.
What differs from the authors' file, and why:
- the one patch: their pixel size is x_src.shape[2:] * pipe.vae_scale_factor // 2, written for diffusers 0.30, where
  FluxPipeline.vae_scale_factor was 16; on 0.42.1 it is 8 (the VAE's true factor, the packing's 2 counted apart), so
  their size is half the picture's: prepare_latents then makes image ids for (h/4)(w/4) tokens beside the (h/2)(w/2)
  packed ones and the first transformer call fails in apply_rotary_emb ("The size of tensor a (512 + hw/4) must match
  the size of tensor b (512 + hw/16)"); check_inputs warns where a side of the picture is no multiple of 32, and
  their final _unpack_latents would fail too (a view of (h/2)(w/2) tokens as (h/4) x (w/4)). The oracle takes the
  pixel size h * pipe.vae_scale_factor (what theirs means: 8 h on both versions).
  Nothing else needed changing: their file with that line patched runs on 0.42.1 and gives the oracle's latents.
- x_src given and the transformer's prompts computed once per prompt, as theirs; their tqdm and their dtype casts of
  the Euler update (float32 in and out here) kept as they are.
"""
import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps


@torch.no_grad()
def encode_image(pipe, x: torch.Tensor) -> torch.Tensor:
    """run_script.py's latent of a picture x [1, 3, H, W] in [-1, 1]: (posterior mode - shift) * scale, made
    contiguous."""
    mode = pipe.vae.encode(x).latent_dist.mode()
    return ((mode - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor).contiguous()


def text_rows(pipe, src_prompt, tar_prompt, negative_prompt, src_guidance, tar_guidance):
    """(prompt rows, pooled rows, rows per side): [src_uncond, src_cond, tar_uncond, tar_cond], each uncond row
    left out where its side's guidance is <= 1."""
    rows, pooled, per_side = [], [], []
    for prompt, s in [(src_prompt, src_guidance), (tar_prompt, tar_guidance)]:
        pe, npe, ppe, nppe = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None,
                                                negative_prompt=negative_prompt, do_classifier_free_guidance=s > 1,
                                                device=torch.device("cpu"))
        rows += [npe, pe] if s > 1 else [pe]
        pooled += [nppe, ppe] if s > 1 else [ppe]
        per_side.append(2 if s > 1 else 1)
    return torch.cat(rows), torch.cat(pooled), per_side


def velocities(pipe, latents, prompt_embeds, pooled, per_side, guidance, t):
    """calc_v_sd3: one transformer call on all rows; per side u + s (c - u), or c alone at s <= 1."""
    v = pipe.transformer(hidden_states=latents, timestep=t.expand(latents.shape[0]),
                         encoder_hidden_states=prompt_embeds, pooled_projections=pooled, joint_attention_kwargs=None,
                         return_dict=False)[0]
    out, start = [], 0
    for n, s in zip(per_side, guidance):
        part = v[start:start + n]
        out.append(part[0:1] + s * (part[1:2] - part[0:1]) if n == 2 else part)
        start += n
    return out


def flowedit_step(x_src, zt_edit, t_i, t_im1, n_avg, both):
    """Both references' FlowEdit step: per draw zt_src, zt_tar and (V_src, V_tar) = both(zt_src, zt_tar), their
    difference averaged from zeros, then zt_edit's Euler step in float32, cast back to V_delta_avg's dtype."""
    V_delta_avg = torch.zeros_like(x_src)
    for _ in range(n_avg):
        fwd_noise = torch.randn_like(x_src)
        zt_src = (1 - t_i) * x_src + t_i * fwd_noise
        zt_tar = zt_edit + zt_src - x_src
        Vt_src, Vt_tar = both(zt_src, zt_tar)
        V_delta_avg += (1 / n_avg) * (Vt_tar - Vt_src)
    return (zt_edit.to(torch.float32) + (t_im1 - t_i) * V_delta_avg).to(V_delta_avg.dtype)


@torch.no_grad()
def flowedit_sd3(pipe, x_src, src_prompt, tar_prompt, negative_prompt="", T_steps=50, n_avg=1, src_guidance_scale=3.5,
                 tar_guidance_scale=13.5, n_min=0, n_max=33, seed=0):
    """The edited latents [1, C, h, w] of x_src (contiguous) by the authors' FlowEditSD3 (module docstring)."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(T_steps, device=x_src.device)
    timesteps = scheduler.timesteps
    guidance = (src_guidance_scale, tar_guidance_scale)
    prompt_embeds, pooled, per_side = text_rows(pipe, src_prompt, tar_prompt, negative_prompt, *guidance)
    torch.manual_seed(seed)
    zt_edit, xt_tar = x_src.clone(), None
    for i, t in enumerate(timesteps):
        if T_steps - i > n_max:
            continue
        t_i = t / 1000
        t_im1 = timesteps[i + 1] / 1000 if i + 1 < len(timesteps) else torch.zeros_like(t_i)
        if T_steps - i > n_min:
            both = lambda zt_src, zt_tar: velocities(  # noqa: E731
                pipe, torch.cat([zt_src] * per_side[0] + [zt_tar] * per_side[1]), prompt_embeds, pooled, per_side,
                guidance, t)
            zt_edit = flowedit_step(x_src, zt_edit, t_i, t_im1, n_avg, both)
        else:
            if i == T_steps - n_min:
                fwd_noise = torch.randn_like(x_src)
                sigma = scheduler.sigmas[i]
                xt_src = sigma * fwd_noise + (1.0 - sigma) * x_src
                xt_tar = zt_edit + xt_src - x_src
            latents = torch.cat([xt_tar] * sum(per_side))
            _, Vt_tar = velocities(pipe, latents, prompt_embeds, pooled, per_side, guidance, t)
            xt_tar = xt_tar.to(torch.float32)
            xt_tar = (xt_tar + (t_im1 - t_i) * Vt_tar).to(Vt_tar.dtype)  # theirs: .to(noise_pred_tar.dtype)
    return zt_edit if n_min == 0 else xt_tar


def flux_sigmas(pipe, T_steps: int, tokens: int) -> torch.Tensor:
    """FlowEditFLUX's timesteps: the pipeline's uniform sigmas and the dynamic shift's mu of the token count; the
    scheduler keeps the sigmas."""
    cfg = pipe.scheduler.config
    mu = calculate_shift(tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    sigmas = np.linspace(1.0, 1 / T_steps, T_steps)
    return retrieve_timesteps(pipe.scheduler, T_steps, torch.device("cpu"), sigmas=sigmas, mu=mu)[0]


def flux_velocity(pipe, z, text, guidance, img_ids, t):
    """calc_v_flux: one row's velocity at the packed z, its guidance embedding's value (None without one)."""
    c, pooled, txt_ids = text
    return pipe.transformer(hidden_states=z, timestep=t.expand(len(z)) / 1000, guidance=guidance,
                            encoder_hidden_states=c, pooled_projections=pooled, txt_ids=txt_ids, img_ids=img_ids,
                            joint_attention_kwargs=None, return_dict=False)[0]


@torch.no_grad()
def flowedit_flux(pipe, x_src, src_prompt, tar_prompt, T_steps=28, n_avg=1, src_guidance_scale=1.5,
                  tar_guidance_scale=5.5, n_min=0, n_max=24, seed=0):
    """The edited latents [1, C, h, w] of x_src by the authors' FlowEditFLUX, patched (module docstring)."""
    _, C, h, w = x_src.shape
    height, width = h * pipe.vae_scale_factor, w * pipe.vae_scale_factor   # theirs: * vae_scale_factor // 2
    x_src, img_ids = pipe.prepare_latents(1, C, height, width, x_src.dtype, x_src.device, None, latents=x_src)
    x_src = pipe._pack_latents(x_src, 1, C, h, w)
    timesteps = flux_sigmas(pipe, T_steps, x_src.shape[1])
    sigmas = pipe.scheduler.sigmas
    src_text, tar_text = (pipe.encode_prompt(prompt=p, prompt_2=None, device=x_src.device)
                          for p in (src_prompt, tar_prompt))
    embeds = pipe.transformer.config.guidance_embeds
    src_g, tar_g = (torch.tensor([s]) if embeds else None for s in (src_guidance_scale, tar_guidance_scale))
    torch.manual_seed(seed)
    zt_edit, xt_tar = x_src.clone(), None
    for i, t in enumerate(timesteps):
        if T_steps - i > n_max:
            continue
        t_i, t_im1 = sigmas[i], sigmas[i + 1]
        if T_steps - i > n_min:
            both = lambda zt_src, zt_tar: (flux_velocity(pipe, zt_src, src_text, src_g, img_ids, t),  # noqa: E731
                                           flux_velocity(pipe, zt_tar, tar_text, tar_g, img_ids, t))
            zt_edit = flowedit_step(x_src, zt_edit, t_i, t_im1, n_avg, both)
        else:
            if i == T_steps - n_min:
                noise = torch.randn_like(x_src)
                xt_tar = zt_edit + (t_i * noise + (1 - t_i) * x_src) - x_src
            V_tar = flux_velocity(pipe, xt_tar, tar_text, tar_g, img_ids, t)
            xt_tar = (xt_tar.to(torch.float32) + (t_im1 - t_i) * V_tar).to(V_tar.dtype)
    return pipe._unpack_latents(zt_edit if n_min == 0 else xt_tar, height, width, pipe.vae_scale_factor)
