"""The compiled per-step network call of DiffusionPipeline.sample (compile=...): the same samples as eager for the
same seeds, one graph per canvas size and batch, and conditioning that follows the weights. On a CPU the backends
are aot_eager and a counting one; Inductor with CUDA graphs (reduce-overhead) is tested in tests/test_gpu.py."""

import pytest
import torch

from mrdiff.diffusion.samplers import SamplingSettings
from mrdiff.diffusion.schedule import NoiseSchedule
from mrdiff.nn.unet import UNet
from mrdiff.pipeline import DiffusionPipeline

SAMPLERS = [SamplingSettings("ddim", 5), SamplingSettings("ddim", 4, eta=1.0), SamplingSettings("dpmpp_2m", 4)]


def tiny_unet() -> UNet:
    """A multi-resolution U-Net (coordinates and SAFA at both levels), off its zero-initialised output layer."""
    torch.manual_seed(0)
    net = UNet(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), head_channels=16,
               dropout=0.0, coord_frequencies=2, safa_levels=(0, 1), scale_ref=16.0)
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo caches graphs on the code object: start and end every test with none."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pipelines(backend) -> tuple[DiffusionPipeline, DiffusionPipeline]:
    net, schedule = tiny_unet(), NoiseSchedule(num_timesteps=100)
    return (DiffusionPipeline(net, schedule, train_resolution=16),
            DiffusionPipeline(net, schedule, train_resolution=16, compile="default", compile_backend=backend))


@pytest.mark.parametrize("sampling", SAMPLERS, ids=str)
def test_compiled_sampling_equals_eager_for_the_same_seeds(sampling, one_thread):
    eager, compiled = pipelines("aot_eager")
    for height, width in ((16, 16), (24, 16)):
        a = eager.sample([3, 4], height, width, sampling=sampling)
        b = compiled.sample([3, 4], height, width, sampling=sampling)
        assert torch.allclose(a, b, rtol=0, atol=1e-6), float((a - b).abs().max())


def test_one_graph_per_canvas_and_batch_reused_over_steps_calls_and_samplers(one_thread):
    graphs = []

    def counting(gm, example_inputs):
        graphs.append([tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)])
        return gm.forward

    eager, compiled = pipelines(counting)
    for sampling in SAMPLERS:  # three samplers, 13 network calls at one canvas and batch: one graph
        assert torch.equal(compiled.sample([0, 1], 16, sampling=sampling), eager.sample([0, 1], 16, sampling=sampling))
    assert len(graphs) == 1
    compiled.sample([5, 6], 16, sampling=SAMPLERS[0])  # other seeds: the same graph
    assert len(graphs) == 1
    compiled.sample([0, 1, 2], 16, sampling=SAMPLERS[0])  # another batch
    compiled.sample([0, 1], 24, 16, sampling=SAMPLERS[0])  # another canvas
    assert len(graphs) == 3
    # x [B, C, H, W] and t [B] are the graph's inputs: t is a tensor, so a new timestep is no new graph
    assert all((2, 3, 16, 16) in inputs and (2,) in inputs for inputs in graphs[:1])


def test_compiled_sampling_reads_the_current_weights():
    """SAFA's mixed kernels are copied into the captured conditioning on every call: after an in-place change of
    the weights (an optimizer step, an EMA swap), the compiled samples still equal the eager ones."""
    eager, compiled = pipelines("aot_eager")
    sampling = SamplingSettings("ddim", 3)
    before = compiled.sample([0], 16, sampling=sampling)
    with torch.no_grad():
        for p in compiled.net.parameters():
            p.mul_(1.5)
    after = compiled.sample([0], 16, sampling=sampling)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, eager.sample([0], 16, sampling=sampling), rtol=0, atol=1e-6)


def test_compile_none_is_the_eager_path(monkeypatch):
    eager, _ = pipelines("aot_eager")
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compile='none' compiled"))
    assert eager.sample([0], 16, sampling=SamplingSettings("ddim", 2)).shape == (1, 3, 16, 16)
