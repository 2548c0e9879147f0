"""Inversion on a rectified flow (sampler "flow": flowmatch.FlowEuler in sampler.SAMPLERS): the trajectory, what
regenerating it returns (Euler's first-order error, exact only where the velocity is constant along the path; source
guidance at one end only), its file (float timesteps bit for bit), and the refusals between flow and diffusion models.

FakeFlow is a small flow model with SD3's interfaces (text_embeddings -> (c [B, 77 + 256, D], pooled), predict,
encode / decode, a transformer whose joint attention shows its image->text probabilities to a controller): the math
tests run on it because its velocity field can be made what a test needs (constant, smooth). The same inversion on
the tiny random SD3 (tests/sd3_hub.py, loaded by minledits.load) closes the file.
"""
import contextlib
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

import minledits
import minledits.flowmatch  # adds "flow" to sampler.SAMPLERS
from minledits import ledits, p2p, parity
from minledits.errors import InversionError
from minledits.flowmatch import FlowEuler, image_tokens
from minledits.io import store
from minledits.nets.layers import AttentionLayer
from minledits.sampler import SAMPLERS
from tests import flux_hub, reconstruction, sd3_hub
from tests.helpers import photo

SCHEDULE = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULE = {**SCHEDULE, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                 "base_image_seq_len": 256, "max_image_seq_len": 4096}  # FLUX.1-dev's: the shift follows the tokens
CLIP, T5, D, P = 77, 256, 12, 6  # text columns, joint attention width, pooled width


class FakeTokenizer:
    def tokenize(self, prompt: str) -> list[str]:
        return prompt.split()


def word(w: str, n: int) -> torch.Tensor:
    """A fixed random vector per word."""
    seed = int.from_bytes(hashlib.sha256(w.encode()).digest()[:4], "little")
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


class FakeTransformer(torch.nn.Module):
    """Two blocks of joint attention (image tokens = 2x2 patches of the latent; keys: the image tokens, then the
    77 + 256 text columns), heads 2; v = a smooth function of x, t and the attention's output."""

    def __init__(self, seed=0, channels=16, scale=0.3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g) / math.sqrt(s[0])  # noqa: E731
        d, self.heads, self.p = 4 * channels, 2, 2
        self.config = {"patch_size": 2, "in_channels": channels, "num_layers": 2}
        self.blocks = [dict(q=r(d, 8), k_img=r(d, 8), k_txt=r(D, 8), v_img=r(d, d), v_txt=r(D, d)) for _ in range(2)]
        self.mix, self.scale, self.ctrl = r(channels, channels), scale, None

    @contextlib.contextmanager
    def attention_controller(self, ctrl):
        before, self.ctrl = self.ctrl, ctrl
        try:
            yield ctrl
        finally:
            self.ctrl = before

    def forward(self, x, t, c, pooled):
        B, C, h, w = x.shape
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(B)[:, None, None] / 1000
        tokens = F.unfold(x, self.p, stride=self.p).transpose(1, 2)  # [B, N, 4 C]
        for i, b in enumerate(self.blocks):
            q = (tokens @ b["q"]).unflatten(-1, (self.heads, -1)).transpose(1, 2)
            k = torch.cat([tokens @ b["k_img"], c @ b["k_txt"]], 1).unflatten(-1, (self.heads, -1)).transpose(1, 2)
            v = torch.cat([tokens @ b["v_img"], c @ b["v_txt"]], 1)
            probs = (q @ k.transpose(-1, -2) / 2).softmax(-1)  # [B, heads, N, N + M]
            N, layer = tokens.shape[1], AttentionLayer(f"transformer_blocks.{i}.attn", "joint", i, True)
            ctrl, size = self.ctrl, (h // self.p, w // self.p)
            if ctrl is not None and getattr(ctrl, "wants", lambda *a: True)(layer, size):
                if ctrl(layer, size, probs[..., N:]) is not None:
                    raise ValueError("read-only")
            tokens = tokens + torch.tanh(probs.mean(1) @ v) * (1 - t)
        out = F.fold(tokens.transpose(1, 2), (h, w), self.p, stride=self.p)
        drift = pooled.mean(-1).view(B, 1, 1, 1) * t.view(B, 1, 1, 1)
        return self.scale * (torch.tanh(torch.einsum("dc,bchw->bdhw", self.mix, out)) + drift)


class ConstantTransformer(FakeTransformer):
    """v = a fixed field: straight paths, on which Euler is exact."""

    def forward(self, x, t, c, pooled):
        return torch.ones_like(x) * torch.linspace(-1, 1, x.shape[-1])


class FakeVAE:
    config = {"latent_channels": 16, "block_out_channels": [8, 8, 8, 8]}


class FakeFlow:
    """SD3's interface on fake networks: a flow model in everything the methods use."""
    prediction_type, default_size, latent_scale = "flow", 64, 8
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, transformer=None, name="fake-flow"):
        self.unet = self.transformer = transformer if transformer is not None else FakeTransformer()
        self.tokenizer, self.vae, self.schedule = FakeTokenizer(), FakeVAE(), dict(SCHEDULE)
        self.model_id, self.fingerprint = name, f"sha256-{name}"

    def check_fits(self, height, width):
        pass

    def text_embeddings(self, prompts):
        """c: BOS, each word's vector, then EOS / padding in the 77 CLIP columns, the words again in T5's 256."""
        rows = []
        for p in prompts:
            words = p.split()[:75]
            clip = [word("<bos>", D)] + [word(w, D) for w in words] + [word("<eos>", D)] * (CLIP - 1 - len(words))
            t5 = [word("t5:" + w, D) for w in words] + [torch.zeros(D)] * (T5 - len(words))
            rows.append(torch.stack(clip + t5))
        c = torch.stack(rows)
        return c, c[:, :CLIP].mean(1)[:, :P]

    def predict(self, x, t, c):
        return self.transformer(x, t, c[0], c[1])

    def encode(self, x):
        return F.avg_pool2d(x, 8).repeat(1, 6, 1, 1)[:, :16] * 2

    def decode(self, w):
        return F.interpolate(w[:, :3], scale_factor=8)


