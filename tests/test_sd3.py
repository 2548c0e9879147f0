"""StableDiffusion3 against diffusers' StableDiffusion3Pipeline on the same random weights (tests/sd3_hub.py): the VAE,
the prompt embeddings (with and without T5, truncation), the transformer's velocity and a few sampling steps with
classifier-free guidance; and loading: strictness, sharded and fp16 files, t5=False, the Hub's download patterns."""
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open

import minledits
from minledits.errors import LoadError
from minledits.flowmatch import FlowEuler
from minledits.model import repeat_rows, rows
from minledits.sd3 import StableDiffusion3
from tests import hub, sd3_hub
from tests.helpers import fake_snapshot_download, watch_fp32_reads

PROMPTS = ["", "a photo of a cat", "watercolor painting of an old man wearing glasses " * 10,   # past 77 CLIP tokens
           "red blue green yellow " * 70]                                                       # past 256 T5 tokens


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return sd3_hub.make(tmp_path_factory.mktemp("sd3") / "m")


@pytest.fixture(scope="module")
def sd(ref):
    return minledits.load(ref.folder)


@pytest.fixture(scope="module")
def ref35(tmp_path_factory):
    return sd3_hub.make(tmp_path_factory.mktemp("sd35") / "m", kind="sd35", seed=3)


def test_loads_as_sd3(sd, ref):
    assert isinstance(sd, StableDiffusion3) and sd.unet is sd.transformer and sd.prediction_type == "flow"
    assert sd.latent_scale == 8 and sd.default_size == 1024 and sd.schedule["shift"] == 3.0
    assert sd.vae.shift_factor == pytest.approx(0.0609) and sd.vae.scaling_factor == pytest.approx(1.5305)
    assert sd.fingerprint.startswith("sha256-") and sd.text_encoder_3 is not None
    sd.check_fits(32, 32)


def test_vae_matches_diffusers(sd, ref):
    vae = ref.pipe.vae
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        w = sd.encode(x)
        expected = (vae.encode(x).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        assert w.shape == (2, 16, 4, 6) and rel(w, expected) <= 1e-5
        assert rel(sd.decode(w), vae.decode(w / vae.config.scaling_factor + vae.config.shift_factor).sample) <= 1e-5
    assert not hasattr(sd.vae.quant_conv, "weight") and not hasattr(sd.vae.post_quant_conv, "weight")


def encode_prompt(pipe, prompts):
    with torch.no_grad():
        c, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
    return c, pooled


def test_text_embeddings_match_pipeline(sd, ref):
    with pytest.warns(UserWarning) as caught, torch.no_grad():
        c, pooled = sd.text_embeddings(PROMPTS)
    messages = [str(w.message) for w in caught]
    assert sum("CLIP tokens" in m for m in messages) == 4        # two prompts, each for both CLIP tokenizers
    assert sum("255 T5 tokens: truncated" in m for m in messages) == 1
    expected, expected_pooled = encode_prompt(ref.pipe, PROMPTS)
    assert c.shape == (4, 77 + 256, 48) and pooled.shape == (4, 24)
    assert rel(c, expected) <= 1e-5 and rel(pooled, expected_pooled) <= 1e-5
    assert (c[:, :77, 16 + 24:] == 0).all() and c[:, 77:].abs().sum() > 0   # CLIP padded to T5's width; T5 there
    with torch.no_grad():
        one = sd.text_embeddings(PROMPTS[1:2])
    assert rel(one[0], c[1:2]) <= 1e-6 and rows(one) == 1 and rows(repeat_rows(one, 3)) == 3


def test_without_t5(ref, tmp_path):
    sd = minledits.load(ref.folder, t5=False)          # a folder with T5, read without it
    assert sd.text_encoder_3 is None and sd.tokenizer_3 is None
    reference = sd3_hub.load_pipe(ref.folder)
    reference.text_encoder_3 = reference.tokenizer_3 = None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c, pooled = sd.text_embeddings(PROMPTS)
    expected, expected_pooled = encode_prompt(reference, PROMPTS)
    assert (c[:, 77:] == 0).all() and rel(c, expected) <= 1e-5 and rel(pooled, expected_pooled) <= 1e-5
    bare = sd3_hub.make(tmp_path / "bare", t5=False)    # a folder without text_encoder_3/ at all
    assert not (bare.folder / "text_encoder_3").exists() and not (bare.folder / "tokenizer_3").exists()
    with torch.no_grad():
        c, pooled = minledits.load(bare.folder, t5=False).text_embeddings(PROMPTS[:2])
    expected, expected_pooled = encode_prompt(bare.pipe, PROMPTS[:2])
    assert rel(c, expected) <= 1e-5 and rel(pooled, expected_pooled) <= 1e-5
    with pytest.raises(LoadError, match=r"^\S*bare has no text_encoder_3/ \(T5\): load it with t5=False \(the "
                                        r"command line's --no-t5\)") as e:
        minledits.load(bare.folder)
    assert "\n" not in str(e.value)


def test_predict_matches_transformer(ref35):
    sd = minledits.load(ref35.folder)
    g = torch.Generator().manual_seed(1)
    x, c, pooled = torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 333, 48, generator=g), torch.randn(2, 24)
    with torch.no_grad():
        v = sd.predict(x, 750.0, (c, pooled))
        expected = ref35.pipe.transformer(hidden_states=x, timestep=torch.full((2,), 750.0), encoder_hidden_states=c,
                                          pooled_projections=pooled).sample
    assert v.shape == x.shape and rel(v, expected) <= 1e-5


