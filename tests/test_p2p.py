"""minledits.p2p (Prompt-to-Prompt on edit-friendly DDPM inversion) against tests/oracle_p2p.py: the reference's
controller (inbarhub/DDPM_inversion's ptp_classes with LOW_RESOURCE) in diffusers attention processors on the
diffusers UNet, driven by its reverse loop with our inversion's noise maps.

Most tests run a "deep" tiny UNet (3 levels, cross-attention in all) at 192 px: 24x24 latents, so its attention
runs at 24x24 (576 queries: self-attention kept), 12x12 and 6x6 (<= 16^2: replaced) and LocalBlend reads level 2
(6x6, the reference's 16x16 at 512 px). The standard tiny UNets have attention only at the latent size."""
import dataclasses
import json
import math
import re
import shlex
import subprocess
from unittest import mock

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import minledits
from minledits import p2p
from tests import hub, oracle, oracle_p2p
from tests.helpers import SIZE, console_script, deep, photo, run

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, SKIP, PX = 10, 2, 192     # 8 executed steps: cross-attention replaced for i < int(0.6 * 11) = 6, self for i < 2
SRC = "a cat sitting on a mat"
LONG = "a dog sitting on a mat " + "very " * 79  # 85 CLIP tokens, the last words past the 75 the text encoder reads
CASES = {  # name: (target prompt, reweight, local_blend, LocalBlend's threshold)
    "replace": ("a dog sitting on a mat", None, None, None),
    "refine": ("a fluffy cat sitting on a red mat", None, None, None),
    "reweight": ("a dog sitting on a mat", {"dog": 2.0}, None, None),
    "local_blend": ("a dog sitting on a mat", None, ("cat", "dog"), 0.3),
    "local_blend_0.93": ("a dog sitting on a mat", None, ("cat", "dog"), 0.93),
    "all": ("a photorealistic dog sitting on a mat", {"photorealistic": 0.5}, ("cat", "dog"), 0.97),
}


@pytest.fixture(scope="module", params=["tiny-sd1", "tiny-sd2"])
def deep_model(request, tmp_path_factory):
    ref = deep(request.param, tmp_path_factory.mktemp(request.param), 24)
    sd = minledits.load(ref.folder)
    inv = minledits.invert(sd, photo(), steps=STEPS, skip=SKIP, size=PX, seed=3, source_prompt=SRC)
    return ref, sd, inv


