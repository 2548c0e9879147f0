"""Seeing an edit: every per-step tensor of an edit, and pictures of them.

    trace = Trace(sd, inv); ledits.edit(sd, inv, ..., callback=trace)     (or leditspp.edit)
    trace.tensors()   every tensor of the method's EditStep stacked over the S steps (x_prev as "x", SEGA's
                      g, acts, q, G, m, E by their names), plus "x0_hat", "mu" and "t": LEDITS {"eps_u",
                      "eps_tar", "eps_c": [S, C, 1, 4, h, w], "acts", ...}; LEDITS++ {"eps_c", "g", "on", "attn":
                      [S, C, h', w'], "m_noise", "m_attn", "M", ...}
    trace.picture()   per step (columns, 16 per band): the x0 prediction, then per concept (one row each) its
                      LEDITS++ attention map A~_c (scaled to its maximum) and noise mask if the edit made them, and
                      the mask that was applied (white where the concept acts, averaged over the latent channels)
    FlowTrace(sd, image, steps); flowedit.edit(sd, image, ..., callback=trace): FlowEdit's steps (flowedit.py):
                      "x0_hat" the target branch's clean prediction, the mean over the draws j of
                      Z_t^tar,j - sigma_k V^tar,j (in the SDEdit-style tail: X_t^tar - sigma_k V^tar), "x" the edit's
                      state after the step (Z^FE, itself a clean latent: it runs from the photo's to the edit's),
                      "v_delta" (the tail: V^tar), "t", "tail"; its picture: the x0 prediction above the state
    RFTrace(sd, inv); rfinversion.edit(sd, inv, ..., callback=trace): RF-Inversion's reverse ODE (rfinversion.py):
                      "x0_hat" the clean latent the transformer predicts at X_k, X_k + sigma_k v_t(X_k) (v: its
                      velocity negated), "x" X_{k+1}, "v", "v_cond", "v_hat", "eta" (eta_k: the controller's
                      strength at the step, 0 outside start..stop), "t"; its picture: the x0 prediction above the state
The x0 predictions are shown through a linear latent -> RGB map (C channels + bias -> 3) fitted by least squares on
the input image and its latent (SD's 4 channels and SD3's 16 alike), not by the VAE (one decode per step would cost
more than the edit). With fewer latent pixels than C + 1 the fit is underdetermined (a rough picture).
"""
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save as save_bytes

from ..flowmatch import FlowEuler, image_tokens
from ..io.files import atomic
from ..io.image import to_pil


def tensors_of(step) -> dict:
    """The tensors of an EditStep by name, a nested dataclass's (SEGA's Guidance) by theirs; x_prev as "x"
    (x_t is the previous step's x)."""
    row = {}
    for f in dataclasses.fields(step):
        v = getattr(step, f.name)
        if dataclasses.is_dataclass(v):
            row.update(tensors_of(v))
        elif isinstance(v, torch.Tensor) and f.name != "x_t":
            row["x" if f.name == "x_prev" else f.name] = v
    return row