def test_predict_without_t5_counts_its_zero_rows_once(ref35):
    """Without T5 the transformer gets 77 + 1 text rows, the last standing for the 256 equal ones; the velocity is the
    pipeline's on all 333 rows."""
    sd = minledits.load(ref35.folder, t5=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c, pooled = sd.text_embeddings(PROMPTS[:2])
    x = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(2))
    seen = []
    hook = sd.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[2].shape[1]))
    with torch.no_grad():
        v = sd.predict(x, 500.0, (c, pooled))
        expected = ref35.pipe.transformer(hidden_states=x, timestep=torch.full((2,), 500.0), encoder_hidden_states=c,
                                          pooled_projections=pooled).sample
    hook.remove()
    assert c.shape[1] == 333 and seen == [78] and rel(v, expected) <= 1e-5


@pytest.mark.parametrize("kind", ["sd3", "sd35"])
def test_sampling_matches_pipeline(kind, ref, ref35):
    """FlowEuler + predict + classifier-free guidance, N = 3 steps, as StableDiffusion3Pipeline from the same x_0."""
    r = ref if kind == "sd3" else ref35
    sd, N, s = minledits.load(r.folder), 3, 4.0
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = r.pipe(prompt="a photo of a cat", negative_prompt="", num_inference_steps=N, guidance_scale=s,
                          latents=x.clone(), height=32, width=32, output_type="latent").images
        c = sd.text_embeddings(["", "a photo of a cat"])
        flow = FlowEuler(sd.schedule, N)
        for k in range(N):
            v_u, v_c = sd.predict(torch.cat([x, x]), flow.timesteps[k].expand(2), c).chunk(2)
            x = flow.step(k, x, v_u + s * (v_c - v_u))
    assert rel(x, expected) <= 1e-5


# --------------------------------------------------------------------------------------------- loading
def test_strict_keys_named(ref, tmp_path):
    folder = sd3_hub.write(ref.modules, tmp_path / "m", t5=False)
    path = folder / "text_encoder_2" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        items = [(("text_model.extra.weight" if "final_layer_norm.bias" in k else k), f.get_tensor(k))
                 for k in f.keys()]
    hub.save_safetensors(items, path)
    with pytest.raises(LoadError) as e:
        minledits.load(folder, t5=False)
    assert str(path) in str(e.value) and "1 missing (text_model.final_layer_norm.bias)" in str(e.value)
    assert "1 unexpected (text_model.extra.weight)" in str(e.value) and "\n" not in str(e.value)


