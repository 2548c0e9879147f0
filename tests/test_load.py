"""minledits.load: folders in the official Hub layout (tests/hub.py), key variants, dtypes, errors, the Hub."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from minledits.errors import LoadError, MinleditsError
from minledits.io.load import NETWORKS, WEIGHT_STEM, download, dtype_of, fill, load, weight_file
from minledits.model import StableDiffusion
from minledits.nets.tokenizer import Tokenizer
from tests import hub
from tests.helpers import fake_snapshot_download

ROOT = Path(__file__).resolve().parents[1]


def copy(ref, tmp_path, name="m"):
    return Path(shutil.copytree(ref.folder, tmp_path / name))


def assert_one_line(err, *parts):
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value, MinleditsError), msg
    for p in parts:
        assert p in msg, f"{p!r} not in {msg!r}"


def same_weights(module, reference, prefix=""):
    ours = module.state_dict()
    ref = {prefix + k: v for k, v in reference.state_dict().items()}
    assert ours.keys() == ref.keys()
    return all(torch.equal(ours[k].float(), ref[k].float()) for k in ours)


@torch.no_grad()
def outputs(sd, ref):
    """(ours, reference) for the text encoder, UNet, VAE encode and decode on one fixed input each."""
    g = torch.Generator().manual_seed(0)
    ids = sd.tokenizer(["a photo of a cat wearing glasses"])
    ctx = ref.text_encoder(ids).last_hidden_state
    x, img = torch.randn(2, 4, 8, 8, generator=g), torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    return [(sd.text_encoder(ids), ctx),
            (sd.unet(x, 501, ctx.expand(2, -1, -1)), ref.unet(x, 501, ctx.expand(2, -1, -1)).sample),
            (sd.vae.encode(img), ref.vae.encode(img).latent_dist.mean),
            (sd.vae.decode(x[:1]), ref.vae.decode(x[:1]).sample)]


# --------------------------------------------------------------------------------------------- loading
def test_load_tiny(tiny):
    sd = load(tiny.folder)
    assert isinstance(sd, StableDiffusion)
    assert sd.prediction_type == tiny.prediction_type and sd.schedule.config["prediction_type"] == tiny.prediction_type
    assert sd.schedule.config["beta_schedule"] == "scaled_linear" and sd.schedule.a_bar.shape == (1000,)
    assert sd.tokenizer.pad_id == tiny.pad_id and sd.model_id == str(tiny.folder)
    assert sd.device == torch.device("cpu") and sd.dtype == torch.float32
    assert sd.fingerprint.startswith("sha256-") and len(sd.fingerprint) == 23
    for net in (sd.unet, sd.vae, sd.text_encoder):
        tensors = [*net.parameters(), *net.buffers()]
        assert not any(t.is_meta for t in tensors) and all(t.dtype == torch.float32 for t in tensors)
        assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert same_weights(sd.unet, tiny.unet) and same_weights(sd.vae, tiny.vae)
    assert same_weights(sd.text_encoder, tiny.text_encoder, "text_model.")
    for ours, ref in outputs(sd, tiny):  # smoke: the same numbers (exact parity is tests/test_models.py)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_clip_keys_without_prefix_and_position_ids(tiny_sd1, tmp_path):
    hub.write(tiny_sd1, tmp_path, prefix=False, position_ids=True)
    with safe_open(str(tmp_path / "text_encoder" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "embeddings.position_ids" in keys and not any(k.startswith("text_model.") for k in keys)
    sd = load(tmp_path)
    assert same_weights(sd.text_encoder, tiny_sd1.text_encoder, "text_model.")


@pytest.mark.parametrize("legacy", ["linear", "conv"])
def test_legacy_vae_attention_names(tiny_sd1, tmp_path, legacy):
    hub.write(tiny_sd1, tmp_path, legacy_vae=legacy)
    with safe_open(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        stored = {k: f.get_slice(k).get_shape() for k in f.keys() if ".attentions." in k}
    assert any(".query." in k for k in stored) and not any(".to_q." in k for k in stored)
    assert any(len(s) == (4 if legacy == "conv" else 2) for k, s in stored.items() if k.endswith("query.weight"))
    assert same_weights(load(tmp_path).vae, tiny_sd1.vae)


@pytest.fixture(scope="module")
def two_variants(tiny_sd1, tmp_path_factory):
    """A folder whose fp32 files hold seed 0 and whose fp16 files hold seed 1, to see which file is read."""
    folder = tmp_path_factory.mktemp("variants")
    a, b = tiny_sd1, hub.build("tiny-sd1", seed=1)
    hub.write(a, folder)
    hub.write(b, folder, fp32=False, fp16=True)
    return folder, a, b


def test_fp16_prefers_the_fp16_variant(two_variants):
    folder, a, b = two_variants
    sd = load(folder, dtype=torch.float16)
    assert sd.dtype == torch.float16 and sd.unet.conv_in.weight.dtype == torch.float16
    assert torch.equal(sd.unet.conv_in.weight, b.unet.conv_in.weight.half())
    assert torch.equal(load(folder).unet.conv_in.weight, a.unet.conv_in.weight)              # fp32 file
    upcast = load(folder, variant="fp16")                                                    # asked explicitly
    assert upcast.dtype == torch.float32
    assert torch.equal(upcast.unet.conv_in.weight, b.unet.conv_in.weight.half().float())
    assert weight_file(folder, "text_encoder", "fp16").name == "model.fp16.safetensors"


def test_variant_falls_back_both_ways(tiny_sd2, tmp_path):
    only32 = copy(tiny_sd2, tmp_path, "only32")
    for p in only32.glob("*/*.fp16.safetensors"):
        p.unlink()
    sd = load(only32, dtype="fp16")
    assert torch.equal(sd.vae.quant_conv.weight, tiny_sd2.vae.quant_conv.weight.half())
    only16 = tmp_path / "only16"
    hub.write(tiny_sd2, only16, fp32=False, fp16=True)
    sd = load(only16)
    assert sd.vae.quant_conv.weight.dtype == torch.float32
    assert torch.equal(sd.vae.quant_conv.weight, tiny_sd2.vae.quant_conv.weight.half().float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bf16", "fp16", torch.float32])
def test_dtype_casting(tiny_sd2v, dtype):
    sd = load(tiny_sd2v.folder, dtype=dtype)
    want = dtype_of(dtype)
    assert sd.dtype == want
    assert {p.dtype for net in (sd.unet, sd.vae, sd.text_encoder) for p in net.parameters()} == {want}


def test_bad_dtype(tiny_sd1):
    with pytest.raises(LoadError) as err:
        load(tiny_sd1.folder, dtype="int8")
    assert_one_line(err, "int8", "fp16")


def test_folder_without_tokenizer_uses_builtin(tiny_sd1, tiny_sd2, tmp_path):
    for ref, pad in [(tiny_sd1, 49407), (tiny_sd2, 0)]:
        folder = hub.write(ref, tmp_path / ref.kind, tokenizer=False)
        tok = load(folder).tokenizer
        assert tok.pad_id == pad and not (folder / "tokenizer").exists()
        assert torch.equal(tok(["hello world"]), Tokenizer.builtin(pad)(["hello world"]))


def test_prediction_type_override_and_default(tiny_sd1, tmp_path):
    folder = copy(tiny_sd1, tmp_path)
    assert load(folder, prediction_type="v_prediction").prediction_type == "v_prediction"
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "prediction_type"}))
    assert load(folder).prediction_type == "epsilon"
    path.write_text(json.dumps({"prediction_type": "sample"}))
    with pytest.raises(LoadError) as err:
        load(folder)
    assert_one_line(err, "'sample'", "v_prediction")


def test_fingerprint_follows_content(tiny_sd1, tmp_path):
    a, b = copy(tiny_sd1, tmp_path, "a"), copy(tiny_sd1, tmp_path, "b")
    assert load(a).fingerprint == load(b).fingerprint == load(tiny_sd1.folder).fingerprint
    rewrite(b / "unet" / "diffusion_pytorch_model.safetensors",            # same size, one tensor changed
            lambda d: d | {"conv_in.bias": d["conv_in.bias"] + 1})
    assert load(b).fingerprint != load(a).fingerprint
    assert load(a, dtype="fp16").fingerprint != load(a).fingerprint   # other weight files were read


# --------------------------------------------------------------------------------------------- errors
def rewrite(path, edit):
    """Rewrite a safetensors file through edit(dict) -> dict."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    hub.save_safetensors(edit(tensors).items(), path)