class Trace:
    """An edit callback that keeps a CPU copy of every tensor of every step, plus xhat_0 and mu_t (sampler.py)."""
    ROWS = ("attn", "m_noise", "M", "acts")  # the per-concept rows of the picture, in this order, where present

    PICTURED = ("x0_hat",)  # the latents pictured per step, one row each, above the concepts' rows

    def __init__(self, sd, inv):
        # its own sampler, called in the edit's order of k (a multistep sampler keeps a history)
        self.inv, self.sampler = inv, inv.new_sampler(sd.schedule)
        self.steps = defaultdict(list)
        self.rgb = latent_rgb(inv.w0, inv.image)

    def __call__(self, st):
        for k, v in self.row(st).items():
            self.steps[k].append(v.detach().to("cpu", copy=True))
        self.steps["t"].append(torch.tensor(st.t))

    def row(self, st) -> dict:
        """The tensors kept of one step, by name."""
        return dict(x0_hat=self.sampler.x0_hat(st.k, st.x_t, st.eps), mu=self.sampler.mu(st.k, st.x_t, st.eps),
                    **tensors_of(st))

    def tensors(self) -> dict:
        return {k: torch.stack(v) for k, v in self.steps.items()}

    @staticmethod
    def files(name) -> list[Path]:
        """--trace T: T.safetensors and T.png (a .safetensors or .png suffix given in T is dropped)."""
        base = Path(name).with_suffix("") if Path(name).suffix in (".safetensors", ".png") else Path(name)
        return [base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".png")]

    def save(self, tensors_path, picture_path, concepts=()):
        """The tensors (metadata: the names along their C axis, `labels`) and the picture, each written atomically."""
        with atomic(tensors_path) as tmp:
            tmp.write_bytes(save_bytes(self.tensors(), self.labels(concepts)))
        with atomic(picture_path) as tmp:
            self.picture().save(tmp, format="PNG")

    def labels(self, concepts) -> dict:
        """The concepts, in the order of the C axis."""
        return {"concepts": json.dumps(list(concepts))}

    def picture(self):
        """Per step (columns): the x0 prediction of the edited row (P2P: the target), then one row per concept (or
        word) of each of its maps in ROWS."""
        x0 = [self.rgb(torch.stack(self.steps[name])[:, -1]) for name in self.PICTURED]  # [S, 3, h, w] in [0, 1]
        maps = [tile(torch.stack(self.steps[name]), x0[0].shape[-2:]) for name in self.ROWS if name in self.steps]
        C = maps[0].shape[1] if maps else 0
        rows = x0 + [m[:, c, None].expand_as(x0[0]) for c in range(C) for m in maps]
        return grid(torch.stack(rows, 1))


def tile(m: torch.Tensor, hw) -> torch.Tensor:
    """[S, C, h, w] in [0, 1] from a per-step mask [S, C, 1, 4, h, w] (mean over channels) or an attention map
    [S, C, h', w'] (over its maximum, nearest-upsampled to hw)."""
    if m.dim() == 6:
        return m[:, :, 0].float().mean(2)
    m = m.float() / m.float().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return F.interpolate(m, size=tuple(hw))


def latent_rgb(w0: torch.Tensor, image: torch.Tensor):
    """A least-squares linear map latent [C] (+ bias) -> RGB, fitted on w0 [1, C, h, w] and the input image
    [1, 3, H, W] in [-1, 1] at latent size: a function latents [S, C, h, w] -> [S, 3, h, w] in [0, 1]."""
    w0 = w0.float().cpu()
    C = w0.shape[1]
    rgb = F.interpolate(image.float().cpu(), size=w0.shape[-2:], mode="area")
    X = torch.cat([w0[0].flatten(1), torch.ones(1, w0[0, 0].numel())]).T            # [hw, C + 1]
    A = torch.linalg.lstsq(X, rgb[0].flatten(1).T).solution                        # [C + 1, 3]
    rgb = lambda lat: torch.einsum("cr,schw->srhw", A[:C], lat.float().cpu()) + A[C, :, None, None]  # in [-1, 1]
    return lambda lat: (rgb(lat) / 2 + 0.5).clamp(0, 1)


