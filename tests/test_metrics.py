"""Metrics: PSNR and SSIM against scikit-image on fixed arrays, CLIP's towers and preprocessing against transformers
on random weights in the official layout (tests/clip_hub.py), and `minledits metrics`."""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from minledits.nets import clipvision
from minledits.tools import metrics, scores
from tests import clip_hub
from tests.helpers import run

pytestmark = pytest.mark.usefixtures("one_thread")


def pair(seed, shape, noise):
    r = np.random.default_rng(seed)
    a = r.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(int) + r.integers(-noise, noise + 1, shape), 0, 255).astype(np.uint8)
    return a, b


PAIRS = [pair(0, (64, 64, 3), 20), pair(1, (37, 50, 3), 60), pair(2, (11, 80, 3), 30), pair(3, (128, 96, 3), 120)]


@pytest.mark.parametrize("a, b", PAIRS)
def test_psnr_and_ssim_equal_scikit_image(a, b):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    assert metrics.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), rel=1e-12)
    theirs = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                   data_range=255, channel_axis=-1)
    assert abs(metrics.ssim(a, b) - theirs) <= 1e-12  # both float64; only the order of the sums differs
    default = structural_similarity(a, b, data_range=255, channel_axis=-1)  # a 7x7 box window: another metric
    assert abs(metrics.ssim(a, b) - default) > 1e-4


def test_psnr_ssim_edges():
    a, b = PAIRS[0]
    assert metrics.psnr(a, a) == float("inf") and metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="differ in size"):
        metrics.psnr(a, b[:32])
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(a[:10], b[:10])


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return clip_hub.write(tmp_path_factory.mktemp("clip") / "clip-vit-tiny")


@pytest.fixture(scope="module")
def ours(clip_folder):
    return metrics.Clip.load(str(clip_folder))


@pytest.fixture(scope="module")
def theirs(clip_folder):
    return clip_hub.references(clip_folder)