def unet_error(ref, tmp_path, edit):
    folder = copy(ref, tmp_path)
    rewrite(folder / "unet" / "diffusion_pytorch_model.safetensors", edit)
    with pytest.raises(LoadError) as err:
        load(folder)
    assert_one_line(err, str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "UNet")
    return str(err.value)


def test_missing_key(tiny_sd1, tmp_path):
    msg = unet_error(tiny_sd1, tmp_path, lambda d: {k: v for k, v in d.items() if k != "conv_out.bias"})
    assert "1 missing (conv_out.bias)" in msg and "unexpected" not in msg


def test_unexpected_key(tiny_sd1, tmp_path):
    msg = unet_error(tiny_sd1, tmp_path, lambda d: d | {"extra.weight": torch.zeros(3)})
    assert "1 unexpected (extra.weight)" in msg and "missing" not in msg


def test_wrong_shape(tiny_sd1, tmp_path):
    msg = unet_error(tiny_sd1, tmp_path, lambda d: d | {"conv_in.bias": torch.zeros(7)})
    assert "1 wrong shape (conv_in.bias [7] in file, [32] in model)" in msg


def test_all_kinds_of_mismatch_in_one_message(tiny_sd1):
    ref = tiny_sd1
    with torch.device("meta"):
        from minledits.nets.vae import VAE
        vae = VAE(ref.configs["vae"])
    getters = {k: (lambda v=v: v) for k, v in ref.vae.state_dict().items()}
    getters.pop("decoder.conv_out.weight")
    getters["decoder.conv_in.bias"] = lambda: torch.zeros(2)
    getters["decoder.spare"] = lambda: torch.zeros(2)
    with pytest.raises(LoadError) as err:
        fill(vae, getters, "some/file.safetensors", torch.float32, "cpu")
    assert_one_line(err, "some/file.safetensors", "1 missing (decoder.conv_out.weight)",
                    "1 unexpected (decoder.spare)", "1 wrong shape (decoder.conv_in.bias [2] in file")


