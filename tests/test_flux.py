"""Flux against diffusers' FluxPipeline on the same random weights (tests/flux_hub.py, dev and schnell): the prompt
embeddings, one transformer call (packing, ids, t / 1000, the guidance embedding), the VAE with its shift, whole
samplings with FlowEuler's dynamic shift; and loading: FLUX folders, strict keys, shards, bf16 files without an fp32
copy, a missing network, the Hub's files for FLUX.1-dev / -schnell (dev gated), offload_text."""
import shutil
import types

import pytest
import torch
from diffusers import FluxPipeline
from safetensors import safe_open

import minledits
from minledits.errors import LoadError, MinleditsError
from minledits.flowmatch import FlowEuler, image_tokens
from minledits.flux import Flux
from minledits.io import load as load_module
from minledits.sd3 import StableDiffusion3
from tests import flux_hub, hub, sd3_hub
from tests.helpers import fake_snapshot_download, watch_fp32_reads

PROMPTS = ["", "a photo of a cat", "watercolor painting of an old man wearing glasses " * 10,   # past 77 CLIP tokens
           "red blue green yellow " * 140]                                                      # past 512 T5 tokens


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def one_line(err, *fragments):
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400 and all(f in msg for f in fragments), msg


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    return {kind: flux_hub.make(tmp_path_factory.mktemp(kind) / "m", kind=kind, seed=i)
            for i, kind in enumerate(flux_hub.KINDS)}


@pytest.fixture(scope="module")
def models(refs):
    return {kind: minledits.load(r.folder) for kind, r in refs.items()}


@pytest.mark.parametrize("kind", flux_hub.KINDS)
def test_loads_as_flux(kind, models):
    sd = models[kind]
    assert isinstance(sd, Flux) and sd.unet is sd.transformer and sd.prediction_type == "flow"
    assert sd.latent_scale == 8 and sd.default_size == 1024 and sd.default_guidance == 3.5
    assert sd.guidance_embeds == (kind == "dev") and sd.schedule["uniform_sigmas"]
    assert sd.schedule["use_dynamic_shifting"] == (kind == "dev") and sd.schedule["shift"] == (3.0 if kind == "dev"
                                                                                                else 1.0)
    assert sd.vae.shift_factor == pytest.approx(0.1159) and sd.vae.scaling_factor == pytest.approx(0.3611)
    other = models["schnell" if kind == "dev" else "dev"]
    assert sd.fingerprint.startswith("sha256-") and sd.fingerprint != other.fingerprint
    assert sd.tokenizer_2.max_length == 512 and not sd.text_offloaded
    sd.check_fits(32, 48)
    with pytest.raises(MinleditsError) as err:
        sd.check_fits(32, 40)
    one_line(err, "40x32 px", "multiples of 16")


def test_vae_matches_diffusers(models, refs):
    sd, vae = models["dev"], refs["dev"].pipe.vae
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        w = sd.encode(x)
        expected = (vae.encode(x).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        assert w.shape == (2, 16, 4, 6) and rel(w, expected) <= 1e-5      # float rounding (SD3's VAE tests' bound)
        # as FluxPipeline decodes (output_type != "latent"), on the unpacked latent
        assert rel(sd.decode(w), vae.decode(w / vae.config.scaling_factor + vae.config.shift_factor).sample) <= 1e-5


def test_text_embeddings_match_pipeline(models, refs):
    sd = models["dev"]
    with pytest.warns(UserWarning) as caught, torch.no_grad():
        c, pooled = sd.text_embeddings(PROMPTS)
    messages = [str(w.message) for w in caught]
    assert sum("CLIP tokens" in m for m in messages) == 2          # two prompts past CLIP's 77
    assert sum("511 T5 tokens: truncated" in m for m in messages) == 1
    with torch.no_grad():
        expected, expected_pooled, txt_ids = refs["dev"].pipe.encode_prompt(PROMPTS, None)
    assert c.shape == (4, 512, 32) and pooled.shape == (4, 16) and txt_ids.shape == (512, 3)
    assert rel(c, expected) <= 1e-6 and rel(pooled, expected_pooled) <= 1e-6


def pipeline_call(pipe, x, t, c, pooled, guidance):
    """One transformer call as FluxPipeline.__call__ makes it, on the unpacked latent x [B, 16, h, w]."""
    B, C, h, w = x.shape
    packed = FluxPipeline._pack_latents(x, B, C, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, x.device, x.dtype)
    txt_ids = torch.zeros(c.shape[1], 3)
    V = pipe.transformer(hidden_states=packed, timestep=t.expand(B).to(x.dtype) / 1000, guidance=guidance,
                         pooled_projections=pooled, encoder_hidden_states=c, txt_ids=txt_ids, img_ids=img_ids,
                         return_dict=False)[0]
    return FluxPipeline._unpack_latents(V, 8 * h, 8 * w, 8)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 512, 32, generator=g), torch.randn(2, 16, generator=g)