def test_clip_towers_equal_transformers(ours, theirs, clip_tokenizer_sd1):
    vision, text = theirs
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ids = clip_tokenizer_sd1(["a photo of a cat", "glasses", ""], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
    assert torch.equal(ids, ours.tokenizer(["a photo of a cat", "glasses", ""]))
    with torch.no_grad():
        ref_img, ref_txt = vision(pixel_values=x).image_embeds, text(input_ids=ids).text_embeds
    img, txt = ours.model.image_embeds(x), ours.model.text_embeds(ids)
    assert img.shape == (3, 16) and txt.shape == (3, 16)
    # float32, the same operations: measured 0.0; 1e-4 is far below the embeddings' size (~1)
    torch.testing.assert_close(img, ref_img, atol=1e-4, rtol=0)
    torch.testing.assert_close(txt, ref_txt, atol=1e-4, rtol=0)


def test_a_causal_vision_tower_would_be_caught(ours, theirs, monkeypatch):
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = theirs[0](pixel_values=x).image_embeds
    for layer in ours.model.vision_model.encoder.layers:  # the text tower's encoder, as the image tower uses it
        monkeypatch.setattr(layer.self_attn, "causal", True)
    assert (ours.model.image_embeds(x) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("size", [(224, 224), (300, 200), (200, 301), (97, 500), (64, 64)])
def test_preprocessing_equals_clip_image_processor(size):
    from transformers import CLIPImageProcessor
    im = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ref = CLIPImageProcessor()(images=[im], return_tensors="pt").pixel_values
    ours = metrics.clip_pixels(im)
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)  # float32 rounding of (x - mean) / std


def test_clip_score_and_similarity_equal_transformers(ours, theirs, clip_tokenizer_sd1):
    from transformers import CLIPImageProcessor
    vision, text = theirs
    a, b = (Image.fromarray(x) for x in pair(4, (80, 120, 3), 40))
    with torch.no_grad():
        e = vision(pixel_values=CLIPImageProcessor()(images=[a, b], return_tensors="pt").pixel_values).image_embeds
        t = text(input_ids=clip_tokenizer_sd1(["a red car"], padding="max_length", max_length=77,
                                              return_tensors="pt").input_ids).text_embeds
    e, t = e / e.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    assert ours.similarity(a, b) == pytest.approx((e[0] @ e[1]).item(), abs=1e-5)
    assert ours.score(b, "a red car") == pytest.approx(100 * max((e[1] @ t[0]).item(), 0), abs=1e-3)
    found = metrics.measure(a, b, "a red car", ours)
    assert found["clip_image"] == ours.similarity(a, b) and found["psnr"] == metrics.psnr(a, b)
    assert metrics.measure(a, b)["clip_score"] is None


def test_loading_refuses_a_damaged_file_and_says_when_weights_are_missing(clip_folder, tmp_path):
    with pytest.raises(metrics.MinleditsError, match="CLIP metrics need the weights of /no/such/clip"):
        metrics.Clip.load("/no/such/clip")
    shutil.copytree(clip_folder, tmp_path / "clip")
    config = json.loads((tmp_path / "clip" / "config.json").read_text())
    (tmp_path / "clip" / "config.json").write_text(json.dumps({**config, "projection_dim": 8}))  # the file's: 16
    with pytest.raises(metrics.MinleditsError, match="wrong shape"):
        metrics.Clip.load(str(tmp_path / "clip"))


def test_cli(clip_folder, tmp_path, capsys):
    a, b = PAIRS[0]
    for name, x in [("a", a), ("b", b), ("small", a[:32])]:
        Image.fromarray(x).save(tmp_path / f"{name}.png")
    rc, out, err = run(capsys, "metrics", tmp_path / "a.png", tmp_path / "b.png", "--text", "a cat",
                       "--clip-model", clip_folder, "--json")
    found = json.loads(out)
    assert rc == 0 and err == "" and found["psnr"] == pytest.approx(metrics.psnr(a, b))
    assert set(found) == {"psnr", "ssim", "clip_score", "clip_image"} and found["clip_score"] is not None
    rc, out, err = run(capsys, "metrics", tmp_path / "a.png", tmp_path / "a.png", "--clip-model", "/no/such/clip",
                       "--json")
    assert rc == 0 and "Infinity" not in out and json.loads(out)["psnr"] is None and "identical" in out
    rc, out, err = run(capsys, "metrics", tmp_path / "a.png", tmp_path / "b.png", "--clip-model", "/no/such/clip")
    assert rc == 0 and out.startswith("psnr ") and "clip" not in out
    assert err.startswith("minledits: note: CLIP metrics left out") and len(err.splitlines()) == 1
    rc, out, err = run(capsys, "metrics", tmp_path / "a.png", tmp_path / "small.png", "--clip-model", clip_folder)
    why = "the two pictures differ in size (64x64 and 64x32 px): fidelity compares pictures of one size"
    assert rc == 2 and out == "" and err.splitlines() == [f"minledits: error: {why}"]


def test_full_size_vit_l_14_has_the_official_keys_and_shapes():
    """openai/clip-vit-large-patch14 on the meta device (no weights): ours and transformers' CLIPModel hold the same
    tensors under the same names, so its model.safetensors loads strictly (its position_ids buffers are skipped)."""
    from transformers import CLIPConfig, CLIPModel
    with torch.device("meta"):
        ours = clipvision.CLIP(clip_hub.OFFICIAL)
        theirs = CLIPModel(CLIPConfig(**clip_hub.OFFICIAL))
    shapes = lambda m: {k: tuple(t.shape) for k, t in m.state_dict().items() if "position_ids" not in k}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert shapes(ours)["vision_model.embeddings.position_embedding.weight"] == (257, 1024)
    assert shapes(ours)["visual_projection.weight"] == (768, 1024) and len(shapes(ours)) == 590


def test_cli_refuses_pictures_too_small_for_ssim(tmp_path, capsys):
    a, b = PAIRS[0]
    for name, x in [("a", a[:8, :8]), ("b", b[:8, :8])]:
        Image.fromarray(x).save(tmp_path / f"{name}.png")
    rc, out, err = run(capsys, "metrics", tmp_path / "a.png", tmp_path / "b.png", "--clip-model", "none")
    assert rc == 2 and out == "" and err == "minledits: error: SSIM needs pictures of at least 11x11 px, got 8x8\n"


def test_json_holds_no_infinity():
    found = metrics.measure(*[Image.fromarray(PAIRS[0][0])] * 2)
    text = metrics.to_json(found)
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert found["psnr"] == float("inf") and strict["psnr"] is None and "identical" in strict["notes"]["psnr"]
    assert "notes" not in json.loads(metrics.to_json(metrics.measure(*map(Image.fromarray, PAIRS[0]))))


def bad_pictures(d):
    """name -> (a picture file that cannot be measured, words of its one-line error)."""
    Image.fromarray(PAIRS[0][0]).save(d / "ok.png")
    data = (d / "ok.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("hello")
    Image.new("1", (9400, 9400)).save(d / "huge.png")      # 88 megapixels in a few kB
    Image.new("1", (20000, 20000)).save(d / "bomb.png")    # past Pillow's own bomb limit
    return {"truncated.png": "is truncated or damaged", "empty.png": r"is empty \(0 bytes\)",
            "text.png": "is not a picture Pillow can read",
            "bomb.png": r"has more pixels than Pillow opens \(a decompression bomb\)",
            "huge.png": r"is 9400x9400 px \(88 megapixels\), over the limit"}


def test_cli_names_each_unreadable_picture_before_decoding_it(tmp_path, capsys, monkeypatch):
    bad, decoded = bad_pictures(tmp_path), []
    monkeypatch.setattr(Image.Image, "load", lambda im, f=Image.Image.load: decoded.append(im.size) or f(im))
    for name, words in bad.items():
        rc, out, err = run(capsys, "metrics", tmp_path / "ok.png", tmp_path / name, "--clip-model", "none")
        assert rc == 2 and out == "" and len(err.splitlines()) == 1, (name, err)
        assert re.search(f"^minledits: error: '{re.escape(str(tmp_path / name))}' {words}", err), err
    assert (9400, 9400) not in decoded and (20000, 20000) not in decoded


# --------------------------------------------------------------------------------------------- PIE-Bench's seven
# Each metric of tools/scores.py against an independent computation at the benchmark's 512 x 512: numpy formulas,
# scikit-image, transformers' ViTModel and CLIP towers, and a plain functional LPIPS written here.
def pie_pair(seed=5):
    """A photo, an edit of it (changed inside the mask, a little noise outside) and the mask, 512 x 512."""
    from tests import piebench_data
    a = np.asarray(piebench_data.photo(seed))
    m = piebench_data.entry_mask(1, seed)
    r = np.random.default_rng(seed)
    b = np.clip(a.astype(int) + r.integers(-6, 7, a.shape), 0, 255)
    b[m] = r.integers(0, 256, (m.sum(), 3))
    return a, b.astype(np.uint8), decode_rect(m)


def decode_rect(m):
    """The benchmark's mask of a drawn region: the frame set to 1."""
    m = m.copy()
    m[0], m[-1], m[:, 0], m[:, -1] = True, True, True, True
    return m


def test_background_mse_psnr_ssim_equal_numpy_and_scikit_image():
    from skimage.metrics import structural_similarity
    a, b, m = pie_pair()
    bg = 1 - m[..., None].astype(np.float64)
    x, y = a / 255 * bg, b / 255 * bg
    found = scores.Scorer(None, None, None).score(Image.fromarray(a), Image.fromarray(b), m, "a dog")
    mse = ((x - y) ** 2).mean()
    assert found["mse_unedit_part"] == pytest.approx(mse, rel=1e-5)
    assert found["psnr_unedit_part"] == pytest.approx(10 * np.log10(1 / mse), abs=1e-4)
    paper = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1,
                                  channel_axis=-1)  # the valid windows: torchmetrics <= 1.4.1, the paper's
    x32, y32 = scores.background(a, b, m)
    same = structural_similarity(*(t[0].permute(1, 2, 0).double().numpy() for t in (x32, y32)), gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1)
    assert scores.ssim(x32.double(), y32.double()) == pytest.approx(same, abs=1e-9)  # the same map, in float64
    assert found["ssim_unedit_part"] == pytest.approx(paper, abs=2e-5)  # float32, as the benchmark: 7e-6 measured
    from torchmetrics.functional.image import structural_similarity_index_measure as padded
    now = padded(*scores.background(a, b, m), data_range=1.0).item()  # torchmetrics >= 1.4.2: another number
    assert abs(now - paper) > 1e-3
    assert np.isnan([found[k] for k in ("structure_distance", "lpips_unedit_part", "clip_similarity_target_image",
                                        "clip_similarity_target_image_edit_part")]).all()


def test_no_background_gives_nan():
    a, b, _ = pie_pair()
    found = scores.Scorer(None, None, None).score(Image.fromarray(a), Image.fromarray(b), np.ones((512, 512), bool),
                                                  "x")
    assert all(np.isnan(found[k]) for k in ("psnr_unedit_part", "lpips_unedit_part", "mse_unedit_part",
                                            "ssim_unedit_part"))


def lpips_reference(sq, heads, x, y):
    """LPIPS written out functionally from the paper's recipe on torchvision's squeezenet1_1 tensors."""
    F = torch.nn.functional
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def conv(h, name, padding=0, stride=1):
        return F.relu(F.conv2d(h, sq[name + ".weight"], sq[name + ".bias"], stride=stride, padding=padding))

    def fire(h, i):
        s = conv(h, f"features.{i}.squeeze")
        return torch.cat([conv(s, f"features.{i}.expand1x1"), conv(s, f"features.{i}.expand3x3", padding=1)], 1)

    def pool(h):
        return F.max_pool2d(h, 3, 2, ceil_mode=True)

    def taps(h):
        h = conv((h - shift) / scale, "features.0", stride=2)
        out = [h]
        h = fire(fire(pool(h), 3), 4)
        out.append(h)
        h = fire(fire(pool(h), 6), 7)
        out.append(h)
        h = fire(pool(h), 9)
        out.append(h)
        for i in (10, 11, 12):
            h = fire(h, i)
            out.append(h)
        return out
    total = 0.0
    for k, (f0, f1) in enumerate(zip(taps(x), taps(y))):
        n0 = f0 / torch.sqrt(f0.pow(2).sum(1, keepdim=True) + 1e-8)
        n1 = f1 / torch.sqrt(f1.pow(2).sum(1, keepdim=True) + 1e-8)
        total += (heads[f"lin{k}.model.1.weight"].view(1, -1, 1, 1) * (n0 - n1) ** 2).sum(1).mean().item()
    return total


def test_lpips_equals_a_functional_reference(tmp_path):
    from tests import piebench_data
    path = piebench_data.write_squeezenet(tmp_path / "squeezenet.pth")
    net = scores.load_lpips(str(path))
    a, b, m = pie_pair()
    x, y = scores.background(a, b, m)
    found = scores.Scorer(None, None, net).score(Image.fromarray(a), Image.fromarray(b), m, "x")["lpips_unedit_part"]
    with torch.no_grad():
        ref = lpips_reference(torch.load(path, weights_only=True), scores.lpips_heads(), x * 2 - 1, y * 2 - 1)
    assert found == pytest.approx(ref, rel=1e-5) and found > 0
    assert scores.Scorer(None, None, net).score(Image.fromarray(a), Image.fromarray(a), m, "x")["lpips_unedit_part"] \
        == 0


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    from tests import piebench_data
    return piebench_data.write_dino(tmp_path_factory.mktemp("dino") / "dino-vit-tiny")


def test_dino_keys_equal_transformers_and_structure_equals_numpy(dino_folder, tmp_path):
    from transformers import ViTModel
    ref = ViTModel.from_pretrained(str(dino_folder)).eval()
    ours = scores.load_dino(str(dino_folder))
    ref.save_pretrained(tmp_path / "v5")  # transformers 5's own key names load too
    assert all(torch.equal(t, scores.load_dino(str(tmp_path / "v5")).state_dict()[k]) for k, t in
               ours.state_dict().items())
    a, b, _ = pie_pair()
    got = {}
    ref.layers[-1].attention.k_proj.register_forward_hook(lambda m, i, o: got.update(k=o))
    keys = []
    for p in (a, b):
        x = scores.dino_pixels(p, 224)
        with torch.no_grad():
            ref(pixel_values=x)
            mine = ours.last_keys(x)
        assert mine.shape == (1, 785, 32)
        torch.testing.assert_close(mine, got["k"], atol=1e-4, rtol=1e-4)
        keys.append(got["k"][0].double().numpy())
    # the picture in 0..255, ImageNet-normalised (the benchmark normalises without / 255)
    const = np.full((512, 512, 3), 200, np.uint8)
    want = (200 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(scores.dino_pixels(const, 224)[0, :, 100, 100].numpy(), want, rtol=1e-6)
    sims = [k @ k.T / np.maximum(np.linalg.norm(k, axis=1)[:, None] * np.linalg.norm(k, axis=1)[None], 1e-8)
            for k in keys]
    found = scores.Scorer(None, ours, None).structure(Image.fromarray(a), Image.fromarray(b))
    assert found == pytest.approx(((sims[0] - sims[1]) ** 2).mean(), rel=1e-4) and found > 0


def test_clip_whole_and_edited_equal_transformers(ours, theirs, clip_tokenizer_sd1):
    from transformers import CLIPImageProcessor
    vision, text = theirs
    a, b, m = pie_pair()
    edited = np.uint8(b * m[..., None].repeat(3, 2).astype(np.float64))  # as the benchmark: uint8(picture * mask)
    with torch.no_grad():
        e = vision(pixel_values=CLIPImageProcessor()(images=[b, edited], return_tensors="pt").pixel_values).image_embeds
        t = text(input_ids=clip_tokenizer_sd1(["a dog"], padding="max_length", max_length=77,
                                              return_tensors="pt").input_ids).text_embeds
    e, t = e / e.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    found = scores.Scorer(ours, None, None).score(Image.fromarray(a), Image.fromarray(b), m, "a dog")
    assert found["clip_similarity_target_image"] == pytest.approx(100 * max((e[0] @ t[0]).item(), 0), abs=1e-3)
    assert found["clip_similarity_target_image_edit_part"] == pytest.approx(100 * max((e[1] @ t[0]).item(), 0),
                                                                            abs=1e-3)


def test_missing_weights_leave_their_columns_nan_with_one_note_each(tmp_path):
    s = scores.load("/no/such/clip", "/no/such/dino", str(tmp_path / "none.pth"))
    assert (s.clip, s.dino, s.lpips) == (None, None, None) and len(s.notes) == 3
    assert all("\n" not in n for n in s.notes) and "/no/such/dino" in s.notes[1] and "none.pth" in s.notes[2]
    assert scores.load("none", "none", "none").notes[0] == "CLIP Whole and Edited: nan (--clip-model none)"