def test_long_key_lists_are_shortened(tiny_sd1, tmp_path):
    msg = unet_error(tiny_sd1, tmp_path, lambda d: {k: v for k, v in d.items() if not k.startswith("up_blocks")})
    assert "more)" in msg and len(msg) < 600


def test_fill_casts_and_moves(tiny_sd2):
    with torch.device("meta"):
        from minledits.nets.clip import TextEncoder
        te = TextEncoder(tiny_sd2.configs["text_encoder"])
    getters = {"text_model." + k: (lambda v=v: v) for k, v in tiny_sd2.text_encoder.state_dict().items()}
    out = fill(te, getters, "x", torch.float16, "cpu")
    assert out is te and {p.dtype for p in te.parameters()} == {torch.float16}
    assert {p.device.type for p in te.parameters()} == {"cpu"}


def test_truncated_file(tiny_sd1, tmp_path):
    folder = copy(tiny_sd1, tmp_path)
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LoadError) as err:
        load(folder)
    assert_one_line(err, str(path), "truncated")


def test_not_a_safetensors_file(tiny_sd1, tmp_path):
    folder = copy(tiny_sd1, tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_text("<html>rate limited</html>")
    with pytest.raises(LoadError) as err:
        load(folder)
    assert_one_line(err, "not a readable safetensors file")


def test_bin_only_folder_is_refused(tiny_sd1, tmp_path):
    folder = copy(tiny_sd1, tmp_path)
    for p in (folder / "unet").glob("*.safetensors"):
        p.unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 pickle")
    with pytest.raises(LoadError) as err:
        load(folder)
    assert_one_line(err, "diffusion_pytorch_model.bin", "pickle", "run arbitrary code", "safetensors")


@pytest.mark.parametrize("name", ["model.ckpt", "model.bin"])
def test_pickle_single_file_is_refused(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x80\x04 pickle")
    with pytest.raises(LoadError) as err:
        load(tmp_path / name)
    assert_one_line(err, name, "pickle", "arbitrary code")


@pytest.mark.parametrize("component", ["vae", "scheduler", "text_encoder"])
def test_missing_component(tiny_sd1, tmp_path, component):
    folder = copy(tiny_sd1, tmp_path)
    shutil.rmtree(folder / component)
    with pytest.raises(LoadError) as err:
        load(folder)
    assert_one_line(err, str(folder), f"{component}/", "diffusers-layout")


def test_missing_weight_file(tiny_sd1, tmp_path):
    folder = copy(tiny_sd1, tmp_path)
    for p in (folder / "vae").glob("*.safetensors"):
        p.unlink()
    with pytest.raises(LoadError) as err:
        load(folder)
    assert_one_line(err, "diffusion_pytorch_model.safetensors", "config.json")


def test_bad_config(tiny_sd1, tmp_path):
    folder = copy(tiny_sd1, tmp_path)
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(LoadError) as err:
        load(folder)
    assert_one_line(err, str(folder / "unet" / "config.json"), "JSON")


def test_config_our_modules_cannot_build(tiny_sd1, tmp_path):
    folder = copy(tiny_sd1, tmp_path)
    path = folder / "text_encoder" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"hidden_act": "relu6"}))
    with pytest.raises(LoadError) as err:
        load(folder)
    assert_one_line(err, str(path), "cannot build TextEncoder", "relu6")


