"""Reference Prompt-to-Prompt on edit-friendly DDPM inversion (inbarhub/DDPM_inversion, main_run.py --mode p2pinv),
rebuilt for today's diffusers: the oracle of tests/test_p2p.py.

The reference patches diffusers 0.8's CrossAttention.forward to hand every attention's probabilities
[batch * heads, n, m] to a controller. CrossAttention is gone; here the same controller sits in a diffusers attention
processor (computed as AttnProcessor does). What is kept from the reference, as it behaves:
  - its reverse loop (inversion_reverse_process): per step an unconditional UNet call and a conditional one, each
    of batch 2 [source, target]; per-row guidance; the DDPM step with eta = 1 and the noise map z for both rows
    (DDIMScheduler.step with variance_noise, which is its reverse_step for eta = 1); then controller.step_callback;
  - its controller bookkeeping (ptp_classes.py with LOW_RESOURCE = True): every attention call counts; the first
    num_att_layers calls of a step (the unconditional call) pass untouched, the next num_att_layers are edited;
    after 2 num_att_layers calls cur_step += 1 and the step's stored maps are added to the running sums;
  - the edit: the target's cross-attention becomes alpha R(P) + (1 - alpha) Q with the time/word table of
    get_time_words_attention_alpha (N + 1 rows), self-attention copied in layers with n <= 16^2 while
    int(N * 0) <= cur_step < int(N * self_replace); Reweight multiplies R(P) by its equalizer (its previous
    controller's R);
  - the stored maps (layers with n <= 32^2, after the edit: the reference stores a view of the tensor it edits);
  - LocalBlend on the running sums: the reference reads attention_store["down_cross"][2:4] + ["up_cross"][:3], which
    at 512 px are the down/up cross-attention layers at 16 x 16; here the stored down/up cross layers at the given
    `res` (test_p2p checks that the two rules pick the same layers of SD 1.5 at 512 px);
  - word <-> token mapping through transformers' CLIPTokenizer, decoding token by token (get_word_inds,
    get_replacement_mapper_, get_mapper with its global alignment, get_equalizer).
Written from the reference's behaviour, not copied.
"""
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from tests import hub

L = 77


# --------------------------------------------------------------------------------------------- words and tokens
def word_inds(tokenizer, text: str, which) -> list[int]:
    """get_word_inds: which is a word (every position where the split text equals it) or a word number."""
    split = text.split(" ")
    places = [n for n, w in enumerate(split) if w == which] if isinstance(which, str) else [which]
    decoded = [tokenizer.decode([t]).strip("#") for t in tokenizer.encode(text)][1:-1]
    out, ptr, cur = [], 0, 0
    for n, piece in enumerate(decoded):
        cur += len(piece)
        if ptr in places:
            out.append(n + 1)
        if cur >= len(split[ptr]):
            ptr, cur = ptr + 1, 0
    return out


def replacement_mapper(tokenizer, x: str, y: str) -> torch.Tensor:
    """get_replacement_mapper_ for one pair [77, 77]."""
    wx, wy = x.split(" "), y.split(" ")
    assert len(wx) == len(wy)
    changed = [n for n in range(len(wy)) if wx[n] != wy[n]]
    src = [word_inds(tokenizer, x, n) for n in changed]
    tar = [word_inds(tokenizer, y, n) for n in changed]
    mapper = np.zeros((L, L))
    i = j = cur = 0
    while i < L and j < L:
        if cur < len(src) and src[cur][0] == i:
            if len(src[cur]) == len(tar[cur]):
                mapper[src[cur], tar[cur]] = 1
            else:
                for t in tar[cur]:
                    mapper[src[cur], t] = 1 / len(tar[cur])
            i, j, cur = i + len(src[cur]), j + len(tar[cur]), cur + 1
        elif cur < len(src):
            mapper[i, j] = 1
            i, j = i + 1, j + 1
        else:
            mapper[j, j] = 1
            i, j = i + 1, j + 1
    return torch.from_numpy(mapper).float()


