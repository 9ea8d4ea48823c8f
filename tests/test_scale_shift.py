"""Scale-shift adjustment (block-caching.txt Sec. 3.4): adapters, their training by
distillation from the uncached model, checkpoints and their compatibility checks.

Tiny random-weight models, a 4-step DDIM sampler over a batch of 2, hand-made masks.
"""

import copy
import json

import numpy as np
import pytest
import torch

import fxcache
from fxcache.analyze.units import temb_module
from fxcache.artefacts import Profile
from fxcache.calibrate.scale_shift import ScaleShift, evaluate_scale_shift, train_scale_shift
from fxcache.errors import CheckpointError, UnsupportedModelError
from fxcache.testing import tiny

STEPS, BATCH = 4, 2
HELD_OUT = [100, 101]  # never trained on
UNITS = {
    # down_blocks.0 has two outputs (its skip tensor and its downsampled hidden state)
    "unet2d": ["down_blocks.0", "down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.1"],
    "dit": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1", "transformer_blocks.2.ff"],
}


def _mask(family):
    units = UNITS[family]
    n = len(units)
    # step 0 computes all; steps 1-2 reuse all; step 3 refreshes the first unit only
    return fxcache.Mask([[True] * n, [False] * n, [False] * n, [True] + [False] * (n - 1)], units)


def _sampler(T):
    from diffusers import DDIMScheduler

    def run(model, seed):
        g = torch.Generator().manual_seed(seed)
        if T.family == "dit":
            x = torch.randn(BATCH, 4, 8, 8, generator=g)
            labels = torch.arange(BATCH) % 10
        else:
            x = torch.randn(BATCH, 3, 16, 16, generator=g)
        sched = DDIMScheduler(num_train_timesteps=1000)
        sched.set_timesteps(STEPS)
        for t in sched.timesteps:
            tt = t.expand(BATCH)
            out = model(x, timestep=tt, class_labels=labels) if T.family == "dit" else model(x, tt)
            x = sched.step(T.output(out), t, x).prev_sample
        return x

    return run


class Trained:
    """One training run per family, shared by the tests that inspect its result."""

    def __init__(self, family, tmp):
        self.T = tiny(family)
        self.mask = _mask(family)
        self.sampler = _sampler(self.T)
        model = self.T.model
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.flags = {n: (i % 3 != 0) for i, (n, _) in enumerate(model.named_parameters())}  # a mixed pattern
        for n, p in model.named_parameters():
            p.requires_grad_(self.flags[n])
        with torch.no_grad():
            self.uncached = [self.sampler(model, s) for s in HELD_OUT]
        self.untrained = evaluate_scale_shift(model, self.mask, self.sampler, None, seeds=HELD_OUT)
        self.plot, self.ckpt = tmp / f"{family}_loss.png", tmp / f"{family}.safetensors"
        self.ss = train_scale_shift(
            model, self.mask, self.sampler, iters=30, lr=3e-3, seeds=4, progress=False,
            loss_plot=self.plot, checkpoint=self.ckpt,
        )
        self.trained = evaluate_scale_shift(model, self.mask, self.sampler, self.ss, seeds=HELD_OUT)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale_shift")
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = Trained(family, tmp)
        return cache[family]

    return get


# ------------------------------------------------------------------ the adapters
def test_untrained_adapter_is_exactly_the_identity():
    g = torch.Generator().manual_seed(0)
    ss = ScaleShift(
        {"a.b": [((2, 16, 8, 8), torch.float32), ((2, 16, 4, 4), torch.float32)], "c": [((2, 5, 12), torch.float16)]},
        32, temb_module="time_embedding", model_class="M",
    )
    temb = torch.randn(2, 32, generator=g)
    for unit, k, shape, dtype in [("a.b", 0, (2, 16, 8, 8), torch.float32), ("a.b", 1, (2, 16, 4, 4), torch.float32),
                                  ("c", 0, (2, 5, 12), torch.float16)]:
        x = torch.randn(shape, generator=g).to(dtype)
        x[0, 0, 0] = -0.0
        y = ss.apply(unit, k, x, temb)
        assert y.dtype == dtype and torch.equal(y, x)
    assert ss.units == ("a.b", "c")
    assert ss.channel_dim("a.b", 0) == 1 and ss.channel_dim("c") == -1
    assert ss.key("a.b", 1) == "a-b:1" and "." not in ss.key("a.b", 1)
    assert ss.linears[ss.key("a.b", 1)].out_features == 32 and ss.linears["c:0"].out_features == 24
    assert ss.meta["temb_dim"] == 32 and ss.meta["units"] == ["a.b", "c"]
    # nn.Module.apply(fn) still works
    seen = []
    ss.apply(lambda m: seen.append(type(m).__name__))
    assert "Linear" in seen