@pytest.fixture(scope="module")
def flow():
    return FakeFlow()


def invert(sd, steps=10, skip=0, **kw):
    return minledits.invert(sd, photo(), sampler="flow", steps=steps, skip=skip, size=64, **kw)


def regenerate(sd, inv, **kw):
    """The inversion edited with nothing: target guidance 1, the unconditional velocity alone."""
    return ledits.edit(sd, inv, target_guidance=kw.pop("target_guidance", 1.0), **kw)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_flow_is_a_trajectory_sampler():
    s = SAMPLERS["flow"].for_inversion(SCHEDULE, 10, False)
    assert SAMPLERS["flow"] is FlowEuler and s.trajectory and s.name == "flow" and s.outputs == ("flow",)
    x, v, z = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    assert torch.equal(s.step(3, x, v, z), s.step(3, x, v)) and torch.equal(s.mu(3, x, v), s.step(3, x, v))
    assert not s.noise_map(3, x, s.step(3, x, v), v).any()
    assert torch.allclose(s.x0_hat(3, x, v), x - s.sigmas[3] * v, atol=1e-6)
    assert torch.equal(s.add_noise(3, x, z), s.scale_noise(3, x, z))
    assert torch.equal(s.inv_timesteps, s.sigmas[1:] * 1000) and [FlowEuler.default_skip(n) for n in (50, 28)] == [
        17, 10]  # FlowEdit's n_max 33 of 50
    assert minledits.InversionSettings(sampler="flow", steps=50).skip == 17
    with pytest.raises(ValueError, match="no meaning for the flow sampler"):
        minledits.InversionSettings(sampler="flow", keep_last_noise=True)


def test_the_trajectory_runs_the_model_where_the_inverse_step_wants_it(flow, monkeypatch):
    calls, predict = [], flow.predict
    monkeypatch.setattr(flow, "predict", lambda x, t, c: calls.append((x.clone(), t)) or predict(x, t, c))
    inv = invert(flow, steps=6, skip=2)
    s = FlowEuler(SCHEDULE, 6)
    assert [float(t) for _, t in calls] == s.inv_timesteps[2:].flip(0).tolist()  # T sigma_{k+1}, k = 5 .. 2
    assert inv.timesteps == s.timesteps[2:].tolist() and all(isinstance(t, float) for t in inv.timesteps)
    assert torch.equal(calls[0][0], inv.w0)  # the last unstep starts from w0 at timestep 0
    for j, k in enumerate(range(2, 6)):  # x_k = unstep(k, x_{k+1}, v(x_{k+1}, T sigma_{k+1}))
        x = inv.xts[j + 1:j + 2]
        assert torch.equal(inv.xts[j:j + 1], s.unstep(k, x, predict(x, s.inv_timesteps[k], flow.text_embeddings([""]))))
    assert not inv.zs.any() and inv.zs.shape == (4, 16, 8, 8)


def test_regeneration_is_exact_where_the_velocity_is_constant():
    sd = FakeFlow(ConstantTransformer())
    inv = invert(sd, steps=10)
    w = regenerate(sd, inv)
    # each unstep and step add and subtract the same float32 product: rounding alone
    assert (w - inv.w0).abs().max() <= 2 * 10 * 2**-23 * (inv.xts.abs().max() + 1), (w - inv.w0).abs().max()