def global_alignment(x, y):
    """Score and trace-back matrices: gap 0, match 1, mismatch -1; trace 1 left, 2 up, 3 diagonal, 4 origin."""
    score = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    trace = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    trace[0, 1:], trace[1:, 0], trace[0, 0] = 1, 2, 4
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left, up = score[i, j - 1], score[i - 1, j]
            diag = score[i - 1, j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i, j] = max(left, up, diag)
            trace[i, j] = 1 if score[i, j] == left else (2 if score[i, j] == up else 3)
    return trace


def refinement_mapper(tokenizer, x: str, y: str):
    """get_mapper for one pair: (mapper [77] int64, alphas [77])."""
    xs, ys = tokenizer.encode(x), tokenizer.encode(y)
    trace, pairs = global_alignment(xs, ys), []
    i, j = len(xs), len(ys)
    while i > 0 or j > 0:
        if trace[i, j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif trace[i, j] == 1:
            j -= 1
            pairs.append((j, -1))
        elif trace[i, j] == 2:
            i -= 1
        else:
            break
    base = torch.tensor(pairs[::-1], dtype=torch.int64)
    alphas, mapper = torch.ones(L), torch.zeros(L, dtype=torch.int64)
    alphas[:len(base)] = base[:, 1].ne(-1).float()
    mapper[:len(base)] = base[:, 1]
    mapper[len(base):] = len(ys) + torch.arange(L - len(ys))
    return mapper, alphas


def equalizer(tokenizer, text: str, weights: dict) -> torch.Tensor:
    """get_equalizer, one word at a time: [1, 77]."""
    eq = torch.ones(1, L)
    for word, value in weights.items():
        eq[:, word_inds(tokenizer, text, word)] = torch.tensor([value], dtype=torch.float32)
    return eq


# --------------------------------------------------------------------------------------------- the controller
class Controller:
    """AttentionReplace / AttentionRefine (kind "replace" / "refine"), optionally wrapped by AttentionReweight
    (weights), optionally with LocalBlend (blend = (source words, target words), at `res` (h', w'))."""

    def __init__(self, tokenizer, prompts, steps, cross, self_, kind, weights=None, blend=None, res=None,
                 threshold=0.3):
        self.cur_step = self.cur_att_layer = 0
        self.num_att_layers = -1
        self.step_store, self.attention_store = self.empty(), {}
        self.kind, self.res, self.threshold = kind, res, threshold
        if kind == "replace":
            self.mapper = replacement_mapper(tokenizer, *prompts)[None]  # [1, 77, 77]
        else:
            m, a = refinement_mapper(tokenizer, *prompts)
            self.mapper, self.alphas = m[None], a[None].reshape(1, 1, 1, L)
        self.eq = equalizer(tokenizer, prompts[1], weights) if weights else None
        alpha = torch.zeros(steps + 1, 1, L)  # get_time_words_attention_alpha, default bounds (0, cross)
        start, end = int(0.0 * alpha.shape[0]), int(cross * alpha.shape[0])
        alpha[start:end] = 1
        self.cross_alpha = alpha.reshape(steps + 1, 1, 1, 1, L)
        self.self_window = int(steps * 0.0), int(steps * self_)
        self.blend = None
        if blend:
            self.blend = torch.zeros(2, 1, 1, 1, 1, L)
            for r, words in enumerate(blend):
                for w in words:
                    self.blend[r, :, :, :, :, word_inds(tokenizer, prompts[r], w)] = 1

    @staticmethod
    def empty():
        return {f"{p}_{k}": [] for p in ("down", "mid", "up") for k in ("cross", "self")}

    def __call__(self, attn, is_cross, place):
        if self.cur_att_layer >= self.num_att_layers:  # the conditional call (LOW_RESOURCE)
            attn = self.forward(attn, is_cross, place)
        self.cur_att_layer += 1
        if self.cur_att_layer == 2 * self.num_att_layers:
            self.cur_att_layer, self.cur_step = 0, self.cur_step + 1
            self.between_steps()
        return attn

    def between_steps(self):
        if not self.attention_store:
            self.attention_store = self.step_store
        else:
            for key, items in self.attention_store.items():
                for n in range(len(items)):
                    items[n] += self.step_store[key][n]
        self.step_store = self.empty()

    def replace_cross(self, base, own):
        if self.kind == "replace":
            out = torch.einsum("hpw,bwn->bhpn", base, self.mapper)
        else:
            out = base[:, :, self.mapper].permute(2, 0, 1, 3) * self.alphas + own * (1 - self.alphas)
        return out if self.eq is None else out[None] * self.eq[:, None, None, :]

    def forward(self, attn, is_cross, place):
        if attn.shape[1] <= 32 ** 2:
            self.step_store[f"{place}_{'cross' if is_cross else 'self'}"].append(attn)
        if is_cross or self.self_window[0] <= self.cur_step < self.self_window[1]:
            h = attn.shape[0] // 2
            attn = attn.reshape(2, h, *attn.shape[1:])  # a view: the stored tensor sees the edit
            base, own = attn[0], attn[1:]
            if is_cross:
                a = self.cross_alpha[self.cur_step]
                attn[1:] = self.replace_cross(base, own) * a + (1 - a) * own
            else:
                attn[1:] = base[None].expand(own.shape[0], *base.shape) if own.shape[2] <= 16 ** 2 else own
            attn = attn.reshape(2 * h, *attn.shape[2:])
        return attn

    def step_callback(self, x_t):
        if self.blend is None:
            return x_t
        n = self.res[0] * self.res[1]
        items = [m for key in ("down_cross", "up_cross") for m in self.attention_store[key] if m.shape[1] == n]
        maps = torch.cat([m.reshape(2, -1, 1, *self.res, L) for m in items], dim=1)
        maps = (maps * self.blend.to(maps)).sum(-1).mean(1)
        mask = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
        mask = F.interpolate(mask, size=x_t.shape[2:])
        mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
        mask = mask.gt(self.threshold)
        mask = (mask[:1] + mask[1:]).float()
        return x_t[:1] + mask * (x_t - x_t[:1])


class Processor:
    """A diffusers attention processor that computes as AttnProcessor and hands the probabilities to the controller
    (the reference's patched CrossAttention.forward)."""

    def __init__(self, controller, place):
        self.controller, self.place = controller, place

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k, v = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
        probs = self.controller(attn.get_attention_scores(q, k, None), is_cross, self.place)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def register(unet, controller) -> None:
    """register_attention_control: every attention of the UNet (attn1 and attn2) counts as one layer."""
    procs = {name: Processor(controller, name.split("_")[0]) for name in unet.attn_processors}
    controller.num_att_layers = len(procs)
    unet.set_attn_processor(procs)  # (empties the dict)


# --------------------------------------------------------------------------------------------- the reverse loop
def embed(ref, tokenizer, prompts):
    ids = tokenizer(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids
    return ref.text_encoder(ids)[0]


@torch.no_grad()
def reverse(ref, tokenizer, x_T, zs, steps, prompts, scales, controller):
    """inversion_reverse_process for the rows `prompts` from x_T with the noise maps zs (the last len(zs) steps)."""
    sched = DDIMScheduler(**hub._clean(ref.scheduler_config))
    sched.set_timesteps(steps)
    cond, uncond = embed(ref, tokenizer, prompts), embed(ref, tokenizer, [""] * len(prompts))
    s = torch.tensor(scales, dtype=torch.float32).view(-1, 1, 1, 1)
    x = x_T.expand(len(prompts), -1, -1, -1)
    for t, z in zip(sched.timesteps[-len(zs):], zs):
        out_u = ref.unet(x, t, encoder_hidden_states=uncond).sample
        out_c = ref.unet(x, t, encoder_hidden_states=cond).sample
        eps = out_u + s * (out_c - out_u)
        x = sched.step(eps, t, x, eta=1.0, variance_noise=z[None].expand_as(x)).prev_sample
        if controller is not None:
            x = controller.step_callback(x)
    return x