def grid(tiles: torch.Tensor, cols: int = 16):
    """[S, R, 3, h, w] in [0, 1] -> PIL: item s in column s % cols of band s // cols, its R tiles stacked.
    Tiles are enlarged (nearest) to at least 64 pixels and framed in white."""
    zoom = max(1, -(-64 // tiles.shape[-1]))
    tiles = F.pad(tiles.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2), (1, 1, 1, 1), value=1.0)
    S, R, _, h, w = tiles.shape
    cols = min(cols, S)
    bands = -(-S // cols)
    tiles = torch.cat([tiles, tiles.new_ones(bands * cols - S, R, 3, h, w)])
    img = tiles.view(bands, cols, R, 3, h, w).permute(3, 0, 2, 4, 1, 5).reshape(3, bands * R * h, cols * w)
    return to_pil(img[None] * 2 - 1)[0]


class FlowTrace(Trace):
    """A FlowEdit edit's callback (flowedit.FlowStep): per step the target branch's x0 prediction, the edit's state,
    V_delta, t and whether the step is of the SDEdit-style tail (module docstring); the RGB map is fitted on the first
    step's state (the photo's latent X_0^src) and `image` [1, 3, H, W], the picture edited (preprocessed); the sigmas
    are the edit's, for its latent's size (FLUX's dynamic shift)."""
    PICTURED, ROWS = ("x0_hat", "x"), ()

    def __init__(self, sd, image: torch.Tensor, steps: int):
        self.schedule, self.N, self.image, self.flow, self.rgb = sd.schedule, steps, image, None, None
        self.steps = defaultdict(list)

    def __call__(self, st):
        if self.rgb is None:
            self.flow = FlowEuler(self.schedule, self.N, image_tokens(*st.x.shape[-2:]))
            self.rgb = latent_rgb(st.x, self.image)
        for k, v in self.row(st).items():
            self.steps[k].append(v.detach().to("cpu", copy=True))

    def row(self, st) -> dict:
        x0_hat = self.flow.x0_hat(st.k, st.zt_tar, st.v_tar).mean(0, keepdim=True)
        return dict(x0_hat=x0_hat, x=st.x_next, v_delta=st.v_delta, t=torch.as_tensor(st.t),
                    tail=torch.tensor(st.tail))

    def labels(self, concepts=()) -> dict:
        return {}


class RFTrace(Trace):
    """An RF-Inversion edit's callback (rfinversion.RFStep of the reverse ODE): per step the transformer's x0
    prediction, the state after the step, the three vector fields, eta_k and t (module docstring); the RGB map is fitted
    on the inversion's y_0 and picture, the sigmas are its sampler's."""
    PICTURED, ROWS = ("x0_hat", "x"), ()

    def __call__(self, st):
        if st.ode != "reverse":
            raise ValueError(f"RFTrace follows RF-Inversion's edit (the reverse ODE), not its {st.ode} ODE")
        for k, v in self.row(st).items():
            self.steps[k].append(v.detach().to("cpu", copy=True))

    def row(self, st) -> dict:
        x0_hat = self.sampler.x0_hat(st.i, st.x, -st.v)  # X_k - sigma_k (-v): v is the velocity negated
        return dict(x0_hat=x0_hat, x=st.x_next, v=st.v, v_cond=st.v_cond, v_hat=st.v_hat,
                    eta=torch.tensor(float(st.strength)), t=torch.as_tensor(st.t))

    def labels(self, concepts=()) -> dict:
        return {}


def side_by_side(images):
    """PIL images of one size, left to right."""
    return Image.fromarray(np.concatenate([np.asarray(im) for im in images], axis=1))


class AttentionTrace(Trace):
    """A Prompt-to-Prompt edit's callback (p2p.py): every tensor of both rows [source, target] per step, and per
    step the target row's cross-attention map of each word (its tokens summed; p2p.EditStep.attn: the mean over
    the layers at the map size and their heads). words: (word, token positions) of the target prompt."""
    ROWS = ("attn",)

    def __init__(self, sd, inv, words: list[tuple[str, list[int]]]):
        super().__init__(sd, inv)
        self.words = words

    def row(self, st) -> dict:
        row = super().row(st)
        if st.attn is not None:  # [W, h', w']
            row["attn"] = torch.stack([st.attn[1, ..., p].sum(-1) for _, p in self.words])
        return row

    def labels(self, concepts=()) -> dict:
        """The words, in the order of the attention maps' axis."""
        return {"words": json.dumps([w for w, _ in self.words])}