def test_predict_matches_one_transformer_call(models, refs):
    sd, pipe = models["dev"], refs["dev"].pipe
    x, c, pooled = inputs()
    t = FlowEuler(sd.schedule, 28, image_tokens(4, 6)).timesteps[5]
    with torch.no_grad():
        for guidance, g in [(None, [3.5, 3.5]), (7.0, [7.0, 7.0]), (torch.tensor([1.5, 5.5]), [1.5, 5.5])]:
            v = sd.predict(x, t, (c, pooled), guidance)
            expected = pipeline_call(pipe, x, t, c, pooled, torch.tensor(g))
            assert v.shape == x.shape and rel(v, expected) <= 1e-6, guidance
        v = sd.predict(x, torch.stack([t, t / 2]), (c, pooled), 2.0)       # per-row times
        expected = torch.cat([pipeline_call(pipe, x[i:i + 1], s, c[i:i + 1], pooled[i:i + 1], torch.tensor([2.0]))
                              for i, s in enumerate([t, t / 2])])
        assert rel(v, expected) <= 1e-6 and rel(v[1], sd.predict(x, t, (c, pooled), 2.0)[1]) > 1e-3
        assert rel(sd.predict(x, t, (c, pooled), 2.0), sd.predict(x, t, (c, pooled), 3.0)) > 1e-3  # g matters
    for bad in (torch.ones(3), torch.ones(2, 1)):
        with pytest.raises(ValueError) as err:
            sd.predict(x, t, (c, pooled), bad)
        one_line(err, "guidance", "per row (2)")


def test_schnell_predicts_without_guidance(models, refs):
    sd, pipe = models["schnell"], refs["schnell"].pipe
    x, c, pooled = inputs(2)
    t = torch.tensor(750.0)
    with torch.no_grad():
        assert rel(sd.predict(x, t, (c, pooled)), pipeline_call(pipe, x, t, c, pooled, None)) <= 1e-6
    with pytest.raises(ValueError) as err:
        sd.predict(x, t, (c, pooled), 3.5)
    one_line(err, "no guidance embedding", "schnell")


@pytest.mark.parametrize("N", [2, 4])
@pytest.mark.parametrize("kind", flux_hub.KINDS)
def test_sampling_matches_pipeline(kind, N, models, refs):
    """FlowEuler (the image's tokens for the dynamic shift) + predict, from the same x_0, as FluxPipeline's whole run
    (32 x 48 px, output_type "latent"); the pipeline's timesteps are FlowEuler's bit for bit."""
    sd, pipe = models[kind], refs[kind].pipe
    x = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(N))
    prompt = "a photo of a cat"
    with torch.no_grad():
        packed = pipe(prompt=prompt, num_inference_steps=N, guidance_scale=4.0, height=32, width=48,
                      latents=FluxPipeline._pack_latents(x.clone(), 1, 16, 4, 6), output_type="latent").images
        expected = FluxPipeline._unpack_latents(packed, 32, 48, 8)
        c = sd.text_embeddings([prompt])
        flow = FlowEuler(sd.schedule, N, image_tokens(4, 6))
        for k in range(N):
            x = flow.step(k, x, sd.predict(x, flow.timesteps[k], c, 4.0 if sd.guidance_embeds else None))
    assert torch.equal(flow.timesteps, pipe.scheduler.timesteps) and torch.equal(flow.sigmas, pipe.scheduler.sigmas)
    assert rel(x, expected) <= 1e-5


# --------------------------------------------------------------------------------------------- loading
def test_strict_keys_named(refs, tmp_path):
    folder = flux_hub.write(refs["dev"].modules, tmp_path / "m")
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        items = [(("extra.weight" if k == "norm_out.linear.bias" else k), f.get_tensor(k)) for k in f.keys()]
    hub.save_safetensors(items, path)
    with pytest.raises(LoadError) as err:
        minledits.load(folder)
    one_line(err, str(path), "1 missing (norm_out.linear.bias)", "1 unexpected (extra.weight)")


@pytest.mark.parametrize("absent", ["text_encoder_2", "vae", "tokenizer_2/tokenizer.json"])
def test_missing_part_named(refs, tmp_path, absent):
    folder = tmp_path / "m"
    shutil.copytree(refs["schnell"].folder, folder)
    (shutil.rmtree if (folder / absent).is_dir() else lambda p: p.unlink())(folder / absent)
    with pytest.raises(LoadError) as err:
        minledits.load(folder)
    one_line(err, f"has no {absent}", "FLUX.1 model folder holds")


