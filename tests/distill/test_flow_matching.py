"""Flow-matching teacher trajectories (SD3, Flux) against the diffusers pipelines' own sampling.

The pipeline is run with a hook on its transformer that records what the transformer receives (latents, timestep)
and returns; the sampler must reproduce, from the first latents and the recorded velocities, every later input of
the pipeline exactly, and hand the transformer the same timesteps.  An off-by-one sigma, a wrong sign, a wrong shift
or the wrong timestep units all change those inputs.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny_models import make_tiny_flux_pipeline, make_tiny_sd3_pipeline

import diffusers_qalora as dq
from diffusers_qalora.distill.conditioning import pack_latents, unpack_latents
from diffusers_qalora.distill.pipelines import sample_shape
from diffusers_qalora.tuners.qalora.sampling import FlowMatchEulerSampler, latent_size, trajectory_sampler


def _record_pipeline(pipe, steps: int, size: int | None, seed: int = 0):
    """Run ``pipe`` (no guidance, so the transformer's output is the velocity the scheduler steps with) and return
    the transformer's inputs and outputs at each step and the final latents."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((kwargs["hidden_states"].clone(), kwargs["timestep"].clone(), output[0].clone()))

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        kwargs = {"height": size, "width": size} if size else {}
        final = pipe(
            "a red square",
            num_inference_steps=steps,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
            max_sequence_length=8,
            **kwargs,
        ).images
    finally:
        handle.remove()
    return calls, final


CASES = {
    # SD3: static shift 3.0, timesteps 0..1000, latents (B, 16, 8, 8)
    "sd3": (make_tiny_sd3_pipeline, None, False),
    # Flux: resolution-dependent shift (mu from 36 packed tokens), timesteps / 1000, packed latents
    "flux": (make_tiny_flux_pipeline, 24, True),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_sampler_reproduces_the_pipelines_trajectory(kind):
    build, size, packed = CASES[kind]
    pipe = build()
    steps = 4
    calls, final = _record_pipeline(pipe, steps, size)
    assert len(calls) == steps
    sampler = trajectory_sampler(pipe, steps, height=size, width=size)
    assert isinstance(sampler, FlowMatchEulerSampler) and len(sampler) == steps
    rows, columns = latent_size(pipe, size, size)
    assert sample_shape(pipe, size) == (
        pipe.transformer.config.in_channels // (4 if packed else 1),
        rows,
        columns,
    )

    def unpacked(t):
        return unpack_latents(t, rows, columns) if packed else t

    x = unpacked(calls[0][0])
    assert tuple(x.shape[1:]) == sample_shape(pipe, size)
    for i, (hidden, timestep, velocity) in enumerate(calls):
        # the denoiser's timestep, in its own units (Flux: t / 1000), bit for bit
        assert torch.equal(timestep, sampler.model_timesteps[i].expand_as(timestep)), (i, timestep)
        torch.testing.assert_close(x, unpacked(hidden), rtol=0, atol=0, msg=f"latents entering step {i}")
        x = sampler.step(unpacked(velocity), i, x)
    torch.testing.assert_close(x, unpacked(final), rtol=0, atol=0)
    if packed:
        assert torch.equal(pack_latents(x), final)
        assert float(sampler.model_timesteps.min()) > 0.0 and float(sampler.model_timesteps.max()) <= 1.0

    # The check has teeth: the neighbouring sigma (off by one) or the opposite sign give other latents.
    v, x0 = unpacked(calls[1][2]), unpacked(calls[1][0])
    s = sampler.sigmas
    for wrong in (x0 + (s[3] - s[2]) * v, x0 - (s[2] - s[1]) * v):
        assert not torch.allclose(wrong, unpacked(calls[2][0]))


def test_flux_schedule_depends_on_the_image_size():
    pipe = make_tiny_flux_pipeline()
    small = trajectory_sampler(pipe, 4, height=16, width=16)
    large = trajectory_sampler(pipe, 4, height=64, width=64)
    assert not torch.equal(small.sigmas, large.sigmas)  # mu grows with the number of image tokens
    assert float(small.sigmas[0]) == 1.0 and float(small.sigmas[-1]) == 0.0


def test_stochastic_sampling_matches_the_scheduler_step():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    sampler = trajectory_sampler(scheduler, 5)
    reference = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    reference.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 4, generator=g)
    y = x.clone()
    for i, t in enumerate(reference.timesteps):
        v = torch.randn(2, 4, 4, 4, generator=g)
        x = reference.step(v, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        y = sampler.step(v, i, y, generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_timestep_table_in_the_denoisers_units():
    sd3, flux = make_tiny_sd3_pipeline(), make_tiny_flux_pipeline()
    # SD3: the scheduler alone or the pipeline, the same table, in 0..1000 as the transformer sees it
    table = dq.timestep_table(sd3.scheduler, 5)
    assert table == dq.timestep_table(sd3, 5)
    assert table[-1] == 1000.0 and len(table) == 5
    # Flux: the pipeline's sigmas (shifted for the image size), divided by 1000 as FluxPipeline does
    flux_table = dq.timestep_table(flux, 5, height=16, width=16)
    sampler = trajectory_sampler(flux, 5, height=16, width=16)
    assert flux_table == sorted(float(t) for t in sampler.model_timesteps)
    assert flux_table[-1] == 1.0 and flux_table[0] > 0.0
    with pytest.raises(ValueError, match="pass the pipeline"):
        dq.timestep_table(flux.scheduler, 5)  # dynamic shifting needs the image size
    with pytest.raises(ValueError, match="eta"):
        trajectory_sampler(sd3, 5, eta=0.5)