def test_regeneration_error_is_first_order_in_the_step(flow):
    """Euler's v at (x_{k+1}, sigma_{k+1}) on the way up, at (x_k, sigma_k) on the way down: the error halves when
    the steps double, and is far above rounding."""
    errors = [rel(regenerate(flow, inv := invert(flow, steps=n)), inv.w0) for n in (10, 20, 40)]
    assert errors[0] > 1e-3, errors
    assert all(1.6 < a / b < 2.4 for a, b in zip(errors, errors[1:])), errors


def test_source_guidance_at_one_end_only_breaks_it(flow):
    """Inverted with v_u + s_src (v_src - v_u), regenerated with v_u: two different fields, so the error has a part
    that does not shrink with the steps; regenerated with the same guidance (target = source, s_tar = s_src) it is
    first order again."""
    one_end, both = [], []
    for n in (10, 20):
        inv = invert(flow, steps=n, source_prompt="a red cat", source_guidance=3.5)
        one_end.append(rel(regenerate(flow, inv), inv.w0))
        both.append(rel(regenerate(flow, inv, target_prompt="a red cat", target_guidance=3.5), inv.w0))
    gap = [a - b for a, b in zip(one_end, both)]
    assert gap[1] > 0.8 * gap[0] > 0.01 and 1.6 < both[0] / both[1] < 2.4, (one_end, both)


def test_file_round_trip_keeps_float_timesteps_bit_for_bit(flow, tmp_path):
    inv = invert(flow, steps=7, skip=2, source_prompt="a cat")
    store.save(inv, tmp_path / "f.inv")
    back = store.load(tmp_path / "f.inv")
    assert back.timesteps == inv.timesteps and all(isinstance(t, float) for t in back.timesteps)
    assert torch.tensor(back.timesteps).dtype == torch.float32  # float32 values, as the sampler's
    assert torch.equal(back.xts, inv.xts) and back.settings == inv.settings
    assert torch.equal(regenerate(flow, back), regenerate(flow, inv))
    assert torch.equal(ledits.edit(flow, tmp_path / "f.inv"), ledits.edit(flow, inv))


def test_a_flow_inversion_is_refused_on_a_diffusion_model_and_the_reverse(flow, sd1, inv1):
    inv = invert(flow, steps=4)
    for model, other in ((sd1, inv), (flow, inv1)):
        with pytest.raises(InversionError) as e:
            ledits.edit(model, other)
        msg = str(e.value)
        assert "\n" not in msg and "sampler, for another kind of model" in msg and "invert again" in msg, msg
    with pytest.raises(ValueError, match=r"the flow sampler does not work on this model \(it predicts epsilon\); "
                                         r"use ddpm or ddim or dpmsolver\+\+"):
        minledits.invert(sd1, photo(), sampler="flow", steps=4, size=64)
    with pytest.raises(ValueError, match=r"the ddpm sampler does not work on this model \(it predicts flow\); use "
                                         r"flow$"):
        minledits.invert(flow, photo(), sampler="ddpm", steps=4, size=64)


def test_text_passes_through_unchanged(flow):
    c = flow.text_embeddings(["", "a cat"])
    assert parity.text_kv(flow, c) is c


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """The tiny random SD3 without T5 (its columns zeros, as the pipeline's): the methods never read T5 apart."""
    return minledits.load(sd3_hub.make(tmp_path_factory.mktemp("sd3") / "sd3", t5=False).folder, t5=False)


def test_on_the_tiny_sd3(sd3, sd1, tmp_path):
    """invert(sd3, sampler="flow") -> a file that reloads bit for bit and regenerates w0 up to Euler's first-order error
    (halving as the steps double), and with source guidance at the inversion alone up to an error that does not
    shrink; refused on SD 1.x, and an SD inversion on it."""
    invs = [invert(sd3, steps=n, seed=3) for n in (4, 8)]
    errors = [rel(regenerate(sd3, inv), inv.w0) for inv in invs]
    assert 1.5 < errors[0] / errors[1] < 2.5 and errors[1] > 1e-3, errors
    guided = [invert(sd3, steps=n, source_prompt="a photo of a cat", source_guidance=3.5) for n in (4, 8)]
    one_end = [rel(regenerate(sd3, inv), inv.w0) for inv in guided]
    both = rel(regenerate(sd3, guided[1], target_prompt="a photo of a cat", target_guidance=3.5), guided[1].w0)
    assert one_end[1] > 0.8 * one_end[0] and one_end[1] > 3 * both, (one_end, both)
    inv = invert(sd3, steps=6, skip=2, source_prompt="a cat")
    assert inv.xts.shape == (5, 16, 8, 8) and inv.timesteps == FlowEuler(sd3.schedule, 6).timesteps[2:].tolist()
    store.save(inv, tmp_path / "sd3.inv")
    back = store.load(tmp_path / "sd3.inv")
    assert back.timesteps == inv.timesteps and torch.equal(back.xts, inv.xts)
    assert torch.equal(regenerate(sd3, back), regenerate(sd3, inv))
    with pytest.raises(InversionError, match="flow sampler, for another kind of model"):
        ledits.edit(sd1, back)
    with pytest.raises(InversionError, match="ddpm sampler, for another kind of model"):
        ledits.edit(sd3, minledits.invert(sd1, photo(), steps=4, size=64))