def test_without_t5_refused(refs):
    with pytest.raises(LoadError) as err:
        minledits.load(refs["dev"].folder, t5=False)
    one_line(err, "FLUX.1", "cannot run without T5")


def test_folder_without_model_index(refs, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(refs["dev"].folder, folder)
    (folder / "model_index.json").unlink()
    assert isinstance(minledits.load(folder), Flux)        # transformer/config.json names FluxTransformer2DModel


def test_sd3_keeps_refusing_the_dynamic_shift(tmp_path):
    ref = sd3_hub.make(tmp_path / "sd3", t5=False)
    config = ref.folder / "scheduler" / "scheduler_config.json"
    sd3_hub._write_json(config, {**load_module.read_json(config), "use_dynamic_shifting": True})
    with pytest.raises(LoadError) as err:
        minledits.load(ref.folder, t5=False)
    one_line(err, "use_dynamic_shifting is not supported for Stable Diffusion 3")


@pytest.fixture(scope="module")
def bf16_folder(refs, tmp_path_factory):
    """The dev weights as published: bf16, the transformer and T5 in 2 shards."""
    return flux_hub.write(refs["dev"].modules, tmp_path_factory.mktemp("bf16") / "m", dtype=torch.bfloat16, shards=2)



def test_bf16_files_load_without_an_fp32_tensor(bf16_folder, refs, monkeypatch):
    names = sorted(p.name for p in (bf16_folder / "transformer").iterdir())
    assert names == ["config.json", "diffusion_pytorch_model-00001-of-00002.safetensors",
                     "diffusion_pytorch_model-00002-of-00002.safetensors",
                     "diffusion_pytorch_model.safetensors.index.json"]
    assert (bf16_folder / "text_encoder_2" / "model.safetensors.index.json").is_file()
    alive = watch_fp32_reads(monkeypatch)
    sd = minledits.load(bf16_folder, dtype="bf16")
    assert alive == []                                      # not one fp32 tensor read
    for module in (sd.transformer, sd.vae, sd.text_encoder, sd.text_encoder_2):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    expected = refs["dev"].modules["transformer"].state_dict()
    assert all(torch.equal(p, expected[n].bfloat16()) for n, p in sd.transformer.state_dict().items())
    with torch.no_grad():
        c, pooled = sd.text_embeddings(PROMPTS[1:2])
        v = sd.predict(torch.randn(1, 16, 4, 4, dtype=torch.bfloat16), 500.0, (c, pooled))
    assert c.dtype == pooled.dtype == v.dtype == torch.bfloat16 and v.isfinite().all()
    assert rel(c, refs["dev"].pipe.encode_prompt(PROMPTS[1:2], None)[0]) < 2e-2
    assert minledits.load(bf16_folder, dtype="fp32").fingerprint == sd.fingerprint     # the same files


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load_of_fp32_files_holds_one_fp32_tensor_at_a_time(refs, dtype, monkeypatch):
    alive = watch_fp32_reads(monkeypatch, fp16=dtype == torch.float16)
    sd = minledits.load(refs["dev"].folder, dtype=dtype)        # fp32 files
    assert len(alive) > 100 and {p.dtype for p in sd.transformer.parameters()} == {dtype}
    for name, p in sd.text_encoder_2.named_parameters():        # T5's wo kept in fp32 under fp16 (as transformers)
        assert p.dtype == (torch.float32 if dtype == torch.float16 and name.endswith(".wo.weight") else dtype), name


@pytest.mark.parametrize("kind", flux_hub.KINDS)
def test_hub_files(kind, refs, bf16_folder, tmp_path, monkeypatch):
    """Only the files load reads: the configs, both tokenizers (T5's tokenizer.json), each network's shards; not the
    original-format files at the top of the repo."""
    folder = tmp_path / "repo"
    shutil.copytree(bf16_folder if kind == "dev" else refs[kind].folder, folder)
    for name in (f"flux1-{kind}.safetensors", "ae.safetensors"):
        (folder / name).write_bytes(b"not fetched")
    snapshot = tmp_path / "hub" / "snapshots" / ("f" * 40)
    calls = fake_snapshot_download(monkeypatch, folder, snapshot)
    monkeypatch.chdir(tmp_path)
    sd = minledits.load(f"black-forest-labs/FLUX.1-{kind}", dtype="bf16")
    assert isinstance(sd, Flux) and sd.fingerprint == "f" * 40 and len(calls) == 1
    assert not (snapshot / f"flux1-{kind}.safetensors").exists() and not (snapshot / "ae.safetensors").exists()
    fetched = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    copied = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and
                    p.name not in (f"flux1-{kind}.safetensors", "ae.safetensors"))
    assert fetched == copied and "tokenizer_2/tokenizer.json" in fetched