def test_sharded_t5_and_fp16(ref, tmp_path):
    sharded = sd3_hub.write(ref.modules, tmp_path / "m", t5_shards=3, fp16=True)
    names = sorted(p.name for p in (sharded / "text_encoder_3").iterdir())
    assert "model.safetensors.index.json" in names and "model-00003-of-00003.safetensors" in names
    assert "model.fp16-00001-of-00003.safetensors" in names and "model.safetensors" not in names
    sd = minledits.load(sharded)
    expected = minledits.load(ref.folder)                          # the same seed: the same T5 weights
    with torch.no_grad():
        assert torch.equal(sd.text_embeddings(PROMPTS[1:2])[0], expected.text_embeddings(PROMPTS[1:2])[0])
    half = minledits.load(sharded, dtype=torch.float16)            # reads the .fp16 shards
    for name, p in half.text_encoder_3.named_parameters():
        assert p.dtype == (torch.float32 if name.endswith(".wo.weight") else torch.float16), name
    for module in (half.transformer, half.vae, half.text_encoder, half.text_encoder_2):
        assert {p.dtype for p in module.parameters()} == {torch.float16}
    with torch.no_grad():
        c, pooled = half.text_embeddings(PROMPTS[1:2])
    assert c.dtype == pooled.dtype == torch.float16 and rel(c, sd.text_embeddings(PROMPTS[1:2])[0]) < 1e-2
    bf16 = minledits.load(sharded, dtype="bf16", t5=False)
    assert {p.dtype for m in (bf16.transformer, bf16.vae) for p in m.parameters()} == {torch.bfloat16}
    (sharded / "text_encoder_3" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(LoadError, match="lacks the shards model.safetensors.index.json names "
                                        r"\(model-00002-of-00003.safetensors\)"):
        minledits.load(sharded)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_load_of_fp32_files_holds_one_fp32_tensor_at_a_time(ref, dtype, monkeypatch):
    """No fp32 copy of a model: each fp32 tensor read from the files is gone (cast, then dropped) by the time the one
    after the next is read (fill holds the last one while reading the next), except T5's wo, kept in fp32 under fp16
    on purpose."""
    alive = watch_fp32_reads(monkeypatch, fp16=dtype == torch.float16)
    sd = minledits.load(ref.folder, dtype=dtype)      # the folder holds fp32 files only
    assert len(alive) > 100 and {p.dtype for p in sd.transformer.parameters()} == {dtype}


def test_hub_patterns(ref, tmp_path, monkeypatch):
    folder = sd3_hub.write(ref.modules, tmp_path / "repo", t5_shards=2, fp16=True)
    snapshot = tmp_path / "hub" / "snapshots" / ("f" * 40)
    calls = fake_snapshot_download(monkeypatch, folder, snapshot)
    monkeypatch.chdir(tmp_path)
    sd = minledits.load("owner/sd3", t5=False, dtype=torch.float16)
    assert sd.fingerprint == "f" * 40 + "-no-t5" and len(calls) == 1 and sd.text_encoder_3 is None
    assert not (snapshot / "text_encoder_3").exists() and not (snapshot / "tokenizer_3").exists()
    assert not (snapshot / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    sd = minledits.load("owner/sd3")
    assert sd.fingerprint == "f" * 40        # with T5: another model for an inversion file (check_model)
    files = sorted(p.name for p in (snapshot / "text_encoder_3").iterdir())
    assert files == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json"]
    assert sorted(p.name for p in (snapshot / "tokenizer_3").iterdir()) == ["special_tokens_map.json",
                                                                           "tokenizer.json", "tokenizer_config.json"]
    monkeypatch.setenv("MINLEDITS_WEIGHTS", str(tmp_path / "w"))          # weights/<last part>: no download
    shutil.copytree(folder, tmp_path / "w" / "sd3-tiny")
    sd = minledits.load("owner/sd3-tiny", t5=False)
    assert len(calls) == 2 and sd.fingerprint.startswith("sha256-") and sd.fingerprint.endswith("-no-t5")
    assert isinstance(sd, StableDiffusion3)


def test_hub_fp16_fallback_to_plain_shards(ref, tmp_path, monkeypatch):
    folder = sd3_hub.write(ref.modules, tmp_path / "repo", t5_shards=2)     # no fp16 files at all
    snapshot = tmp_path / "hub" / "snapshots" / ("e" * 40)
    calls = fake_snapshot_download(monkeypatch, folder, snapshot)
    monkeypatch.chdir(tmp_path)
    sd = minledits.load("owner/sd3", dtype=torch.float16)
    assert len(calls) == 2 and "text_encoder_3/model.safetensors.index.json" in calls[0][1]
    assert sorted(calls[1][1]) == sorted(["text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                                          "vae/diffusion_pytorch_model.safetensors",
                                          "transformer/diffusion_pytorch_model.safetensors",
                                          "text_encoder_3/model-*-of-*.safetensors"])     # the plain shards
    assert sd.text_encoder_3.shared.weight.dtype == torch.float16


def test_offload_text(ref, monkeypatch):
    sd = minledits.load(ref.folder)
    with torch.no_grad():
        before = sd.text_embeddings(PROMPTS[:2])
    moves = []                               # no second device here: the moves are recorded (to the CPU: no-ops)
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        m = getattr(sd, name)
        monkeypatch.setattr(m, "to", lambda device, m=m, name=name: moves.append((name, str(device))) or m)
    with torch.no_grad():
        sd.text_embeddings(PROMPTS[:2])
    assert moves == []                       # not offloaded: nothing moves
    sd.offload_text()
    encoders = ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert sd.text_offloaded and moves == [(n, "cpu") for n in encoders]
    moves.clear()
    with torch.no_grad():
        after = sd.text_embeddings(PROMPTS[:2])
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert [n for n, _ in moves] == ["transformer", *encoders, *encoders, "transformer"]   # one leaves, then one comes
    assert [d for _, d in moves] == ["cpu", str(sd.device), str(sd.device), str(sd.device), "cpu", "cpu", "cpu",
                                     str(sd.device)]
    offloaded = minledits.load(ref.folder, offload_text=True)
    assert offloaded.text_offloaded and not minledits.load(ref.folder, t5=False).text_offloaded