def test_trained_adapter_is_a_per_sample_per_channel_scale_shift():
    ss = ScaleShift({"u": [((2, 3, 4, 4), torch.float32)]}, 5, temb_module="t")
    lin = ss.linears[ss.key("u")]
    with torch.no_grad():
        lin.weight.normal_()
        lin.bias.normal_()
    x, temb = torch.randn(2, 3, 4, 4), torch.randn(2, 5)
    scale, shift = lin(temb).chunk(2, dim=1)
    torch.testing.assert_close(ss.apply("u", 0, x, temb), x * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


@pytest.mark.parametrize("family", ["unet2d", "dit"])
def test_student_without_adapters_is_the_cached_model(family):
    # The training student is the plan's own step graphs (plus probes for the loss): it
    # gives what fxcache.compile gives, bit for bit; untrained adapters change nothing either.
    T = tiny(family)
    mask, sampler = _mask(family), _sampler(T)
    cm = fxcache.compile(T.model, mask, backend=None)
    with torch.no_grad():
        compiled = sampler(cm, 7)
    plain = evaluate_scale_shift(T.model, mask, sampler, None, seeds=[7])
    assert torch.equal(plain.outputs[0], compiled)
    # untrained adapters inside the unrolled student: bit for bit the plain cache reads
    shapes = {u.name: u.out_shapes for u in _unit_shapes(T) if u.name in mask.units}
    zero = ScaleShift(shapes, 64 if family == "unet2d" else 16, temb_module=temb_module(T.model),
                      model_class=type(T.model).__name__, mask=mask)
    adapted = evaluate_scale_shift(T.model, mask, sampler, zero, seeds=[7])
    assert torch.equal(adapted.outputs[0], plain.outputs[0])
    with torch.no_grad():
        full = sampler(T.model, 7)
    assert not torch.allclose(plain.outputs[0], full)  # the mask does reuse something


# ---------------------------------------------------------------------- training
@pytest.mark.parametrize("family", ["unet2d", "dit"])
def test_training_lowers_the_loss_and_the_final_sample_error(family, trained):
    r = trained(family)
    first, last = np.mean(r.ss.losses[:5]), np.mean(r.ss.losses[-5:])
    assert last < 0.8 * first, r.ss.losses
    # held-out seeds: the summed distillation loss drops ...
    assert r.trained.loss < 0.8 * r.untrained.loss, (r.untrained.loss, r.trained.loss)
    # ... and the final sample moves towards the uncached model's
    err = lambda run: sum(float((o - u).pow(2).mean()) for o, u in zip(run.outputs, r.uncached))  # noqa: E731
    assert err(r.trained) < 0.95 * err(r.untrained), (err(r.untrained), err(r.trained))
    # every unit-step that reads a cache is a training pair; units in the mask that
    # are reused somewhere all got adapters
    assert set(u for u, _ in r.untrained.pairs) == set(UNITS[family]) == set(r.ss.units)
    assert r.ss.meta["train"]["iters"] == 30 and r.ss.meta["train"]["last_loss"] == r.ss.losses[-1]


@pytest.mark.parametrize("family", ["unet2d", "dit"])
def test_each_adapter_lowers_its_own_error(family, trained):
    # Per-unit errors are not comparable between the untrained and the trained student:
    # upstream adapters move a unit's inputs towards the uncached model's, away from
    # what its cache saw, so a downstream unit's error can rise while the total falls.
    # Compare instead, on the same trajectory, each trained adapter against the
    # identity: zero one unit's linears and read its error at step 1 (whose inputs
    # depend only on step 0, computed in full, and on the units upstream, unchanged).
    r = trained(family)
    for unit in r.ss.units:
        ablated = copy.deepcopy(r.ss)
        for k in range(ablated.num_outputs(unit)):
            torch.nn.init.zeros_(ablated.linears[ablated.key(unit, k)].weight)
            torch.nn.init.zeros_(ablated.linears[ablated.key(unit, k)].bias)
        run = evaluate_scale_shift(r.T.model, r.mask, r.sampler, ablated, seeds=HELD_OUT)
        # measured: the trained adapter leaves 29-61 % of the identity's error
        assert r.trained.pairs[(unit, 1)] < 0.8 * run.pairs[(unit, 1)], unit


@pytest.mark.parametrize("family", ["unet2d", "dit"])
def test_base_model_unchanged_and_requires_grad_restored(family, trained):
    r = trained(family)
    for n, p in r.T.model.named_parameters():
        assert torch.equal(p, r.before[n]), n
        assert p.requires_grad == r.flags[n], n
        assert p.grad is None, n
    assert not any(p.requires_grad for p in r.ss.parameters())


def test_loss_plot_and_checkpoint_written(trained):
    r = trained("dit")
    assert r.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = ScaleShift.load(r.ckpt)
    for k, v in r.ss.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


# -------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("family", ["unet2d", "dit"])
def test_save_load_round_trip(family, trained, tmp_path):
    r = trained(family)
    path = r.ss.save(tmp_path / "sub" / "ss.safetensors")
    loaded = ScaleShift.load(path)
    assert loaded.units == r.ss.units and loaded.temb_module == r.ss.temb_module
    assert loaded.meta == json.loads(json.dumps(r.ss.meta))
    assert loaded.state_dict().keys() == r.ss.state_dict().keys()
    for k, v in r.ss.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    g = torch.Generator().manual_seed(1)
    temb = torch.randn(BATCH, r.ss.temb_dim, generator=g)
    for unit in r.ss.units:
        for k, (shape, _) in enumerate(r.ss.meta["out_shapes"][unit]):
            x = torch.randn(shape, generator=g)
            assert torch.equal(loaded.apply(unit, k, x, temb), r.ss.apply(unit, k, x, temb))
    # the loaded adapters behave the same in the unrolled student
    again = evaluate_scale_shift(r.T.model, r.mask, r.sampler, loaded, seeds=HELD_OUT[:1])
    assert torch.equal(again.outputs[0], r.trained.outputs[0])
    # no pickle: the file is plain safetensors with JSON metadata
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["fxcache.scale_shift"])["model_class"] == type(r.T.model).__name__