@pytest.mark.parametrize("model", ["./no/such/folder", "/definitely/not/here", "some/where/deep", "x.safetensors"])
def test_nonexistent_path(model, monkeypatch):
    monkeypatch.setattr("huggingface_hub.snapshot_download", pytest.fail)
    with pytest.raises(LoadError) as err:
        load(model)
    assert_one_line(err, model, "does not exist")


# --------------------------------------------------------------------------------------------- weights/
def test_weights_folder_is_used_before_the_hub(tiny_sd1, tmp_path, monkeypatch):
    monkeypatch.setenv("MINLEDITS_WEIGHTS", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.snapshot_download", pytest.fail)
    copy(tiny_sd1, tmp_path, "stable-diffusion-v1-5")
    (tmp_path / "owner").mkdir()
    copy(tiny_sd1, tmp_path / "owner", "nested")
    for model in ["someone/stable-diffusion-v1-5", "stable-diffusion-v1-5", "owner/nested"]:
        sd = load(model)
        assert sd.model_id == model and sd.fingerprint.startswith("sha256-")
    monkeypatch.chdir(tmp_path)  # weights/ relative to the working directory by default
    monkeypatch.delenv("MINLEDITS_WEIGHTS")
    copy(tiny_sd1, tmp_path / "weights", "sd15")
    assert load("sd15").tokenizer.pad_id == 49407


# --------------------------------------------------------------------------------------------- the Hub
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fake_hub(tiny_sd1, tmp_path, monkeypatch):
    """snapshot_download replaced: copies the files matching allow_patterns of tiny-sd1 into a snapshot."""
    snapshot = tmp_path / "hub" / "snapshots" / SHA
    monkeypatch.chdir(tmp_path)
    return fake_snapshot_download(monkeypatch, tiny_sd1.folder, snapshot), snapshot


def test_hub_downloads_only_what_is_needed(fake_hub, tiny_sd1):
    calls, snapshot = fake_hub
    sd = load("owner/tiny", revision="v1")
    assert sd.fingerprint == SHA and sd.model_id == "owner/tiny"
    assert len(calls) == 1 and calls[0][0] == "owner/tiny" and calls[0][2] == "v1"
    files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    assert files == sorted(["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                            "text_encoder/model.safetensors", "tokenizer/merges.txt",
                            "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
                            "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                            "vae/config.json", "vae/diffusion_pytorch_model.safetensors"])
    assert same_weights(sd.unet, tiny_sd1.unet)


def test_hub_fp16_variant_and_fallback(fake_hub, tiny_sd1):
    calls, snapshot = fake_hub
    load("owner/tiny", dtype=torch.float16)
    assert len(calls) == 1 and "unet/diffusion_pytorch_model.fp16.safetensors" in calls[0][1]
    assert not (snapshot / "unet" / "diffusion_pytorch_model.safetensors").exists()
    calls.clear()
    load("owner/tiny", variant="bf16")        # no such files: a second call fetches the plain ones
    assert len(calls) == 2 and calls[1][1] == [f"{c}/{WEIGHT_STEM[c]}.safetensors" for c in NETWORKS]


def hub_error(cls, message="boom"):
    """An instance of a huggingface_hub error class without an HTTP response (constructors vary by version)."""
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


@pytest.mark.parametrize("name, expected", [
    ("GatedRepoError", ["gated", "HF_TOKEN", "login", "https://huggingface.co/owner/repo"]),
    ("RepositoryNotFoundError", ["owner/repo", "not a Hub repo", "check the name"]),
    ("RevisionNotFoundError", ["no revision 'nope'"]),
    ("LocalEntryNotFoundError", ["not in the Hugging Face cache", "minledits download --model owner/repo",
                                 "weights/repo"]),
    ("HFValidationError", ["nor a valid Hub repo id"]),
    ("HfHubHTTPError", ["downloading owner/repo failed", "boom"]),
    ("OfflineModeIsEnabled", ["downloading owner/repo failed"]),
])
def test_hub_errors_are_one_line(monkeypatch, tmp_path, name, expected):
    import huggingface_hub.utils as hf_utils
    monkeypatch.chdir(tmp_path)

    def raises(*args, **kwargs):
        raise hub_error(getattr(hf_utils, name), "boom\nsecond line")
    monkeypatch.setattr("huggingface_hub.snapshot_download", raises)
    with pytest.raises(LoadError) as err:
        load("owner/repo", revision="nope")
    assert_one_line(err, *expected)


def test_download_offline_says_to_run_it_online(monkeypatch):
    import huggingface_hub.utils as hf_utils

    def raises(*args, **kwargs):
        raise hub_error(hf_utils.LocalEntryNotFoundError, "offline")
    monkeypatch.setattr("huggingface_hub.snapshot_download", raises)
    with pytest.raises(LoadError) as err:
        download("owner/repo", command=True)
    assert_one_line(err, "owner/repo is not in the Hugging Face cache", "go online and run this again",
                    "weights/repo")
    assert "minledits download" not in str(err.value), "not the command that just failed"


def test_really_offline_with_an_empty_cache(tmp_path):
    """HF_HUB_OFFLINE=1 and nothing cached: the real snapshot_download fails, we print what to do."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("MINLEDITS_WEIGHTS", None)
    code = ("from minledits.io.load import LoadError, load\ntry: load('owner/not-cached')\n"
            "except LoadError as e: print('LoadError:', e)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.startswith("LoadError: owner/not-cached is not in the Hugging Face cache and HF_HUB_OFFLINE "
                                 "is set"), out.stdout + out.stderr
    assert "unset HF_HUB_OFFLINE and run `minledits download --model owner/not-cached`" in out.stdout
    assert out.stdout.count("\n") == 1


# --------------------------------------------------------------------------------------------- single files
def test_single_file_goes_through_convert(tmp_path):
    """load("x.safetensors") reads an original-format checkpoint (tests/test_convert.py builds one)."""
    tc = pytest.importorskip("tests.test_convert")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    unet_cfg, vae_cfg, text_cfg = tc.tiny_configs(sd2=False)
    unet, vae = tc.perturb(UNet2DConditionModel(**unet_cfg)), tc.perturb(AutoencoderKL(**vae_cfg))
    text = tc.perturb(CLIPTextModel(CLIPTextConfig(**text_cfg)))
    ckpt = tc.to_original(unet.state_dict(), unet.config, vae.state_dict(), vae.config, text.state_dict(), False,
                          make=torch.randn)
    path = hub.save_safetensors(ckpt.items(), tmp_path / "v1-tiny.safetensors")
    sd = load(path, dtype="bf16")
    assert sd.model_id == str(path) and sd.prediction_type == "epsilon" and sd.tokenizer.pad_id == 49407
    assert sd.fingerprint.startswith("sha256-")
    assert sd.fingerprint != load(path, prediction_type="v_prediction").fingerprint
    assert sd.unet.conv_in.weight.dtype == torch.bfloat16
    assert torch.equal(sd.unet.conv_in.weight, unet.conv_in.weight.bfloat16())
    assert same_weights(load(path).vae, vae)


def test_single_file_that_is_not_a_checkpoint(tiny_sd1):
    with pytest.raises(ValueError) as err:  # convert.SingleFileError
        load(tiny_sd1.folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert "\n" not in str(err.value) and "not an original Stable Diffusion checkpoint" in str(err.value)
