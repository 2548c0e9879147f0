"""The flow Euler sampler against diffusers' FlowMatchEulerDiscreteScheduler: sigmas, timesteps, step and
scale_noise bit for bit; the inverse step undoes the step."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from minledits.flowmatch import FlowEuler

# As shipped (scheduler/scheduler_config.json of stable-diffusion-3-medium-diffusers).
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
       "num_train_timesteps": 1000, "shift": 3.0}
CONFIGS = {"sd3": SD3, "shift1": {"num_train_timesteps": 1000}, "shift1.5": {**SD3, "shift": 1.5},
           "T500": {"num_train_timesteps": 500, "shift": 3.0}}
STEPS = [1, 2, 7, 28, 50, 333, 500]


def reference(config: dict, N: int) -> FlowMatchEulerDiscreteScheduler:
    ref = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in config.items() if not k.startswith("_")})
    ref.set_timesteps(N)
    return ref


def one_line(err, *fragments):
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 300 and all(f in msg for f in fragments), msg


@pytest.mark.parametrize("N", STEPS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sigmas_and_timesteps_match(name, N):
    ours, ref = FlowEuler(CONFIGS[name], N), reference(CONFIGS[name], N)
    assert ours.sigmas.dtype == ours.timesteps.dtype == torch.float32
    assert ours.sigmas.shape == (N + 1,) and ours.timesteps.shape == (N,)
    assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps)  # bit for bit
    assert torch.equal(ours.inv_timesteps[:-1], ref.timesteps[1:]) and ours.inv_timesteps[-1] == 0


# (latent dtype, velocity dtype): the last pair shows the float32 upcast of x (a float64 x is rounded first).
DTYPES = [(torch.float32,) * 2, (torch.float16,) * 2, (torch.bfloat16,) * 2, (torch.float32, torch.float16),
          (torch.float64, torch.float32)]


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("name", ["sd3", "shift1"])
def test_step_matches(name, dtypes):
    N, (x_dtype, v_dtype) = 7, dtypes
    ours, ref = FlowEuler(CONFIGS[name], N), reference(CONFIGS[name], N)
    g = torch.Generator().manual_seed(0)
    for k, t in enumerate(ref.timesteps):
        x, v = torch.randn(2, 16, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 16, 8, 8, generator=g)
        x, v = x.to(x_dtype), v.to(v_dtype)
        expected, got = ref.step(v, t, x).prev_sample, ours.step(k, x, v)
        assert got.dtype == expected.dtype == v_dtype and torch.equal(got, expected), (k, (got - expected).abs().max())


@pytest.mark.parametrize("name", ["sd3", "shift1"])
def test_unstep_undoes_step(name):
    N = 28
    ours = FlowEuler(CONFIGS[name], N)
    g = torch.Generator().manual_seed(1)
    for k in range(N):
        x, v = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
        back = ours.unstep(k, ours.step(k, x, v), v)
        # dsigma v is the same float32 product both ways (exact negation); the sum and the difference each round
        # by at most half an ulp of |x| + |dsigma v|: |back - x| <= 2^-23 (|x| + |dsigma v|) (measured: 2 ulps of 1)
        bound = 2.0**-23 * (x.abs() + ((ours.sigmas[k + 1] - ours.sigmas[k]) * v).abs())
        assert ((back - x).abs() <= bound).all(), (k, (back - x).abs().max())
        assert not torch.equal(ours.step(k, x, v), x)  # the step moves


@pytest.mark.parametrize("name", ["sd3", "shift1"])
def test_unstep_is_the_forward_euler_step(name):
    ours, N = FlowEuler(CONFIGS[name], 4), 4
    x, v = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    for k in range(N):
        expected = x + (ours.sigmas[k] - ours.sigmas[k + 1]) * v
        assert torch.equal(ours.unstep(k, x, v), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["sd3", "shift1"])
def test_scale_noise_matches(name, dtype):
    N = 28
    ours, ref = FlowEuler(CONFIGS[name], N), reference(CONFIGS[name], N)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g).to(dtype), torch.randn(2, 16, 8, 8, generator=g).to(dtype)
    for k in (0, 1, 13, N - 1):
        expected = ref.scale_noise(x0, ref.timesteps[k:k + 1], noise)
        got = ours.scale_noise(k, x0, noise)
        assert got.dtype == expected.dtype and torch.equal(got, expected), k


@pytest.mark.parametrize("N", [0, -1, 1001, 2.0, True, None])
def test_bad_steps_refused(N):
    with pytest.raises(ValueError) as err:
        FlowEuler(SD3, N)
    one_line(err, "number of flow steps", "1..1000")


@pytest.mark.parametrize("key,value", [("use_dynamic_shifting", True), ("invert_sigmas", True),
                                       ("shift_terminal", 0.1), ("use_karras_sigmas", True),
                                       ("stochastic_sampling", True), ("shift", 0), ("shift", "3"),
                                       ("num_train_timesteps", 0)])
def test_bad_config_refused(key, value):
    with pytest.raises(ValueError) as err:
        FlowEuler({**SD3, key: value}, 28)
    one_line(err, key)