def _unit_shapes(T):
    args, kwargs = T.inputs(T.timesteps[0])
    return fxcache.units(T.model, *args, **kwargs)


def test_dit_checkpoint_into_unet_fails_clearly(trained):
    dit = trained("dit")
    unet = tiny("unet2d")
    with pytest.raises(CheckpointError, match=r"trained for a DiTTransformer2DModel, not a UNet2DModel"):
        dit.ss.check_compatible("UNet2DModel", _unit_shapes(unet))
    # the training entry point refuses it too
    with pytest.raises(CheckpointError, match=r"DiTTransformer2DModel, not a UNet2DModel"):
        train_scale_shift(unet.model, _mask("unet2d"), _sampler(unet), iters=1, progress=False, adapter=dit.ss)


def test_missing_unit_other_channels_other_schedule_fail_clearly(trained):
    r = trained("unet2d")
    shapes = {u.name: u.out_shapes for u in _unit_shapes(r.T)}
    r.ss.check_compatible("UNet2DModel", shapes, r.mask.to_json())  # fits its own model and schedule
    r.ss.check_compatible("UNet2DModel", shapes)  # schedule not checked when not given

    other_units = {n: s for n, s in shapes.items() if n != "mid_block.attentions.0"}
    with pytest.raises(CheckpointError, match=r"unit 'mid_block.attentions.0' .* not a unit of this UNet2DModel"):
        r.ss.check_compatible("UNet2DModel", other_units)

    wider = dict(shapes, **{"mid_block.attentions.0": [((BATCH, 64, 8, 8), torch.float32)]})
    with pytest.raises(CheckpointError, match=r"output 0 of unit 'mid_block.attentions.0' has 64 channels here but 32"):
        r.ss.check_compatible("UNet2DModel", wider)
    # batch and spatial size may differ
    bigger = dict(shapes, **{"mid_block.attentions.0": [((8, 32, 32, 32), torch.float32)]})
    r.ss.check_compatible("UNet2DModel", bigger)

    # another schedule: another refresh step ...
    units = UNITS["unet2d"]
    table = [list(row) for row in r.mask.table]
    table[2][1] = True
    with pytest.raises(CheckpointError, match=r"computes unit 'down_blocks.1.attentions.0' at steps \[0, 2\].*steps \[0\]"):
        r.ss.check_compatible("UNet2DModel", shapes, fxcache.Mask(table, units).to_json())
    # ... another unit set ...
    extra = fxcache.Mask([[True] * 5] + [[False] * 5] * 3, units + ["up_blocks.1.resnets.0"])
    with pytest.raises(CheckpointError, match=r"reuses unit 'up_blocks.1.resnets.0' \(at steps \[1, 2, 3\]\)"):
        r.ss.check_compatible("UNet2DModel", shapes, extra)
    # ... or another number of steps
    with pytest.raises(CheckpointError, match=r"covers 5 steps but .* trained for 4 steps"):
        r.ss.check_compatible("UNet2DModel", shapes, fxcache.Mask(table + [[True] * 4], units))
    # a loaded checkpoint checks the same
    loaded = ScaleShift.load(r.ckpt)
    with pytest.raises(CheckpointError, match=r"not a DiTTransformer2DModel"):
        loaded.check_compatible("DiTTransformer2DModel", shapes)