def reference(ref, inv, target, s_tar, cross=0.6, self_=0.2, reweight=None, blend=None, threshold=0.3):
    """The oracle's two rows [source, target] on our inversion."""
    tokenizer = oracle.tokenizer(ref.folder)
    prompts = [inv.settings.source_prompt, target]
    kind = "replace" if len(prompts[0].split(" ")) == len(target.split(" ")) else "refine"
    res = tuple(d // 4 for d in inv.xts.shape[-2:])
    ctrl = oracle_p2p.Controller(tokenizer, prompts, STEPS, cross, self_, kind, reweight,
                                 [w.split() for w in blend] if blend else None, res, threshold)
    before = dict(ref.unet.attn_processors)
    oracle_p2p.register(ref.unet, ctrl)
    try:
        return oracle_p2p.reverse(ref, tokenizer, inv.xts[:1], inv.zs, STEPS, prompts,
                                  [inv.settings.source_guidance, s_tar], ctrl)
    finally:
        ref.unet.set_attn_processor(before)


@pytest.mark.parametrize("case", CASES)
def test_edits_equal_the_reference(deep_model, case, monkeypatch):
    """Both rows' final latents, free running. Tolerance: the two UNets differ by float32 rounding (~1e-6 of their
    O(1) outputs per call: fused vs explicit attention in the layers nobody edits, other batch layouts), scaled by
    the target guidance (7.5 here) and carried through 8 steps (seen <= 5.2e-5 on both models; no control at all
    gives 4.9e-5, so the control adds nothing measurable), within 1e-4.
    The random models' attention is nearly uniform: at LocalBlend's threshold 0.3 its mask is 1 everywhere (the
    normalised maps lie in [0.82, 1]), so the blend is also run at 0.93 (a parameter of the reference's
    LocalBlend), where the mask is partly 0."""
    ref, sd, inv = deep_model
    target, reweight, blend, threshold = CASES[case]
    monkeypatch.setattr(p2p, "THRESHOLD", threshold or p2p.THRESHOLD)
    steps = []
    ours = p2p.edit(sd, inv, target, target_guidance=7.5, reweight=reweight, local_blend=blend, callback=steps.append)
    theirs = reference(ref, inv, target, 7.5, reweight=reweight, blend=blend, threshold=threshold or 0.3)
    torch.testing.assert_close(ours, theirs[1:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(steps[-1].x_prev[:1], theirs[:1], atol=1e-4, rtol=1e-4)
    if threshold and threshold > 0.3:
        assert any(0 < st.blend.mean() < 1 for st in steps)  # the mask keeps some of the source and edits some
    print(f"{ref.kind} {case}: max abs diff {(ours - theirs[1:]).abs().max():.3g}")


def test_a_tall_picture(deep_model):
    """keep_aspect, 64x128 px: 16x8 latents, LocalBlend's maps 4x2 (the layers' own sizes): equal to the oracle."""
    ref, sd, _ = deep_model
    inv = minledits.invert(sd, photo(size=(64, 128)), steps=STEPS, skip=SKIP, size=128, seed=3, source_prompt=SRC,
                           keep_aspect=True)
    steps, target, blend = [], "a dog sitting on a mat", ("cat", "dog")
    ours = p2p.edit(sd, inv, target, target_guidance=7.5, reweight={"dog": 2.0}, local_blend=blend,
                    callback=steps.append)
    theirs = reference(ref, inv, target, 7.5, reweight={"dog": 2.0}, blend=blend)
    torch.testing.assert_close(ours, theirs[1:], atol=1e-4, rtol=1e-4)
    assert steps[0].attn.shape == (2, 4, 2, 77) and steps[0].blend.shape == (1, 1, 16, 8)


def test_a_callback_changes_nothing(deep_model):
    """The result is the same bits with and without a callback, with and without LocalBlend: the layers whose maps
    EditStep.attn shows compute their probabilities explicitly either way."""
    _, sd, inv = deep_model
    for blend in (None, ("cat", "dog")):
        plain = p2p.edit(sd, inv, "a dog sitting on a mat", target_guidance=7.5, local_blend=blend)
        steps = []
        traced = p2p.edit(sd, inv, "a dog sitting on a mat", target_guidance=7.5, local_blend=blend,
                          callback=steps.append)
        assert torch.equal(plain, traced) and steps[0].attn is not None


def test_the_cross_schedule_has_n_plus_1_rows(deep_model):
    """cross_replace 0.65 at N = 10: the reference replaces for cur_step < int(0.65 * 11) = 7 (its table has N + 1
    rows), not int(0.65 * 10) = 6; ours equals it, and one step less is caught by the tolerance."""
    ref, sd, inv = deep_model
    target = "a dog sitting on a mat"
    theirs = reference(ref, inv, target, 7.5, cross=0.65)
    ours = p2p.edit(sd, inv, target, target_guidance=7.5, cross_replace=0.65)
    torch.testing.assert_close(ours, theirs[1:], atol=1e-4, rtol=1e-4)
    attention_edit = p2p.attention_edit
    with mock.patch.object(p2p, "attention_edit",
                           lambda *a: (lambda p: p.__class__(**{**p.__dict__, "cross_end": 6}))(attention_edit(*a))):
        broken = p2p.edit(sd, inv, target, target_guidance=7.5, cross_replace=0.65)
    assert (broken - theirs[1:]).abs().max() > 1e-3


def test_the_step_counter_starts_after_the_skip(tiny_sd1):
    """N = 100, skip 36: cross-attention replaced during the first 60 of the 64 executed steps, self-attention during
    the first 20 (the issue's example)."""
    sd = minledits.load(tiny_sd1.folder)
    inv = minledits.invert(sd, photo(), steps=100, skip=36, size=SIZE, source_prompt=SRC)
    seen = []
    control = p2p.Control

    class Spy(control):
        def __call__(self, layer, size, probs):
            seen.append((self.alpha, self.self_on))
            return super().__call__(layer, size, probs)
    with mock.patch.object(p2p, "Control", lambda plan, i: (seen.append(i), Spy(plan, i))[1]):
        p2p.edit(sd, inv, "a dog sitting on a mat")
    steps = [s for s in seen if isinstance(s, int)]
    assert steps == list(range(64))
    per_step = [[]]
    for s in seen[1:]:
        per_step.append([]) if isinstance(s, int) else per_step[-1].append(s)
    assert [any(a == 1 for a, _ in calls) for calls in per_step] == [True] * 60 + [False] * 4
    assert [any(s for _, s in calls) for calls in per_step] == [True] * 20 + [False] * 44


@pytest.fixture(scope="module")
def src_inv(sd1):
    return minledits.invert(sd1, photo(), steps=10, skip=3, size=SIZE, seed=1, source_prompt=SRC, keep_last_noise=True)


def test_without_replacement_it_is_the_target_prompt_edit(sd1, src_inv):
    """cross_replace = self_replace = 0: the source row does not touch the target, which is the plain DDPM edit with
    the target prompt (ledits.edit without concepts). Its UNet batch is [u, tar], ours [u, u, src, tar]: the kernels
    round differently for the two layouts (~1e-7), amplified by s_tar = 15 over 7 steps (seen 4.8e-5): 1e-4."""
    target = "a dog sitting on a mat"
    ours = p2p.edit(sd1, src_inv, target, target_guidance=15.0, cross_replace=0, self_replace=0)
    plain = minledits.edit(sd1, src_inv, target_prompt=target, target_guidance=15.0)
    torch.testing.assert_close(ours, plain, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(p2p.edit(sd1, src_inv, target, target_guidance=15.0), plain, atol=1e-3)


def test_the_source_row_walks_the_inversion(sd1, src_inv):
    """The source row regenerates the inversion's latents step by step and ends on w0 (keep_last_noise); also on a
    dpmsolver++ inversion (the edit steps with the inversion's own sampler; its maps follow one another, so the
    rounding of the 4-row batch accumulates more: seen 3.4e-5)."""
    dpm = minledits.invert(sd1, photo(), steps=10, skip=3, size=SIZE, seed=1, source_prompt=SRC, keep_last_noise=True,
                           sampler="dpmsolver++")
    for inv, tol in [(src_inv, 1e-5), (dpm, 1e-4)]:
        steps = []
        p2p.edit(sd1, inv, "a dog sitting on a mat", callback=steps.append)
        walked = torch.cat([st.x_prev[:1] for st in steps])
        torch.testing.assert_close(walked, inv.xts[1:], atol=tol, rtol=tol)


PAIRS = [  # (source, target): word swaps of equal word counts and refinements; multi-token words, punctuation, repeats
    ("a cat sitting on a mat", "a dog sitting on a mat"),
    ("a cat sitting on a mat", "a hippopotamus sitting on a mat"),       # 1 token -> 3
    ("a hippopotamus in the river", "a cat in the river"),              # 3 -> 1
    ("a skyscraper at night", "a tyrannosaurus at night"),              # 3 -> 3
    ("a cat, sitting on a mat.", "a dog, sitting on a mat."),           # punctuation inside words
    ("a cat and a cat", "a dog and a cat"),                             # repeated words
    ("a cat and a cat", "a cat and a bulldozer"),
    ("A photo of a Cat", "A photo of a Dog"),                           # case
    ("the astronaut's helmet", "the pilot's helmet"),
    ("a red car on a street", "a blue truck on a street"),              # two swaps
    ("a cat-like dog", "a dog-like cat"),
    ("two cats, three dogs", "two dogs, three cats"),
    ("a 3d render of a car", "a 2d drawing of a car"),
    ("a bowl of fruit!!", "a bowl of croissants!!"),
    ("a cat sitting on a mat", "a fluffy cat sitting on a red mat"),    # refinements
    ("a photo of a dog", "a photorealistic photo of a dog"),
    ("a cat", "a cat wearing sunglasses at the beach"),
    ("a dog running on the grass", "a dog on the grass"),
    ("a house in the snow", "a house in the snow, oil painting"),
    ("a man with a beard", "a smiling old man with a long beard!"),
]


def test_word_mappers_equal_the_reference(sd1, clip_tokenizer_sd1):
    """Token positions of every word, Replace's M (equal word counts) and Refine's (m, a), against the reference's
    rules on transformers' CLIPTokenizer (oracle_p2p)."""
    tok, ref_tok = sd1.tokenizer, clip_tokenizer_sd1
    assert len(PAIRS) == 20
    for src, tar in PAIRS:
        for prompt in (src, tar):
            for word in set(prompt.split(" ")):
                assert p2p.positions(tok, prompt, word) == oracle_p2p.word_inds(ref_tok, prompt, word), (prompt, word)
        if len(src.split(" ")) == len(tar.split(" ")):
            assert torch.equal(p2p.replace_mapper(tok, src, tar), oracle_p2p.replacement_mapper(ref_tok, src, tar))
        m, a = p2p.refine_mapper(tok, src, tar)
        m_ref, a_ref = oracle_p2p.refinement_mapper(ref_tok, src, tar)
        assert torch.equal(m, m_ref) and torch.equal(a, a_ref), (src, tar)
    assert p2p.positions(tok, "a hippopotamus in the river", "hippopotamus") == [2, 3, 4]


@pytest.mark.parametrize("kw, error, words", [
    (dict(target_prompt=" "), ValueError, "needs a target prompt"),
    (dict(reweight={"cow": 2.0}), ValueError, "reweight word 'cow' is not a word of the prompt"),
    (dict(reweight="dog"), ValueError, "reweight must read word=weight"),
    (dict(reweight="dog=big"), ValueError, "is not a number"),
    (dict(reweight={"dog": math.inf}), ValueError, "reweight 'dog'=inf: a weight must be a number from -10 to 10"),
    (dict(reweight="dog=1e30"), ValueError, r"reweight 'dog'=1e\+30: a weight must be a number from -10 to 10"),
    (dict(reweight="dog=-10.5"), ValueError, "reweight 'dog'=-10.5: a weight must be"),
    (dict(reweight={"dog": math.nan}), ValueError, "reweight 'dog'=nan: a weight must be"),
    (dict(reweight="dog=2, dog=3"), ValueError, "^reweight names the word 'dog' twice in 'dog=2, dog=3': give it"),
    (dict(target_prompt=LONG), ValueError, r"^the target prompt 'a dog sitting on a mat very .*'… is 85 CLIP tokens; "
                                           r"Prompt-to-Prompt takes at most 75 \(it matches each word to its tokens"),
    (dict(source_prompt=LONG), ValueError, "^the source prompt 'a dog sitting on a mat very .*'… is 85 CLIP tokens;"),
    (dict(target_prompt="a dog  sitting on mat"), ValueError,  # Replace: "" would take "sitting"'s token
     r"^the target prompt's word '' does not match its CLIP tokens: separate words by single spaces \(none at the "
     r"ends\), without tabs or characters CLIP cuts into bytes$"),
    (dict(target_prompt="a dog\tsitting on a mat", reweight="mat=2"), ValueError,
     r"the target prompt's word 'dog\\tsitting' does not match its CLIP tokens"),
    (dict(cross_replace=1.5), ValueError, r"cross_replace must be a fraction of the steps in \[0, 1\]"),
    (dict(self_replace=-0.1), ValueError, r"self_replace must be a fraction of the steps in \[0, 1\]"),
    (dict(local_blend=("cow", "dog")), ValueError, "local_blend source word 'cow' is not a word"),
    (dict(local_blend="cat"), ValueError, "local_blend takes the source's and the target's words"),
    (dict(local_blend="cat,dog"), ValueError, "reads the cross-attention at 1/4 of the latent size"),
    (dict(target_guidance=math.nan), ValueError, "target guidance must be finite")])
def test_bad_input_fails_before_any_unet_work(sd1, src_inv, kw, error, words, monkeypatch):
    """One line each; a prompt past 75 CLIP tokens (its last words would have no tokens) and a weight outside
    [-10, 10] (1e30 overflowed the attention, blamed on "damaged weights") among them."""
    monkeypatch.setattr(sd1, "unet", mock.Mock(side_effect=AssertionError("the UNet ran"), config=sd1.unet.config))
    monkeypatch.setattr(sd1, "text_encoder", mock.Mock(side_effect=AssertionError("the text encoder ran")))
    if "source_prompt" in kw:  # an inversion made with it: the edit reads it from there
        src_inv = dataclasses.replace(src_inv, settings=dataclasses.replace(src_inv.settings,
                                                                            source_prompt=kw.pop("source_prompt")))
    kw = {"target_prompt": "a dog sitting on a mat", **kw}
    with pytest.raises(error, match=words) as raised:
        p2p.edit(sd1, src_inv, **kw)
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 200


def test_words_must_match_their_tokens_where_words_are_used():
    """Words are found by the lengths of their tokens (word_spans): "mat" after two spaces in a row would get no token,
    "on" after "猫" (3 byte tokens) "猫"'s second. Refused where words are used: Replace (equal word counts),
    reweight and local_blend; Refine aligns tokens, not words."""
    check = lambda src, tar, **kw: p2p.check_options(src, tar, 7.5, 0.6, 0.2, kw.get("reweight"), kw.get("blend"))
    tok = p2p.clip_tokenizer()
    assert p2p.word_spans(p2p.token_texts(tok, "a dog on a  mat"), "a dog on a  mat".split(" "))[-2:] == [[5], []]
    check(SRC, "a fluffy cat sitting on a  mat")  # Refine
    check(SRC, "a dog sitting on a mat", reweight="mat=2")
    check(SRC, "İstanbul dog sitting on a mat")  # "i̇" is 2 characters once lowercased, 2 tokens: they match
    for src, tar, kw in [(SRC, "a fluffy cat sitting on a  mat", dict(reweight="mat=2")),
                         (SRC, "a fluffy cat sitting on a mat ", dict(blend=("cat", "cat"))),
                         (SRC, "a 猫 sitting on a mat", {}), ("a cat\nsitting on a mat", "a dog\nsitting on a mat", {}),
                         (None, "a fluffy 猫 sitting on a mat", dict(reweight="mat=2"))]:
        with pytest.raises(ValueError, match="does not match its CLIP tokens"):
            check(src, tar, **kw)


def test_an_inversion_without_source_prompt_is_refused(sd1, inv1, monkeypatch):
    monkeypatch.setattr(sd1, "unet", mock.Mock(side_effect=AssertionError("the UNet ran"), config=sd1.unet.config))
    with pytest.raises(minledits.InversionError, match="Prompt-to-Prompt needs the inversion's source prompt"):
        p2p.edit(sd1, inv1, "a dog")


def test_local_blend_reads_the_references_layers_at_512_px():
    """The reference's LocalBlend reads attention_store["down_cross"][2:4] + ["up_cross"][:3] (its store keeps layers
    of <= 32^2 queries); on SD 1.5 at 512 px (64x64 latents) these are the down/up cross-attention layers at level 2,
    16x16, which is the rule of p2p (and of oracle_p2p). The call order comes from diffusers' UNet on meta."""
    unet, calls = hub.build("sd15", device="meta").unet, []

    class Record:
        def __init__(self, place):
            self.place = place

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kw):
            calls.append((len(calls), self.place, encoder_hidden_states is not None, hidden_states.shape[1]))
            return hidden_states
    unet.set_attn_processor({name: Record(name.split("_")[0]) for name in unet.attn_processors})
    unet(torch.zeros(1, 4, 64, 64, device="meta"), 10, encoder_hidden_states=torch.zeros(1, 77, 768, device="meta"))
    stored = [c for c in calls if c[3] <= 32 ** 2]
    theirs = [c for c in stored if c[1:3] == ("down", True)][2:4] + [c for c in stored if c[1:3] == ("up", True)][:3]
    size = p2p.level_size(hub.configs("sd15")["unet"], (64, 64), p2p.MAP_LEVEL)
    assert size == (16, 16)
    assert [c for c in calls if c[2] and c[1] != "mid" and c[3] == size[0] * size[1]] == theirs


# --------------------------------------------------------------------------------------------- the command line
def cli_edit(folder, tmp_path, *extra):
    photo().save(tmp_path / "in.png")
    return ["edit", tmp_path / "in.png", "-o", tmp_path / "out.png", "--model", folder, "--method", "p2p",
            "--device", "cpu", "--size", SIZE, "--steps", 16, "--source-prompt", SRC,
            "--target-prompt", "a dog sitting on a mat", *extra]


def test_cli_edit_is_p2p_edit(deep_model, tmp_path, capsys):
    """edit --method p2p writes the decoded p2p.edit of its inversion (read back from --save-inversion); without
    --skip, the method's share of the steps; the PNG records the method's options; --trace writes the tensors and
    the per-word maps."""
    ref, sd, _ = deep_model
    argv = cli_edit(ref.folder, tmp_path, "--reweight", "dog=2", "--local-blend", "cat,dog", "--save-inversion",
                    tmp_path / "inv.safetensors", "--trace", tmp_path / "tr", "-q")
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    inv = minledits.io.store.load(tmp_path / "inv.safetensors")
    assert inv.settings.skip == p2p.default_skip(16) == 2
    w0 = p2p.edit(sd, inv, "a dog sitting on a mat", reweight="dog=2", local_blend="cat,dog")
    assert np.array_equal(np.asarray(minledits.decode(sd, w0)), np.asarray(Image.open(tmp_path / "out.png")))
    said = json.loads(Image.open(tmp_path / "out.png").text["minledits"])
    assert said["method"] == "p2p" and said["reweight"] == "dog=2" and said["local_blend"] == "cat,dog"
    tensors = safetensors.torch.load_file(tmp_path / "tr.safetensors")
    assert tensors["attn"].shape == (16 - 2, 6, 2, 2) and tensors["x"].shape[1] == 2
    assert Image.open(tmp_path / "tr.png").size == (14 * 66, 7 * 66)  # 14 steps; x0 + 6 words; 8x8 tiles x8 + frame


def test_cli_png_command_reproduces_the_p2p_edit(tiny_sd1, tmp_path, capsys):
    """The PNG's `parameters` chunk is a command line: run it (plus -o) and get the same pixels."""
    rc, _, err = run(capsys, *cli_edit(tiny_sd1.folder, tmp_path, "--reweight", "dog=2", "--cross-replace", 0.5, "-q"))
    assert rc == 0, err
    argv = shlex.split(Image.open(tmp_path / "out.png").text["parameters"])[1:]
    assert "--method=p2p" in argv and "--skip=2" in argv and "--cross-replace=0.5" in argv
    assert run(capsys, *argv, "--device", "cpu", "-o", tmp_path / "again.png", "-q")[0] == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(tmp_path / "out.png")))


@pytest.mark.parametrize("extra, words", [
    (("--source-prompt", ""), "needs the inversion's source prompt"),
    (("-e", "glasses"), "takes no concepts"),
    (("--reweight", "cow=2"), "reweight word 'cow' is not a word of the prompt"),
    (("--local-blend", "cat"), "local_blend takes the source's and the target's words"),
    (("--cross-replace", "1.5"), r"cross_replace must be a fraction"),
    (("--local-blend", "cat,dog"), "reads the cross-attention at 1/4 of the latent size"),  # 2-level UNet
    (("--reweight", "dog=1e30"), r"reweight 'dog'=1e\+30: a weight must be a number from -10 to 10"),
    (("--reweight", "dog=-inf"), r"reweight 'dog'=-inf: a weight must be a number from -10 to 10"),
    (("--reweight", "dog=2,dog=3"), "reweight names the word 'dog' twice"),
    (("--target-prompt", LONG), "the target prompt 'a dog sitting .*'… is 85 CLIP tokens; Prompt-to-Prompt takes at "
                                "most 75"),
    (("--source-prompt", LONG), "the source prompt 'a dog sitting .*'… is 85 CLIP tokens"),
    (("--target-prompt", "a dog sitting on a  mat", "--reweight", "mat=2"), "target prompt's word '' does not match"),
    (("--source-prompt", "a 猫 sitting on a mat", "--local-blend", "mat,mat"), "source prompt's word '猫' does not")])
def test_cli_bad_input_is_one_line_before_any_work(tiny_sd1, tmp_path, capsys, extra, words):
    with mock.patch.object(minledits.inversion, "noise_maps", side_effect=AssertionError("the UNet ran")):
        rc, out, err = run(capsys, *cli_edit(tiny_sd1.folder, tmp_path, *extra))
    assert rc == 1 and err.count("\n") == 1 and re.search(words, err) and len(err) < 250, err
    assert not (tmp_path / "out.png").exists()


def test_cli_help_states_the_p2p_defaults(capsys):
    rc, out, _ = run(capsys, "edit", "--help")
    text = " ".join(out.split())  # (the terminal's width decides the line breaks)
    if console_script():  # the installed command says the same
        assert " ".join(subprocess.run([console_script(), "edit", "--help"], capture_output=True,
                                       text=True).stdout.split()) == text
    assert rc == 0 and f"--method p2p: {p2p.default_skip(100)} of 100" in text and p2p.default_skip(100) == 12
    assert "--cross-replace X p2p: fraction of all N steps" in text and "(default: 0.6)" in text


def test_the_references_patch_finds_nothing_on_todays_diffusers(tiny_sd1):
    """The reference's register_attention_control patches the modules whose class is named "CrossAttention"
    (diffusers 0.8.0); diffusers 0.42.1 has none, so its controller would never be called (docs/references.md)."""
    names = {type(m).__name__ for m in tiny_sd1.unet.modules()}
    assert "CrossAttention" not in names and "Attention" in names


def test_v_prediction(tmp_path):
    """A v-prediction model (tiny SD 2.x v, deep): the reference's own reverse_step assumes eps; the oracle steps with
    DDIMScheduler.step, which converts v as our sampler does. Replace, reweight and LocalBlend at once."""
    ref = deep("tiny-sd2v", tmp_path, 24)
    sd = minledits.load(ref.folder)
    inv = minledits.invert(sd, photo(), steps=STEPS, skip=SKIP, size=PX, seed=3, source_prompt=SRC)
    target, blend = "a dog sitting on a mat", ("cat", "dog")
    ours = p2p.edit(sd, inv, target, target_guidance=7.5, reweight={"dog": 2.0}, local_blend=blend)
    theirs = reference(ref, inv, target, 7.5, reweight={"dog": 2.0}, blend=blend)
    torch.testing.assert_close(ours, theirs[1:], atol=1e-4, rtol=1e-4)


@pytest.mark.heavy
def test_full_size_sd15(tmp_path):
    """The SD 1.5 architecture (random weights, Hub layout) at 128 px: 16x16 latents, 4 levels (self-attention of
    every layer <= 16^2 queries: all replaced), LocalBlend at level 2 (4x4, down_blocks.2 and up_blocks.1), 8
    heads, the mid block at 2x2; a word swap with reweighting and LocalBlend, N = 5, skip 1. About 4.3 GB on disk
    and ~8 GB of memory (heavy: above the default suite's budget)."""
    ref = hub.make("sd15", tmp_path)
    sd = minledits.load(ref.folder)
    inv = minledits.invert(sd, photo(), steps=5, skip=1, size=128, seed=3, source_prompt=SRC)
    target, blend = "a dog sitting on a mat", ("cat", "dog")
    steps = []
    ours = p2p.edit(sd, inv, target, target_guidance=7.5, reweight={"dog": 2.0}, local_blend=blend,
                    callback=steps.append)
    prompts, tokenizer = [SRC, target], oracle.tokenizer(ref.folder)
    ctrl = oracle_p2p.Controller(tokenizer, prompts, 5, 0.6, 0.2, "replace", {"dog": 2.0}, [["cat"], ["dog"]], (4, 4))
    oracle_p2p.register(ref.unet, ctrl)
    theirs = oracle_p2p.reverse(ref, tokenizer, inv.xts[:1], inv.zs, 5, prompts, [3.5, 7.5], ctrl)
    print(f"sd15 full size: max abs diff {(ours - theirs[1:]).abs().max():.3g}")
    torch.testing.assert_close(ours, theirs[1:], atol=1e-4, rtol=1e-4)
    assert steps[0].attn.shape == (2, 4, 4, 77)
