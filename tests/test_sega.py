"""SEGA as a pure function: properties and bad parameters (the oracle comparison is in test_edit.py)."""
import math

import pytest
import torch

from minledits.sega import Concept, SegaParams, sega


def estimates(C=2, seed=0, shape=(1, 4, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn((C, *shape), generator=g)


def params(*concepts, **kw):
    return SegaParams.of(list(concepts), **kw)


def test_reverse_flips_the_guidance():
    eps_u, eps_c = estimates(C=1)
    m = torch.zeros_like(eps_u)
    add = sega(5, eps_u, eps_c, m, params(Concept("a", warmup=0)))
    remove = sega(5, eps_u, eps_c, m, params(Concept("a", warmup=0, reverse=True)))
    assert torch.equal(remove.g, -add.g) and torch.equal(remove.acts, add.acts)
    assert torch.equal(remove.E, -add.E) and add.E.abs().sum() > 0


@pytest.mark.parametrize("lam", [0.5, 0.9, 0.95])
def test_mask_keeps_one_minus_threshold(lam):
    eps_u, eps_c = estimates(C=1, shape=(1, 4, 32, 32))
    out = sega(0, eps_u, eps_c, torch.zeros_like(eps_u), params(Concept("a", threshold=lam)))
    kept = out.acts.float().mean(dim=(-1, -2))  # per batch item and channel
    assert torch.allclose(kept, torch.full_like(kept, 1 - lam), atol=1.5 / 1024)  # up to one entry of 1024 + ties
    assert torch.equal(out.q, torch.quantile(out.g.abs().flatten(-2), lam, dim=-1))


def test_warmup_cooldown_and_momentum():
    eps_u, eps_c = estimates(C=2)
    p = params(Concept("a", warmup=0, weight=2.0), Concept("b", warmup=3, cooldown=5, weight=1.0),
               momentum_scale=0.5, momentum_beta=0.6)
    m = torch.zeros_like(eps_u)
    out = sega(1, eps_u, eps_c, m, p)  # only "a" is warm: its masked guidance, normalised weight 1, no momentum
    g_hat = torch.where(out.acts, out.g, 0)
    assert torch.allclose(out.E, g_hat[0])
    assert torch.allclose(out.G, 2 * g_hat[0] + 1 * g_hat[1])
    assert torch.allclose(out.m, 0.4 * out.G)  # m <- 0.6 * 0 + 0.4 G
    out3 = sega(3, eps_u, eps_c, out.m, p)  # both warm: E = G, with momentum
    assert torch.allclose(out3.E, out3.G) and torch.allclose(out3.G, 2 * g_hat[0] + g_hat[1] + 0.5 * out.m)
    out5 = sega(5, eps_u, eps_c, out3.m, p)  # "b" cooled down: no mask, no weight
    assert not out5.acts[1].any() and torch.allclose(out5.G, 2 * g_hat[0] + 0.5 * out3.m)
    none_warm = sega(0, eps_u, eps_c, m, params(Concept("a", warmup=1), Concept("b", warmup=2)))
    assert torch.equal(none_warm.E, torch.zeros_like(eps_u)) and none_warm.m.abs().sum() > 0


def test_scale_zero_gives_no_guidance():
    eps_u, eps_c = estimates(C=2)
    out = sega(9, eps_u, eps_c, torch.zeros_like(eps_u), params(Concept("a", scale=0), Concept("b", scale=0)))
    assert torch.equal(out.E, torch.zeros_like(eps_u))


@pytest.mark.parametrize("bad", [dict(threshold=1.0), dict(threshold=-0.1), dict(scale=math.inf), dict(scale=math.nan),
                                 dict(weight=-1.0), dict(warmup=-1)])
def test_bad_concept_parameters(bad):
    with pytest.raises(ValueError):
        Concept("a", **bad)


@pytest.mark.parametrize("spec", ["a:scale", "a:foo=1", "a:scale=x", ":scale=1", "-", "a:threshold=1",
                                  "hat:scale=1,scale=2", "hat:warmup=1, warmup =1"])
def test_bad_concept_specs(spec):
    with pytest.raises(ValueError) as e:
        Concept.parse(spec)
    assert "\n" not in str(e.value)


def test_a_concept_option_given_twice_is_named():
    with pytest.raises(ValueError, match="concept option scale given twice in 'hat:scale=1,scale=2': give it once"):
        Concept.parse("hat:scale=1,scale=2")


def test_concept_specs_and_dicts():
    assert Concept.parse("-beard") == Concept("beard", reverse=True)
    assert Concept.parse("smile:scale=6,threshold=0.9,warmup=2,cooldown=40,weight=1") == \
        Concept("smile", scale=6, threshold=0.9, warmup=2, cooldown=40, weight=1)
    assert Concept.of({"prompt": "hat", "scale": 3}) == Concept("hat", scale=3)
    with pytest.raises(ValueError, match="unknown concept option"):
        Concept.of({"prompt": "hat", "strength": 3})