def test_block_cache_schedule_is_recorded_and_checked(tmp_path):
    units = ["a", "b"]
    prof = Profile(units=tuple(units), l1rel=np.array([[np.nan, np.nan], [0.1, 0.3], [0.1, 0.3], [0.4, 0.1]]))
    sched = fxcache.BlockCache(0.25, prof, units=("a", "b"))
    ss = ScaleShift({"a": [((1, 4, 6),)], "b": [((1, 4, 6),)]}, 3, temb_module="t", model_class="M", schedule=sched)
    loaded = ScaleShift.load(ss.save(tmp_path / "bc.safetensors"))
    shapes = {"a": [(2, 5, 6)], "b": [(2, 5, 6)]}  # other batch and token count, same channels
    # the checkpoint path a BlockCache names is not part of the comparison
    with_ckpt = fxcache.BlockCache(0.25, prof, units=("a", "b"), scale_shift=str(tmp_path / "bc.safetensors"))
    loaded.check_compatible("M", shapes, with_ckpt.to_json())
    with pytest.raises(CheckpointError, match=r"BlockCache schedule whose fields \['threshold'\] differ"):
        loaded.check_compatible("M", shapes, fxcache.BlockCache(0.5, prof, units=("a", "b")))
    with pytest.raises(CheckpointError, match=r"a Mask schedule, but these adapters were trained for a BlockCache"):
        loaded.check_compatible("M", shapes, {"type": "Mask", "units": ["a"], "table": ["1"]})


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no scale-shift checkpoint"):
        ScaleShift.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not fxcache scale-shift adapters"):
        ScaleShift.load(tmp_path / "other.safetensors")


# ------------------------------------------------------------------ bad arguments
def test_sampler_and_schedule_must_agree_on_steps():
    T = tiny("dit")
    sampler = _sampler(T)
    longer = fxcache.Mask([[True, True]] + [[False, True]] * 4, ["transformer_blocks.0.attn1", "transformer_blocks.1.ff"])
    with pytest.raises(ValueError, match=r"called the model 4 times but the schedule covers 5 steps"):
        evaluate_scale_shift(T.model, longer, sampler)
    periodic = fxcache.Mask([[True], [False]], ["transformer_blocks.0.attn1"], periodic=True)
    with pytest.raises(fxcache.ScheduleError, match="pass num_steps"):
        evaluate_scale_shift(T.model, periodic, sampler)
    run = evaluate_scale_shift(T.model, periodic, sampler, num_steps=STEPS)
    assert set(run.pairs) == {("transformer_blocks.0.attn1", 1), ("transformer_blocks.0.attn1", 3)}
    always = fxcache.Mask([[True]], ["transformer_blocks.0.attn1"], periodic=True)
    with pytest.raises(UnsupportedModelError, match="nothing to adapt"):
        train_scale_shift(T.model, always, sampler, num_steps=STEPS, iters=1, progress=False)


@pytest.mark.parametrize("family", ["unet2d", "dit"])
def test_trained_student_is_what_inference_runs(family, trained):
    # Calibration trains on the graphs the runtime runs: the student's generation with
    # the trained adapters is, bit for bit, the compiled model's with the same adapters.
    r = trained(family)
    cm = fxcache.compile(r.T.model, r.mask, backend=None, scale_shift=r.ss)
    with torch.no_grad():
        out = r.sampler(cm, HELD_OUT[0])
    assert torch.equal(out, r.trained.outputs[0])
    assert not torch.equal(out, r.untrained.outputs[0])  # the adapters do change it
