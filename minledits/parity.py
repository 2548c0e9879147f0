"""Parity with the references: what minledits does only to reproduce a reference implementation's float rounding
bit for bit, or to save work without changing a result. The methods call these by name, so that their own files
read as the math; docs/references.md ("Parity with the references") says what each matches.

    embed(sd, *groups)         the prompts' text embeddings, one text-encoder call per group, in the groups the
                               reference embeds them: "" alone, a source or target prompt alone, the concepts together
                               (a row's rounding can depend on the batch it is computed in)
    text_kv(sd, c)             c with every cross-attention's keys and values computed once for the whole edit (TextKV);
                               where every value is 0 (SDXL's unconditional zeros, to_v without bias) a cross-attention
                               is to_out's bias alone: no queries, no attention, the same bits; a flow model's
                               (SD3's) (c, pooled) as it is: its joint attention's text keys change in every block
    batches(n, size)           the inversion's UNet batches, ending at n - j size whatever the skip: an inversion at a
                               larger skip batches its steps as one at a smaller skip, but for its first batch (sweeps
                               slice one inversion for every skip)
    feeds_back(sampler, size)  whether the inversion feeds each UNet call the recomputed latent mu_k + C_k z_k (x_t up
                               to rounding), as LEditsPPPipelineStableDiffusion's invert: dpmsolver++ at batch size 1
    explicit_attention         attention with its probabilities materialised: diffusers' AttnProcessor arithmetic
    pipeline_attention(sd)     `with parity.pipeline_attention(sd):` every UNet attention that no controller reads
                               computes with explicit_attention, in this thread's calls (nets/layers.py); with
                               invert(..., batch_size=1) a LEDITS++ inversion and edit are then the diffusers
                               pipeline's bit for bit
"""
from dataclasses import dataclass

import torch

from .nets.layers import Attention, attend, attention, attention_probs


def embed(sd, *groups: list[str]):
    parts = [sd.text_embeddings(g) for g in groups if g]
    return tuple(map(torch.cat, zip(*parts))) if isinstance(parts[0], tuple) else torch.cat(parts)


@dataclass(frozen=True)
class TextKV:
    """c [R, M, D] with each cross-attention's k, v [R, M, inner]: kv[attn2] = (k, v); goes where c went (read by
    layers.Attention); repeat_interleave(n, 0) repeats the rows as the tensor's does, without copying until used."""
    context: torch.Tensor
    kv: dict
    repeats: int = 1
    zero_v: bool = False  # every layer's v is exactly 0 (and needs no gradient): attn2 is to_out's bias

    def __len__(self):
        return len(self.context) * self.repeats

    def repeat_interleave(self, n: int, dim: int = 0) -> "TextKV":
        assert dim == 0, "rows only"
        return TextKV(self.context, self.kv, self.repeats * n, self.zero_v)

    def keys_values(self, attn) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.kv[attn]
        return kv if self.repeats == 1 else tuple(x.repeat_interleave(self.repeats, 0) for x in kv)


def unet_text_kv(unet, context: torch.Tensor) -> TextKV:
    kv = {m: (m.to_k(context), m.to_v(context)) for m in unet.modules() if isinstance(m, Attention) and m.layer.cross}
    zero_v = not any(v.requires_grad or v.any() for _, v in kv.values())  # all 0, no gradient to keep
    return TextKV(context, kv, zero_v=zero_v)


def text_kv(sd, c):  # c: text_embeddings' output, or SDXL's or SD3's pair (c, pooled)
    if sd.prediction_type == "flow":
        return c
    return (unet_text_kv(sd.unet, c[0]), c[1]) if isinstance(c, tuple) else unet_text_kv(sd.unet, c)


def batches(n: int, size: int) -> list[tuple[int, int]]:  # (start, end) of each batch
    edges = sorted({0, *range(n % size, n + 1, size)})
    return list(zip(edges, edges[1:]))


def feeds_back(sampler, batch_size: int) -> bool:
    return batch_size == 1 and sampler.name == "dpmsolver++"


def explicit_attention(q, k, v, heads: int, upcast: bool = False, causal: bool = False):
    """attend(attention_probs(q, k), v): the processor LEditsPPPipelineStableDiffusion sets for its invert and edit;
    causal attention (CLIP's) stays fused."""
    if causal:
        return attention(q, k, v, heads, upcast, causal)
    return attend(attention_probs(q, k, heads, upcast), v).to(q.dtype)


def pipeline_attention(sd):  # UNet.attention_kernel
    return sd.unet.attention_kernel(explicit_attention)
