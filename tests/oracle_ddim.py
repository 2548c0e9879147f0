"""Reference DDIM inversion and DDIM regeneration built only from diffusers pieces: the oracles of tests/test_ddim.py.

Inversion (minledits/inversion.py, sampler="ddim"): diffusers' DDIMInverseScheduler made from the model's scheduler
config (from_config, as diffusers' pipelines make it from their scheduler's), set to N steps; from w0 = the VAE
posterior mean, scaled, each of its ascending timesteps t runs the reference UNet on the current latent at t (the
unconditional row and, with a source prompt, the conditional one in one batch, combined with the source guidance, as
diffusers' inverting pipelines do) and steps with DDIMInverseScheduler.step. The loop stops after N - skip steps.
Regeneration (ledits.edit and p2p.edit on that inversion): DDIMScheduler.step with eta = 0 over the last N - skip
timesteps, per row guidance, unconditional and conditional rows in one UNet batch as the pipelines run them; with a
Prompt-to-Prompt controller (tests/oracle_p2p.py) in two calls, as oracle_p2p.reverse makes them, and its
step_callback after each step.
"""
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from tests import hub, oracle


def embed(ref, prompts: list[str]) -> torch.Tensor:
    return torch.cat([oracle.embed(ref, p) for p in prompts])


@torch.no_grad()
def invert(ref, x, source_prompt="", source_guidance=3.5, steps=10, skip=0, xl_text=None) -> torch.Tensor:
    """xts [N - skip + 1]: x_{tau_skip}, ..., x_{tau_{N-1}}, w0 (docs/design.md §3); x the preprocessed image.
    xl_text: SDXL's (c, pooled) rows ["", source prompt] (the SDXL UNet then also takes the picture's time_ids)."""
    sched = DDIMInverseScheduler.from_config(hub._clean(ref.scheduler_config))
    sched.set_timesteps(steps)
    w0 = ref.vae.encode(x).latent_dist.mode() * ref.vae.config.scaling_factor
    rows = 2 if source_prompt else 1
    context = embed(ref, ["", source_prompt][:rows]) if xl_text is None else xl_text[0][:rows]
    H, W = x.shape[-2:]
    added = {} if xl_text is None else dict(added_cond_kwargs={
        "text_embeds": xl_text[1][:rows], "time_ids": torch.tensor([[H, W, 0, 0, H, W]] * rows, dtype=torch.float32)})
    latents = [w0]
    for t in sched.timesteps[:steps - skip]:
        x_in = latents[-1].expand(rows, -1, -1, -1)
        out = ref.unet(x_in, t, encoder_hidden_states=context, **added).sample
        if source_prompt:
            out = out[:1] + source_guidance * (out[1:] - out[:1])
        latents.append(sched.step(out, t, latents[-1]).prev_sample)
    return torch.cat(latents[::-1])


@torch.no_grad()
def regenerate(ref, x_T, steps, skip, prompts, scales, controller=None) -> list[torch.Tensor]:
    """Every latent of DDIMScheduler(eta 0) from x_T = x_{tau_skip}, rows `prompts` with guidance `scales` (a row
    with scale <= 1 takes its conditional estimate alone); a Prompt-to-Prompt controller (oracle_p2p.Controller,
    registered on ref.unet) gets its step_callback."""
    sched = DDIMScheduler.from_config(hub._clean(ref.scheduler_config))
    sched.set_timesteps(steps)
    cond, uncond = embed(ref, prompts), embed(ref, [""] * len(prompts))
    s = torch.tensor(scales, dtype=torch.float32).view(-1, 1, 1, 1)
    x, out = x_T.expand(len(prompts), -1, -1, -1), []
    for t in sched.timesteps[skip:]:
        if controller is None:  # one batch [uncond, cond], as diffusers' pipelines run classifier-free guidance
            out_u, out_c = ref.unet(x.repeat(2, 1, 1, 1), t, encoder_hidden_states=torch.cat([uncond, cond])
                                    ).sample.chunk(2)
        else:  # the controller counts an unconditional call, then a conditional one (oracle_p2p)
            out_u = ref.unet(x, t, encoder_hidden_states=uncond).sample
            out_c = ref.unet(x, t, encoder_hidden_states=cond).sample
        eps = torch.where(s > 1, out_u + s * (out_c - out_u), out_c)
        x = sched.step(eps, t, x, eta=0.0).prev_sample
        if controller is not None:
            x = controller.step_callback(x)
        out.append(x)
    return out