def test_the_reconstruction_table_on_a_flow(sd3):
    """tests/reconstruction.py's flow rows (tiny SD3, 64 px): Euler's error halves as the steps double when the
    inversion and the regeneration take the same guidance; regenerated at 1 after source guidance 3.5, it stays."""
    found = {n: reconstruction.measure(sd3, photo(), n, 64, "a photo", [1, 3.5]) for n in (8, 16)}
    for s in (1, 3.5):
        assert 0.35 < found[16]["flow", s][0] / found[8]["flow", s][0] < 0.65
    assert found[16]["flow, regenerated at 1", 3.5][0] > 4 * found[16]["flow", 3.5][0]
    assert "| 16 | flow, regenerated at 1 | 3.5 |" in reconstruction.table(found[16], 16)


def test_prompt_to_prompt_refuses_a_flow_in_one_line(sd3):
    inv = minledits.invert(sd3, photo(), sampler="flow", steps=4, size=64, source_prompt="a cat")
    with pytest.raises(ValueError, match=r"^Prompt-to-Prompt replaces a UNet's cross-attention maps; this model \(a "
                                         r"rectified flow\) has joint attention instead: use leditspp or flowedit$"):
        p2p.edit(sd3, inv, "a dog")


def dynamic_flow():
    sd = FakeFlow(name="fake-flux")
    sd.schedule = dict(FLUX_SCHEDULE)
    return sd


def test_a_dynamic_shift_takes_the_latents_token_count(tmp_path):
    """With FLUX's dynamic shift the inversion's sigmas are those of its latent's token count (a centre-cropped
    square and a wide picture differ); the sampler is rebuilt from the inversion (file included) for that count, and
    refused in one line without it."""
    sd, found = dynamic_flow(), {}
    for keep in (False, True):
        inv = minledits.invert(sd, photo(size=(160, 80)), sampler="flow", steps=6, skip=1, size=128, keep_aspect=keep)
        h, w = inv.xts.shape[-2:]
        assert (h, w) == ((8, 16) if keep else (16, 16))
        flow = FlowEuler(sd.schedule, 6, image_tokens(h, w))
        assert inv.timesteps == flow.timesteps[1:].tolist() and torch.equal(inv.new_sampler(sd.schedule).sigmas,
                                                                            flow.sigmas)
        store.save(inv, tmp_path / f"{keep}.inv")
        back = store.load(tmp_path / f"{keep}.inv")
        back.check_model(sd)
        assert back.timesteps == inv.timesteps and not back.rf and "gamma" not in store.SETTINGS
        found[keep] = inv.timesteps
    assert found[False] != found[True]
    with pytest.raises(ValueError, match=r"^the dynamic shift needs the image's token count .*got None$"):
        inv.settings.new_sampler(sd.schedule)


def test_a_dynamic_shift_inversion_regenerates():
    sd = dynamic_flow()
    errors = [rel(regenerate(sd, inv := invert(sd, steps=n)), inv.w0) for n in (10, 20)]
    assert 1.6 < errors[0] / errors[1] < 2.4, errors


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return minledits.load(flux_hub.make(tmp_path_factory.mktemp("flux") / "flux").folder)


@pytest.mark.usefixtures("one_thread")
def test_on_the_tiny_flux(flux, tmp_path):
    """invert(flux, sampler="flow") of a wide picture: the sigmas of its latent's token count (FLUX.1-dev's dynamic
    shift); it regenerates w0 up to Euler's first-order error (halving as the steps double), as SD3's, and through its
    file bit for bit."""
    invs = [minledits.invert(flux, photo(size=(160, 80)), sampler="flow", steps=n, skip=0, size=128, keep_aspect=True,
                             seed=3) for n in (4, 8)]
    errors = [rel(regenerate(flux, inv), inv.w0) for inv in invs]
    assert 1.5 < errors[0] / errors[1] < 2.5 and errors[1] > 1e-3, errors
    inv = invs[0]
    assert inv.xts.shape == (5, 16, 8, 16) and inv.timesteps == FlowEuler(flux.schedule, 4, 32).timesteps.tolist()
    assert inv.timesteps != FlowEuler(flux.schedule, 4, 16).timesteps.tolist()  # a square's 16 tokens: other sigmas
    store.save(inv, tmp_path / "flux.inv")
    back = store.load(tmp_path / "flux.inv")
    assert back.timesteps == inv.timesteps and torch.equal(regenerate(flux, back), regenerate(flux, inv))
