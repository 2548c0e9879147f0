"""Prompt-to-Prompt (Hertz et al. 2022) on edit-friendly DDPM inversion: the "p2pinv" mode of the DDPM inversion
paper's code (inbarhub/DDPM_inversion), the middle method of the LEDITS paper's comparison (its Figure 4).
On a DDIM inversion (sampler "ddim": its noise maps are 0 and each step is DDIM's with eta = 0) the same loop is the
classic "DDIM + P2P" baseline (Prompt-to-Prompt's null-text notebook with plain DDIM inversion; PnPInversion's
run_editing_p2p), from skip 0.

Two rows regenerate the inversion in one batch: the source row with the source prompt and guidance (it walks the
inversion's own latents back to the photo), the target row with the target prompt, its attention taken from the
source row's. The result is the target row.

Notation (code name -> symbol); sampler symbols in sampler.py
    x        [x^s_t, x^p_t]         source and target rows, both starting at x_{tau_skip} of the inversion
    N, i     N, i = k - skip        the inversion's steps; the edit step, the controller's step counter
    z        z_k                    the inversion's noise map, the same for both rows
    s        [s_src, s_tar]         guidance per row (s_src and the source prompt from the inversion)
    out      [eps_u, eps_c]         one UNet call of 4 rows [u, u, src, tar]: unconditional and conditional, both rows
    eps      eps_u + s (eps_c - eps_u)
    P, Q     P^s, P^p               the conditional rows' attention probabilities [heads, n, m] (source, target);
                                    the unconditional rows are never touched
    M        M [77, 77]             Replace (same word count): source token -> target token(s) of each swapped word
    m, a     m [77], a [77]         Refine (other counts): the source token aligned to each target token, and 1 where
                                    one is (0 for a new token)
    R        R(P) = P M  |  P[..., m] a + Q (1 - a)
    W        W [77]                 reweighting: each given target word's tokens' weight (1 elsewhere)
    alpha    alpha_i = [i < int(c_x (N + 1))]     c_x = cross_replace (the reference's table has N + 1 rows)
    Q'       alpha_i R(P) W + (1 - alpha_i) Q     the target row's cross-attention
             P        in self-attention with n <= 16^2 tokens, while i < int(N c_s)   (c_s = self_replace)
    A        A_r = sum_{j <= i} mean over the down/up cross-attention layers at (h/4, w/4) (16 x 16 at 512 px) and
             their heads of the row's probabilities (the target's after its edit, as the reference keeps them)
             summed over the row's local-blend words' tokens                                     [2, 1, h/4, w/4]
    mask     union over r of [up(maxpool_3x3(A_r)) / its max > 0.3], up: nearest-neighbour to (h, w)  [1, 1, h, w]
    x_prev   x_{t-1} = sampler.step(k, x, eps, z); with LocalBlend x^p_{t-1} <- x^s_{t-1} + mask (x^p_{t-1} - x^s_{t-1})
Step counting as the reference: cross_replace and self_replace are fractions of all N steps, but the counter i
starts at the first executed step after the skip: at N = 100, skip 36 and cross_replace 0.6 the cross-attention is
replaced during the first 60 of the 64 executed steps (self_replace 0.2: during 20).
Words are the prompt split at single spaces (punctuation stays in its word: "cat," is one word). A word's tokens
are found as the reference's get_word_inds does: tokens are decoded one by one and handed to the words in order,
each word taking tokens until their decoded lengths reach its own; a word of several tokens has several.
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import parity
from .errors import InversionError, shorten
from .inversion import Inversion
from .ledits import check_finite, start
from .model import StableDiffusion
from .nets.layers import AttentionLayer
from .nets.tokenizer import CONTEXT_LENGTH, Tokenizer, byte_symbols

SELF_MAX = 16 ** 2      # self-attention is replaced only in layers with at most this many queries
THRESHOLD = 0.3         # LocalBlend's threshold on the normalised map
MAP_LEVEL = 2           # LocalBlend's maps come from UNet level 2: (h/4, w/4), 16 x 16 at 512 px
REWEIGHT_MAX = 10       # reweight takes weights from -REWEIGHT_MAX to REWEIGHT_MAX (check_options)


def default_skip(N: int, sampler: str = "ddpm") -> int:
    """The reference's example skip for this mode, 12 of N = 100 steps (its README: --skip=12), in proportion; on a
    DDIM inversion (sampler "ddim") 0, as the DDIM + P2P baseline inverts and edits every step."""
    return 0 if sampler == "ddim" else round(12 * N / 100)


# ------------------------------------------------------------------------------------------------ words and tokens
def token_texts(tok: Tokenizer, prompt: str) -> list[str]:
    """Each CLIP token of the prompt (at most 75) decoded alone, stripped of spaces and "#", as the reference reads
    them (a byte of an unfinished UTF-8 character reads as one U+FFFD)."""
    symbols = byte_symbols()
    printable = [ord(s) for s in symbols if ord(s) < 256]
    byte = {chr(b): b for b in printable} | {chr(256 + j): b for j, b in
                                             enumerate(b for b in range(256) if b not in set(printable))}
    pieces = [t.removesuffix("</w>") for t in tok.tokenize(prompt)[:CONTEXT_LENGTH - 2]]
    return [bytes(byte[c] for c in p).decode("utf-8", errors="replace").strip().strip("#") for p in pieces]


def word_spans(texts: list[str], words: list[str]) -> list[list[int]]:
    """Each word's token positions (1 = the first after the start token): tokens are handed to the words in order, a
    word taking tokens until their decoded lengths reach its length."""
    out, w, filled = [[] for _ in words], 0, 0
    for pos, text in enumerate(texts, 1):
        filled += len(text)
        if w < len(words):
            out[w].append(pos)
            if filled >= len(words[w]):
                w, filled = w + 1, 0
    return out


def word_tokens(texts: list[str], words: list[str], which) -> list[int]:
    """Token positions of the words numbered `which` (word_spans)."""
    spans = word_spans(texts, words)
    return [pos for n in sorted(which) if n < len(words) for pos in spans[n]]


def check_spans(what: str, prompt: str, tok: Tokenizer) -> None:
    """Refuse a prompt whose words word_spans hands other tokens than their own (a word after two spaces in a row,
    a tab or a character CLIP cuts into bytes would be given its neighbour's tokens, silently)."""
    words, texts = prompt.split(" "), token_texts(tok, prompt)
    for word, span in zip(words, word_spans(texts, words)):
        if not span or "".join(texts[p - 1] for p in span) != tok.normalize(word).replace(" ", ""):
            raise ValueError(f"the {what}'s word {shorten(word)} does not match its CLIP tokens: separate words by "
                             "single spaces (none at the ends), without tabs or characters CLIP cuts into bytes")


def word_positions(tok: Tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """(word, its token positions) for every word of the prompt, in order (for pictures of the maps)."""
    words, texts = prompt.split(" "), token_texts(tok, prompt)
    return [(w, word_tokens(texts, words, {n})) for n, w in enumerate(words)]


def positions(tok: Tokenizer, prompt: str, word: str) -> list[int]:
    """The token positions of every occurrence of `word` (a whole word, as split at spaces) in the prompt."""
    words = prompt.split(" ")
    return word_tokens(token_texts(tok, prompt), words, {n for n, w in enumerate(words) if w == word})


def replace_mapper(tok: Tokenizer, src: str, tar: str) -> torch.Tensor:
    """M [77, 77] for prompts of equal word counts: a swapped word's source tokens go to its target tokens (one to
    one when the counts agree, else each to all of them with weight 1 / count); the other tokens go straight across
    until the last swapped word, then position j to j (the reference's walk, kept exactly)."""
    ws, wt, ts, tt = src.split(" "), tar.split(" "), token_texts(tok, src), token_texts(tok, tar)
    swaps = [(word_tokens(ts, ws, {n}), word_tokens(tt, wt, {n})) for n in range(len(wt)) if ws[n] != wt[n]]
    if any(not a or not b for a, b in swaps):
        raise ValueError(f"a swapped word of {shorten(src)} -> {shorten(tar)} has no CLIP tokens (two spaces in a "
                         "row?)")
    M, L = torch.zeros(CONTEXT_LENGTH, CONTEXT_LENGTH), CONTEXT_LENGTH
    i = j = c = 0
    while i < L and j < L:
        if c < len(swaps) and swaps[c][0][0] == i:
            a, b = swaps[c]
            if len(a) == len(b):
                M[a, b] = 1
            else:
                M[torch.tensor(a)[:, None], torch.tensor(b)] = 1 / len(b)
            c, i, j = c + 1, i + len(a), j + len(b)
        else:
            M[i if c < len(swaps) else j, j] = 1
            i, j = i + 1, j + 1
    return M


def align(x: list[int], y: list[int]) -> list[int]:
    """For each token of y, the index of the token of x aligned with it, or -1: global alignment (match 1,
    mismatch -1, gap 0), ties going to a gap in x, then a gap in y, then the diagonal, traced back from the end."""
    S = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    move = [[4] + [1] * len(y)] + [[2] + [0] * len(y) for _ in x]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left, up, diag = S[i][j - 1], S[i - 1][j], S[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            S[i][j] = max(left, up, diag)
            move[i][j] = 1 if S[i][j] == left else 2 if S[i][j] == up else 3
    out, i, j = [-1] * len(y), len(x), len(y)
    while move[i][j] != 4:
        if move[i][j] == 3:
            i, j = i - 1, j - 1
            out[j] = i
        elif move[i][j] == 1:
            j -= 1
        else:
            i -= 1
    return out


def token_ids(tok: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids with start and end tokens, without padding."""
    return tok(prompt)[0, :min(len(tok.tokenize(prompt)), CONTEXT_LENGTH - 2) + 2].tolist()


def refine_mapper(tok: Tokenizer, src: str, tar: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(m [77], a [77]): the source position aligned with each target position (-1, read as the last position but
    weighted 0, for a new token; padding j -> j), and a = 1 where a source token is aligned."""
    y, base = token_ids(tok, tar), align(token_ids(tok, src), token_ids(tok, tar))
    m = torch.tensor(base + list(range(len(y), CONTEXT_LENGTH)))
    a = torch.tensor([float(v != -1) for v in base] + [1.0] * (CONTEXT_LENGTH - len(y)))
    return m, a


def equalizer(tok: Tokenizer, prompt: str, weights: dict[str, float]) -> torch.Tensor:
    """W [77]: each given word's tokens (every occurrence) get its weight, the others 1."""
    W = torch.ones(CONTEXT_LENGTH)
    for word, w in weights.items():
        W[positions(tok, prompt, word)] = w
    return W


def blend_weights(tok: Tokenizer, prompts: list[str], words: list[list[str]]) -> torch.Tensor:
    """[2, 77]: 1 at the tokens of each row's local-blend words."""
    B = torch.zeros(2, CONTEXT_LENGTH)
    for r, (prompt, ws) in enumerate(zip(prompts, words)):
        for w in ws:
            B[r, positions(tok, prompt, w)] = 1
    return B


# ------------------------------------------------------------------------------------------------ options
def reweight_of(reweight) -> dict[str, float]:
    """{word: weight} from None, a dict, or "word=weight,word=weight" (the CLI's --reweight)."""
    if reweight is None:
        return {}
    if isinstance(reweight, str):
        pairs = [p.partition("=") for p in reweight.split(",")]
        if any(not w.strip() or not eq for w, eq, _ in pairs):
            raise ValueError(f"reweight must read word=weight[,word=weight...], got {shorten(reweight)}")
        words = [w.strip() for w, _, _ in pairs]
        if len(set(words)) < len(words):  # the last weight would win without a word
            twice = next(w for w in words if words.count(w) > 1)
            raise ValueError(f"reweight names the word {shorten(twice)} twice in {shorten(reweight)}: give it once")
        try:
            return {w.strip(): float(v) for w, _, v in pairs}
        except ValueError:
            raise ValueError(f"reweight: a weight of {shorten(reweight)} is not a number") from None
    if not isinstance(reweight, dict):
        raise ValueError(f"reweight must be a dict {{word: weight}} or 'word=weight', got {shorten(reweight)}")
    return dict(reweight)


def blend_of(local_blend) -> list[list[str]] | None:
    """[source words, target words] from None, (source, target) (each a word, words split at spaces, or a list of
    words), or "source words,target words" (the CLI's --local-blend)."""
    if local_blend is None:
        return None
    sides = local_blend.split(",") if isinstance(local_blend, str) else list(local_blend)
    if len(sides) != 2 or not all(isinstance(s, (str, list, tuple)) for s in sides):
        raise ValueError(f"local_blend takes the source's and the target's words, as 'cat,dog' or (\"cat\", \"dog\"); "
                         f"got {shorten(local_blend)}")
    words = [s.split() if isinstance(s, str) else list(s) for s in sides]
    if not any(words):
        raise ValueError("local_blend names no word")
    return words


def check_fraction(name: str, v) -> float:
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1):
        raise ValueError(f"{name} must be a fraction of the steps in [0, 1], got {v!r}")
    return float(v)


def check_words(what: str, prompt: str, words) -> None:
    missing = [w for w in words if not isinstance(w, str) or w not in prompt.split(" ")]
    if missing:
        raise ValueError(f"{what} word {shorten(missing[0])} is not a word of the prompt {shorten(prompt)} (words "
                         "are split at spaces)")


def level_size(config: dict, latent_hw, level: int):
    """(h, w) of UNet level `level` (ceil halving, as the stride-2 convs), or None where it has no cross-attention."""
    L, (h, w) = len(config["down_block_types"]), latent_hw
    cross = lambda n: "CrossAttn" in config["down_block_types"][n] or "CrossAttn" in config["up_block_types"][L - 1 - n]
    if not 0 <= level < L or not cross(level):
        return None
    for _ in range(level):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


# ------------------------------------------------------------------------------------------------ the controller
@dataclass(frozen=True)
class AttentionEdit:
    """Everything the controller does, decided before any UNet work (notation above)."""
    refine: bool                  # Refine (m, a) rather than Replace (M)
    M: torch.Tensor | None        # [77, 77]
    m: torch.Tensor | None        # [77]
    a: torch.Tensor | None        # [77]
    W: torch.Tensor               # [77]
    cross_end: int                # alpha_i = 1 for i < cross_end
    self_end: int                 # self-attention replaced for i < self_end
    blend: torch.Tensor | None    # [2, 77] LocalBlend's word weights (None: no LocalBlend)
    map_size: tuple | None        # (h', w') of the cross-attention maps kept (LocalBlend, EditStep.attn); None: none

    def R(self, P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
        """R(P): the source's cross-attention [heads, n, 77] carried to the target's tokens."""
        return P[..., self.m] * self.a + Q * (1 - self.a) if self.refine else P @ self.M


class Control:
    """Attention controller of edit step i (layers.py): rows [u_src, u_tar, c_src, c_tar] of the UNet call; sets the
    target's conditional attention Q' from the source's P and keeps both conditional rows' cross-attention at the
    map size (after the edit) in `maps`, {layer name: [2, heads, n, 77]}."""

    def __init__(self, edit: AttentionEdit, i: int):
        self.edit, self.alpha, self.self_on, self.maps = edit, float(i < edit.cross_end), i < edit.self_end, {}

    def kept(self, layer: AttentionLayer, size) -> bool:
        return layer.cross and layer.place != "mid" and tuple(size) == self.edit.map_size

    def wants(self, layer: AttentionLayer, size) -> bool:
        if layer.cross:
            return self.alpha == 1 or self.kept(layer, size)
        return self.self_on and size[0] * size[1] <= SELF_MAX

    def __call__(self, layer: AttentionLayer, size, probs: torch.Tensor) -> torch.Tensor:
        P, Q = probs[2], probs[3]
        if not layer.cross:
            return torch.cat([probs[:3], P[None]])
        if self.alpha == 1:  # Q' = alpha R(P) W + (1 - alpha) Q
            Q = self.edit.R(P, Q) * self.edit.W
            probs = torch.cat([probs[:3], Q[None]])
        if self.kept(layer, size):
            self.maps[layer.name] = probs[2:]
        return probs


def blend_mask(sums: list[torch.Tensor], B: torch.Tensor, size, hw) -> torch.Tensor:
    """LocalBlend's mask [1, 1, h, w] from the kept layers' maps summed over the steps so far [2, heads, n, 77]."""
    maps = torch.cat([s.unflatten(2, size) for s in sums], 1)             # [2, layers * heads, h', w', 77]
    A = (maps * B[:, None, None, None]).sum(-1).mean(1, keepdim=True)     # A_r [2, 1, h', w']
    A = F.interpolate(F.max_pool2d(A, 3, 1, padding=1), size=tuple(hw))   # nearest
    m = (A / A.amax((2, 3), keepdim=True)).gt(THRESHOLD)
    return (m[:1] | m[1:]).to(A.dtype)


@functools.cache
def clip_tokenizer() -> Tokenizer:
    """CLIP's tokenizer, the one of every Stable Diffusion model: counts a prompt's tokens before a model is loaded."""
    return Tokenizer.builtin()


def check_length(what: str, prompt: str, tok: Tokenizer) -> None:
    """Refuse a prompt of more CLIP tokens than the text encoder reads: its words past them would have no tokens."""
    n, most = len(tok.tokenize(prompt)), CONTEXT_LENGTH - 2
    if n > most:
        raise ValueError(f"the {what} {shorten(prompt)} is {n} CLIP tokens; Prompt-to-Prompt takes at most {most} "
                         "(it matches each word to its tokens)")


def check_options(src: str | None, target_prompt, target_guidance, cross_replace, self_replace, reweight, local_blend,
          dtype=torch.float32, tok: Tokenizer | None = None) -> tuple:
    """(c_x, c_s, {word: weight}, [source words, target words] | None) after checking every option, one line each:
    InversionError without a source prompt, ValueError for the rest. src None (not known yet, as in the CLI with an
    inversion file) skips the checks that need it. tok: the model's tokenizer (None: CLIP's, clip_tokenizer)."""
    if src is not None and not src.strip():
        raise InversionError("Prompt-to-Prompt needs the inversion's source prompt: invert with source_prompt= "
                             "(--source-prompt) describing the photo")
    if not isinstance(target_prompt, str) or not target_prompt.strip():
        raise ValueError(f"Prompt-to-Prompt needs a target prompt, got {shorten(target_prompt)}")
    tok = tok or clip_tokenizer()
    for what, prompt in (("source prompt", src), ("target prompt", target_prompt)):
        if prompt is not None:
            check_length(what, prompt, tok)
    big = torch.finfo(dtype).max
    if not (isinstance(target_guidance, (int, float)) and abs(target_guidance) < big):
        raise ValueError(f"target guidance must be finite, got {target_guidance!r}")
    c_x, c_s = check_fraction("cross_replace", cross_replace), check_fraction("self_replace", self_replace)
    weights, words = reweight_of(reweight), blend_of(local_blend)
    check_words("reweight", target_prompt, weights)
    for word, w in weights.items():
        # The reference multiplies the word's attention probabilities by w and takes any w; its examples use 5 and
        # -1 (a negative w takes the word away: "pay less attention"). Past 10 one word's share outweighs all the
        # softmax's tenfold: no longer an edit of the picture.
        if not (isinstance(w, (int, float)) and not isinstance(w, bool) and -REWEIGHT_MAX <= w <= REWEIGHT_MAX):
            raise ValueError(f"reweight {shorten(word)}={shorten(w)}: a weight must be a number from -{REWEIGHT_MAX} "
                             f"to {REWEIGHT_MAX} (the word's attention times the weight)")
    for what, prompt, ws in zip(("local_blend source", "local_blend target"), (src, target_prompt), words or ()):
        if prompt is not None:
            check_words(what, prompt, ws)
    replace = src is not None and len(src.split(" ")) == len(target_prompt.split(" "))  # Replace maps words
    for what, prompt, by_words in (("source prompt", src, replace or words), ("target prompt", target_prompt,
                                                                             replace or words or weights)):
        if prompt is not None and by_words:
            check_spans(what, prompt, tok)
    return c_x, c_s, weights, words


def check_levels(unet_config: dict) -> None:
    """LocalBlend reads UNet level MAP_LEVEL: refuse a UNet without cross-attention there (one line)."""
    if level_size(unet_config, (8, 8), MAP_LEVEL) is None:
        raise ValueError(f"local_blend reads the cross-attention at 1/4 of the latent size (UNet level {MAP_LEVEL}); "
                         "this UNet has none there")


def attention_edit(sd: StableDiffusion, inv: Inversion, target_prompt, target_guidance, cross_replace, self_replace,
                   reweight, local_blend) -> AttentionEdit:
    """The AttentionEdit of an edit, every option checked (check_options) and the UNet's levels too, before any UNet
    work."""
    if sd.prediction_type == "flow":
        raise ValueError("Prompt-to-Prompt replaces a UNet's cross-attention maps; this model (a rectified flow) has "
                         "joint attention instead: use leditspp or flowedit")
    src, N = inv.settings.source_prompt, inv.settings.steps
    c_x, c_s, weights, words = check_options(src, target_prompt, target_guidance, cross_replace, self_replace,
                                             reweight, local_blend, sd.dtype, sd.tokenizer)
    if words:
        check_levels(sd.unet.config)
    hw, L = tuple(inv.xts.shape[-2:]), len(sd.unet.config["down_block_types"])
    size = level_size(sd.unet.config, hw, MAP_LEVEL)
    levels = [n for n in range(L) if level_size(sd.unet.config, hw, n)]
    if size is None and levels:  # the level nearest to MAP_LEVEL (the maps are kept whether or not a callback reads)
        size = level_size(sd.unet.config, hw, min(levels, key=lambda n: abs(n - MAP_LEVEL)))
    tok, refine = sd.tokenizer, len(src.split(" ")) != len(target_prompt.split(" "))
    m, a = refine_mapper(tok, src, target_prompt) if refine else (None, None)
    on = dict(device=sd.device, dtype=sd.dtype)
    return AttentionEdit(refine, None if refine else replace_mapper(tok, src, target_prompt).to(**on),
                m if m is None else m.to(sd.device), a if a is None else a.to(**on),
                equalizer(tok, target_prompt, weights).to(**on), int(c_x * (N + 1)), int(N * c_s),
                blend_weights(tok, [src, target_prompt], words).to(**on) if words else None,
                size)


# ------------------------------------------------------------------------------------------------ the edit
@dataclass
class EditStep:
    """Everything one Prompt-to-Prompt step computed, both rows [source, target]; handed to the callback."""
    i: int
    k: int
    t: int
    x_t: torch.Tensor            # [2, 4, h, w]
    eps_u: torch.Tensor          # [2, 4, h, w]
    eps_c: torch.Tensor          # [2, 4, h, w]
    eps: torch.Tensor            # [2, 4, h, w]
    z: torch.Tensor
    x_prev: torch.Tensor         # [2, 4, h, w], after LocalBlend
    attn: torch.Tensor | None    # [2, h', w', 77]: this step's cross-attention at the map size, mean of layers, heads
    blend: torch.Tensor | None   # [1, 1, h, w]: LocalBlend's mask


@torch.inference_mode()
def edit(sd: StableDiffusion, inv: Inversion, target_prompt: str, target_guidance=15.0, cross_replace=0.6,
         self_replace=0.2, reweight=None, local_blend=None, callback=None, source_guidance=None) -> torch.Tensor:
    """The target row's w0 [1, 4, h, w]. reweight: {word: weight} or "word=weight,..." (target words); local_blend:
    (source words, target words) or "src words,tar words"; callback(EditStep) receives every step.
    source_guidance: s_src of the source row; None: the inversion's (DDIM + P2P as its baseline runs: invert with
    source_guidance=1, the conditional estimate alone, and edit both rows at 7.5)."""
    inv, sampler = start(sd, inv)
    p = attention_edit(sd, inv, target_prompt, target_guidance, cross_replace, self_replace, reweight, local_blend)
    skip, src = inv.settings.skip, inv.settings.source_prompt
    s_src = inv.settings.source_guidance if source_guidance is None else source_guidance
    if not (isinstance(s_src, (int, float)) and not isinstance(s_src, bool) and abs(s_src) < torch.finfo(sd.dtype).max):
        raise ValueError(f"source guidance must be finite, got {shorten(s_src)}")
    s = torch.tensor([s_src, target_guidance], device=sd.device).view(2, 1, 1, 1).to(sd.dtype)
    context = parity.text_kv(sd, sd.text_embeddings(["", "", src, target_prompt]))
    x, sums = inv.xts[:1].to(sd.device, sd.dtype).expand(2, -1, -1, -1), {}
    for i, (k, z) in enumerate(zip(range(skip, sampler.N), inv.zs.to(sd.device, sd.dtype))):
        t, ctrl = sampler.timesteps[k], Control(p, i)
        with sd.unet.attention_controller(ctrl):
            out = sd.predict(x.repeat(2, 1, 1, 1), t, context)  # [u_src, u_tar, c_src, c_tar]
        eps_u, eps_c = out[:2], out[2:]
        eps = eps_u + s * (eps_c - eps_u)
        x_prev = sampler.step(k, x, eps, z)
        sums = {n: sums[n] + A if n in sums else A for n, A in ctrl.maps.items()}
        mask = blend_mask(list(sums.values()), p.blend, p.map_size, x.shape[-2:]) if p.blend is not None else None
        if mask is not None:
            x_prev = x_prev[:1] + mask * (x_prev - x_prev[:1])
        check_finite(i, t, out, x, x_prev)
        if callback:
            attn = torch.cat(list(ctrl.maps.values()), 1).mean(1).unflatten(1, p.map_size) if ctrl.maps else None
            callback(EditStep(i, k, t, x, eps_u, eps_c, eps, z, x_prev, attn, mask))
        x = x_prev
    return x[1:]