def test_gated_dev_says_accept_the_licence(monkeypatch, tmp_path):
    from huggingface_hub.utils import GatedRepoError

    def refused(repo_id, **kw):
        raise GatedRepoError("403 Client Error: access to model black-forest-labs/FLUX.1-dev is restricted",
                             response=types.SimpleNamespace(headers={}, request=None))
    monkeypatch.setattr("huggingface_hub.snapshot_download", refused)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoadError) as err:
        minledits.load("black-forest-labs/FLUX.1-dev")
    one_line(err, "gated", "accept its terms on https://huggingface.co/black-forest-labs/FLUX.1-dev", "log in")


def test_offload_text(refs, monkeypatch):
    sd = minledits.load(refs["dev"].folder)
    with torch.no_grad():
        before = sd.text_embeddings(PROMPTS[:2])
    moves = []                               # no second device here: the moves are recorded (to the CPU: no-ops)
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        m = getattr(sd, name)
        monkeypatch.setattr(m, "to", lambda device, m=m, name=name: moves.append((name, str(device))) or m)
    sd.offload_text()
    encoders = ["text_encoder", "text_encoder_2"]
    assert sd.text_offloaded and moves == [(n, "cpu") for n in encoders]
    moves.clear()
    with torch.no_grad():
        after = sd.text_embeddings(PROMPTS[:2])
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert moves == [("transformer", "cpu"), *[(n, str(sd.device)) for n in encoders], *[(n, "cpu") for n in encoders],
                     ("transformer", str(sd.device))]
    offloaded = minledits.load(refs["dev"].folder, offload_text=True)
    assert offloaded.text_offloaded and not isinstance(offloaded, StableDiffusion3)
    assert {p.device.type for m in offloaded.text_encoders() for p in m.parameters()} == {"cpu"}


# --------------------------------------------------------------------------------------------- full size
# black-forest-labs/FLUX.1-dev's configs (transformer/, text_encoder/, text_encoder_2/, vae/ config.json), the keys
# that matter here.
FULL = {
    "transformer": {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
                    "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24,
                    "num_layers": 19, "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768},
    "text_encoder": {"architectures": ["CLIPTextModel"], "eos_token_id": 2, "hidden_act": "quick_gelu",
                     "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
                     "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12,
                     "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408},
    "text_encoder_2": {"architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096,
                       "dense_act_fn": "gelu_new", "feed_forward_proj": "gated-gelu", "is_gated_act": True,
                       "layer_norm_epsilon": 1e-06, "num_heads": 64, "num_layers": 24,
                       "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
                       "tie_word_embeddings": False, "vocab_size": 32128},
    "vae": {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 16,
            "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "scaling_factor": 0.3611,
            "shift_factor": 0.1159, "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": False,
            "use_quant_conv": False}}
# Their parameters (the memory table of the README: x 2 bytes in bf16, x 4 in fp32; T5's wo: 1,006,632,960 of its
# parameters, kept in fp32 under fp16).
FULL_PARAMETERS = {"transformer": 11_901_408_320, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656,
                   "vae": 83_819_683}


def test_full_size_parameter_counts():
    """Ours built on the meta device from FLUX.1-dev's configs has the parameters diffusers' and transformers' modules
    have (T5's tied embedding counted once)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    clean = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    with torch.device("meta"):
        reference = {"transformer": FluxTransformer2DModel(**clean(FULL["transformer"])),
                     "text_encoder": CLIPTextModel(CLIPTextConfig(**FULL["text_encoder"])),
                     "text_encoder_2": T5EncoderModel(T5Config(**FULL["text_encoder_2"])),
                     "vae": AutoencoderKL(**clean(FULL["vae"]))}
    for name, config in FULL.items():
        ours = load_module.build(name, config, name, load_module.FLUX_CLASSES).state_dict()
        theirs = {key: v.shape for k, v in reference[name].state_dict().items()   # the keys as the loader reads them
                  if (key := load_module.rename(name if name != "text_encoder_2" else "t5", k)) is not None
                  and key != "encoder.embed_tokens.weight"}
        assert {k: v.shape for k, v in ours.items()} == theirs, name
        assert sum(t.numel() for t in ours.values()) == FULL_PARAMETERS[name], name
    wo = sum(t.numel() for k, t in load_module.build("text_encoder_2", FULL["text_encoder_2"], "t5",
                                                     load_module.FLUX_CLASSES).state_dict().items()
             if k.endswith(".wo.weight"))
    assert wo == 1_006_632_960
