"""The flow Euler sampler against diffusers' FlowMatchEulerDiscreteScheduler: sigmas, timesteps, step and
scale_noise bit for bit (SD3's static shift; FLUX.1's sigmas and dynamic shift as FluxPipeline sets them); the inverse
step undoes the step."""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift, retrieve_timesteps

from minledits.flowmatch import FlowEuler, flow_config, image_tokens

# As shipped (scheduler/scheduler_config.json of stable-diffusion-3-medium-diffusers).
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
       "num_train_timesteps": 1000, "shift": 3.0}
# As shipped (scheduler/scheduler_config.json of black-forest-labs/FLUX.1-dev and FLUX.1-schnell).
FLUX_DEV = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
            "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
            "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
FLUX_SCHNELL = {**FLUX_DEV, "shift": 1.0, "use_dynamic_shifting": False}
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


@pytest.mark.parametrize("key,value", [("invert_sigmas", True),
                                       ("shift_terminal", 0.1), ("use_karras_sigmas", True),
                                       ("stochastic_sampling", True), ("shift", 0), ("shift", "3"),
                                       ("num_train_timesteps", 0)])
def test_bad_config_refused(key, value):
    with pytest.raises(ValueError) as err:
        FlowEuler({**SD3, key: value}, 28)
    one_line(err, key)


def flux_reference(config: dict, N: int, tokens: int) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler as FluxPipeline.__call__ sets it for N steps and a latent of `tokens` packed tokens."""
    ref = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in config.items() if not k.startswith("_")})
    mu = calculate_shift(tokens, ref.config.get("base_image_seq_len", 256), ref.config.get("max_image_seq_len", 4096),
                         ref.config.get("base_shift", 0.5), ref.config.get("max_shift", 1.15))
    retrieve_timesteps(ref, N, "cpu", sigmas=np.linspace(1.0, 1 / N, N), mu=mu)
    return ref


def assert_same_schedule(ours: FlowEuler, ref: FlowMatchEulerDiscreteScheduler, N: int):
    assert ours.sigmas.dtype == ours.timesteps.dtype == torch.float32
    assert ours.sigmas.shape == (N + 1,) and ours.timesteps.shape == (N,)
    assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps)  # bit for bit
    assert torch.equal(ours.inv_timesteps[:-1], ref.timesteps[1:]) and ours.inv_timesteps[-1] == 0


# (latent h, w) -> tokens 1, 4 (the tiny 32 px), 256, 1024, 4096 (1024 px), 1536 and 1155 (non-square)
LATENTS = [(2, 2), (4, 4), (32, 32), (64, 64), (128, 128), (64, 96), (66, 140)]
FLUX_STEPS = [1, 2, 3, 4, 28, 50, 333]


@pytest.mark.parametrize("N", FLUX_STEPS)
@pytest.mark.parametrize("hw", LATENTS, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_flux_dev_dynamic_shift_matches(hw, N):
    tokens = image_tokens(*hw)
    assert_same_schedule(FlowEuler(FLUX_DEV, N, tokens), flux_reference(FLUX_DEV, N, tokens), N)


@pytest.mark.parametrize("N", FLUX_STEPS)
def test_flux_schnell_uniform_sigmas_match(N):
    """schnell: no dynamic shift (shift 1), the pipeline's linspace(1, 1/N, N) as they are: uniform_sigmas on."""
    ours = FlowEuler({**FLUX_SCHNELL, "uniform_sigmas": True}, N, tokens=None)
    assert_same_schedule(ours, flux_reference(FLUX_SCHNELL, N, 4096), N)
    assert torch.equal(ours.sigmas[:-1], torch.from_numpy(np.linspace(1.0, 1 / N, N)).float())


@pytest.mark.parametrize("N", [1, 2, 7, 28])
@pytest.mark.parametrize("variant", ["linear", "uniform-static", "grid-dynamic", "grid-linear", "shifts"])
def test_other_flow_variants_match(variant, N):
    """The linear time shift, the uniform sigmas under a static shift, the training grid under the dynamic shift
    (set_timesteps(N, mu=mu)), other base/max lines: each against the scheduler."""
    config, tokens = {
        "linear": ({**FLUX_DEV, "time_shift_type": "linear"}, 1536),
        "uniform-static": ({**SD3, "uniform_sigmas": True}, None),
        "grid-dynamic": ({**FLUX_DEV, "uniform_sigmas": False}, 1024),
        "grid-linear": ({**FLUX_DEV, "uniform_sigmas": False, "time_shift_type": "linear"}, 1024),
        "shifts": ({**FLUX_DEV, "base_shift": 0.25, "max_shift": 2.0, "base_image_seq_len": 64,
                    "max_image_seq_len": 1024}, 3000)}[variant]
    ref = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in config.items() if k != "uniform_sigmas"})
    mu = tokens and calculate_shift(tokens, config["base_image_seq_len"], config["max_image_seq_len"],
                                    config["base_shift"], config["max_shift"])
    if flow_config(config)["uniform_sigmas"]:
        ref.set_timesteps(sigmas=np.linspace(1.0, 1 / N, N), mu=mu)
    else:
        ref.set_timesteps(N, mu=mu)
    assert_same_schedule(FlowEuler(config, N, tokens), ref, N)


@pytest.mark.parametrize("N", [1, 28])
def test_static_shift_ignores_tokens(N):
    """Without the dynamic shift tokens change nothing, and SD3's config keeps the training grid."""
    assert not flow_config(SD3)["uniform_sigmas"] and flow_config(FLUX_DEV)["uniform_sigmas"]
    for tokens in (None, 1, 4096):
        assert_same_schedule(FlowEuler(SD3, N, tokens), reference(SD3, N), N)


@pytest.mark.parametrize("hw", [(2, 2), (4, 6), (64, 64), (128, 96)])
def test_image_tokens_are_the_pipelines(hw):
    h, w = hw
    assert image_tokens(h, w) == FluxPipeline._pack_latents(torch.zeros(1, 16, h, w), 1, 16, h, w).shape[1]


@pytest.mark.parametrize("tokens", [None, 0, 2.0, True, "4096"])
def test_dynamic_shift_needs_tokens(tokens):
    with pytest.raises(ValueError) as err:
        FlowEuler(FLUX_DEV, 28, tokens)
    one_line(err, "dynamic shift", "image_tokens")


@pytest.mark.parametrize("key,value", [("time_shift_type", "cubic"), ("base_image_seq_len", 4096),
                                       ("max_image_seq_len", 256.0), ("base_shift", None), ("max_shift", "1.15"),
                                       ("use_dynamic_shifting", "yes"), ("uniform_sigmas", 1)])
def test_bad_dynamic_config_refused(key, value):
    with pytest.raises(ValueError) as err:
        FlowEuler({**FLUX_DEV, key: value}, 28, 1024)
    one_line(err, key)
