"""The cached model is the model: Python state the captured forward read (peft's
adapter names and scales, FreeU factors, fused projections, processor attributes, a
plain attribute a custom forward reads) is checked at every generation start, and a
change captures again; importing fxcache changes nothing in how torch compiles other
models.

Each test changes the model after a first cached call, starts a new generation (what a
pipeline does at the end of every call) and compares with the model's own output, bit
for bit, with a plan that computes everything: any baked-in constant shows."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fxcache
from fxcache.testing import tiny

EAGER = dict(backend=None)


def _full_mask(T):
    args, kwargs = T.inputs(T.timesteps[0])
    names = [u.name for u in fxcache.units(T.model, *args, **kwargs) if u.kind != "skip_branch"][:4]
    return fxcache.Mask([[True] * len(names)], names, periodic=True)


def _out(T, model, t):
    with torch.no_grad():
        return T.output(T.call(model, t))


def _check_change(T, change, *, undo=None):
    cm = fxcache.compile(T.model, _full_mask(T), **EAGER)
    t = T.timesteps[1]
    before = _out(T, cm, t)
    assert torch.equal(before, _out(T, T.model, t))
    change(T.model)
    cm.reset()
    after = _out(T, cm, t)
    assert torch.equal(after, _out(T, T.model, t)), "the change was not seen"
    assert not torch.equal(before, after), "the change does not change the output: the test proves nothing"
    if undo is not None:
        undo(T.model)
        cm.reset()
        assert torch.equal(_out(T, cm, t), _out(T, T.model, t))
    return cm


# ------------------------------------------------------------------ no global state
def test_import_leaves_torch_compile_of_other_models_alone():
    """torch's global module-registration hooks made dynamo guard on a counter that
    diffusers' U-Net forward bumps (``self.resnets[1:]`` builds a ModuleList), so a plain
    ``torch.compile(unet)`` recompiled at every call once fxcache was imported."""
    code = (
        "import torch, fxcache\n"
        "from fxcache.testing import tiny\n"
        "T = tiny('unet2d')\n"
        "n = [0]\n"
        "def backend(gm, inputs):\n"
        "    n[0] += 1\n"
        "    return gm.forward\n"
        "m = torch.compile(T.model, backend=backend)\n"
        "with torch.no_grad():\n"
        "    for t in T.timesteps[:4]:\n"
        "        T.call(m, t)\n"
        "print(n[0])\n"
        "print(len(torch.nn.modules.module._global_module_registration_hooks),"
        " len(torch.nn.modules.module._global_parameter_registration_hooks),"
        " len(torch.nn.modules.module._global_buffer_registration_hooks))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    graphs, hooks = out.stdout.split("\n")[:2]
    assert hooks == "0 0 0", "fxcache registered process-wide module hooks"
    assert graphs == "1"


# ------------------------------------------------------------------------ peft
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _lora(T, names=("a", "b")):
    peft = pytest.importorskip("peft")
    for i, name in enumerate(names):
        torch.manual_seed(10 + i)
        T.model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                            target_modules=LORA_TARGETS), adapter_name=name)
    T.model.set_adapters(list(names))
    return T


@pytest.mark.parametrize("family", ["sd", "sd3"])
@pytest.mark.parametrize("change", ["set_adapters_name", "set_adapters_weight", "disable_lora", "fuse_lora",
                                    "delete_adapters", "add_adapter"])
def test_peft_state_is_guarded(family, change):
    T = _lora(tiny(family))
    m = T.model
    if change == "set_adapters_name":
        _check_change(T, lambda m: m.set_adapters(["b"]), undo=lambda m: m.set_adapters(["a", "b"]))
    elif change == "set_adapters_weight":
        _check_change(T, lambda m: m.set_adapters(["a", "b"], weights=[0.3, 1.0]))
    elif change == "disable_lora":
        _check_change(T, lambda m: m.disable_lora(), undo=lambda m: m.enable_lora())
    elif change == "fuse_lora":
        # the fused weights hold the adapters: a graph that still runs the LoRA branch adds them twice
        cm = fxcache.compile(m, _full_mask(T), **EAGER)
        t = T.timesteps[1]
        ref = _out(T, m, t)
        assert torch.equal(_out(T, cm, t), ref)
        m.fuse_lora()
        cm.reset()
        torch.testing.assert_close(_out(T, cm, t), _out(T, m, t), rtol=0, atol=0)
        torch.testing.assert_close(_out(T, cm, t), ref, rtol=1e-4, atol=1e-5)
        m.unfuse_lora()
        cm.reset()
        assert torch.equal(_out(T, cm, t), _out(T, m, t))
    elif change == "delete_adapters":
        _check_change(T, lambda m: m.delete_adapters("b"))
    else:
        peft = pytest.importorskip("peft")

        def add(m):
            torch.manual_seed(99)
            m.add_adapter(peft.LoraConfig(r=2, lora_alpha=8, init_lora_weights=False,
                                          target_modules=["to_q"]), adapter_name="c")
            m.set_adapters(["a", "b", "c"])

        _check_change(T, add)


# ------------------------------------------------------------ diffusers features
def test_freeu_on_and_off_is_guarded():
    T = tiny("sd")
    _check_change(T, lambda m: m.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4), undo=lambda m: m.disable_freeu())


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_fuse_qkv_projections_is_guarded(family):
    T = tiny(family)
    cm = fxcache.compile(T.model, _full_mask(T), **EAGER)
    t = T.timesteps[1]
    assert torch.equal(_out(T, cm, t), _out(T, T.model, t))
    first = cm.entries[0]
    T.model.fuse_qkv_projections()
    cm.reset()
    torch.testing.assert_close(_out(T, cm, t), _out(T, T.model, t), rtol=0, atol=0)
    assert cm.entries[0] is not first, "fusing the projections must capture again"
    T.model.unfuse_qkv_projections()
    cm.reset()
    assert torch.equal(_out(T, cm, t), _out(T, T.model, t))


class _Scaled:
    """An attention processor with a plain attribute its call reads (as IP-Adapter's
    ``scale`` or a backend name): a capture bakes the value in."""

    def __init__(self, scale=1.0):
        from diffusers.models.attention_processor import AttnProcessor

        self.inner = AttnProcessor()
        self.scale = scale

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return self.scale * self.inner(attn, hidden_states, *args, **kwargs)


def test_processor_attribute_is_guarded():
    T = tiny("dit")
    procs = {}
    for name, m in T.model.named_modules():
        if hasattr(m, "set_processor"):
            m.set_processor(_Scaled())
            procs[name] = m.processor

    def change(_):
        for p in procs.values():
            p.scale = 0.5

    _check_change(T, change)


class _Gain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
        self.gain = 1.0
        self.mode = "plain"

    def forward(self, x, timestep):
        h = x * (1 + timestep.float().view(-1, 1, 1) / 1000)
        for b in self.transformer_blocks:
            h = h + torch.tanh(b(h)) * self.gain
        if self.mode == "double":
            h = h * 2
        return (h,)


@pytest.mark.parametrize("attr,value", [("gain", 3.0), ("mode", "double")])
def test_plain_attribute_read_by_a_custom_forward_is_guarded(attr, value):
    torch.manual_seed(0)
    model = _Gain().eval()
    mask = fxcache.Mask([[True]], ["transformer_blocks.1"], periodic=True)
    cm = fxcache.compile(model, mask, **EAGER)
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        before = cm(x, torch.tensor([900]))[0]
        setattr(model, attr, value)
        cm.reset()
        after = cm(x, torch.tensor([900]))[0]
        assert torch.equal(after, model(x, torch.tensor([900]))[0])
        assert not torch.equal(before, after)


@pytest.mark.parametrize("family", ["unet2d", "sd", "sdxl", "dit", "pixart", "sd3", "flux", "cogvideox"])
def test_nothing_volatile_is_guarded(family):
    """The guard must not see a change where there is none: two generations of every
    family capture once (a recapture per generation would be a silent slowdown)."""
    T = tiny(family)
    cm = fxcache.compile(T.model, _full_mask(T), **EAGER)
    for _ in range(2):
        for t in T.timesteps[:2]:
            _out(T, cm, t)
        cm.reset()
    assert cm.captures == 1


# ------------------------------------------------------------------ IP-Adapter
def _ip_adapter(T, clip_dim=12):
    """Load a random IP-Adapter into the tiny SD U-Net through diffusers' own loader
    (``_load_ip_adapter_weights``, what ``load_ip_adapter`` calls with the file's weights)."""
    m = T.model
    cross = m.config.cross_attention_dim
    g = torch.Generator().manual_seed(5)
    proj = {"proj.weight": torch.randn(4 * cross, clip_dim, generator=g) * 0.1,
            "proj.bias": torch.zeros(4 * cross), "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    layers, key_id = {}, 1
    for name in m.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = m.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(m.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = m.config.block_out_channels[int(name[len("down_blocks.")])]
        layers[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.3
        layers[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.3
        key_id += 2
    m._load_ip_adapter_weights([{"image_proj": proj, "ip_adapter": layers}], low_cpu_mem_usage=False)
    image = torch.randn(1, 1, clip_dim, generator=g)
    inputs = T.inputs

    def with_image(t):
        args, kwargs = inputs(t)
        x, tt, enc = args
        return (x, tt), {"encoder_hidden_states": enc, "added_cond_kwargs": {"image_embeds": [image]}}

    T.inputs = with_image
    return T


def _set_ip_scale(model, scale):
    # what IPAdapterMixin.set_ip_adapter_scale does on the denoiser's processors
    for proc in model.attn_processors.values():
        if hasattr(proc, "scale") and isinstance(proc.scale, list):
            proc.scale = [scale] * len(proc.scale)


def test_ip_adapter_scale_is_guarded():
    T = _ip_adapter(tiny("sd"))
    _set_ip_scale(T.model, 0.0)
    _check_change(T, lambda m: _set_ip_scale(m, 42.0), undo=lambda m: _set_ip_scale(m, 0.0))


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_lora_scales_change_without_capturing_or_compiling_again(family):
    """peft scales are graph inputs (runtime/lora.py): ``set_adapters(..., weights=...)``
    after the first call gives the model's output with the same graphs, under a real
    torch.compile backend: dynamo compiles nothing more."""
    from torch._dynamo.utils import counters

    T = _lora(tiny(family))
    m = T.model
    cm = fxcache.compile(m, _full_mask(T), backend="aot_eager")
    t = T.timesteps[1]
    assert torch.equal(_out(T, cm, t), _out(T, m, t))
    graphs = counters["stats"]["unique_graphs"]
    for weights in ([0.3, 1.0], [2.0, 0.0], [1.0, 1.0]):
        m.set_adapters(["a", "b"], weights=weights)
        cm.reset()
        assert torch.equal(_out(T, cm, t), _out(T, m, t)), weights
    assert cm.captures == 1
    assert counters["stats"]["unique_graphs"] == graphs


def test_lora_scales_in_bf16_layers_capture_again():
    """In bf16 a tensor scale would round differently from peft's float: those layers
    keep the float, and a change captures again (still the model's output)."""
    T = _lora(tiny("sd", dtype=torch.bfloat16))
    cm = _check_change(T, lambda m: m.set_adapters(["a", "b"], weights=[0.3, 1.0]))
    assert cm.captures == 2


def test_a_change_the_forward_does_not_read_keeps_the_compiled_graphs():
    """The snapshot over-approximates: an attribute the forward never reads fails the
    guard, captures again, finds the same graph on the same tensors, and keeps the
    compiled step graphs (no new compile)."""
    from torch._dynamo.utils import counters

    T = tiny("dit")
    cm = fxcache.compile(T.model, fxcache.FORA(interval=2), backend="aot_eager")
    t = T.timesteps[1]
    _out(T, cm, t)
    entry, graphs = cm.entries[0], counters["stats"]["unique_graphs"]
    T.model.transformer_blocks[0].note = "not read by forward"
    cm.reset()
    assert torch.equal(_out(T, cm, t), _out(T, T.model, t))
    assert cm.captures == 2 and cm.entries[0] is entry
    assert counters["stats"]["unique_graphs"] == graphs


def test_unload_ip_adapter_is_guarded():
    """What ``IPAdapterMixin.unload_ip_adapter`` does to the denoiser: the projection
    removed, ``config.encoder_hid_dim_type`` set to None (an attribute of diffusers'
    FrozenDict config) and the default processors back."""
    T = _ip_adapter(tiny("sd"))
    cm = fxcache.compile(T.model, _full_mask(T), **EAGER)
    t = T.timesteps[1]
    assert torch.equal(_out(T, cm, t), _out(T, T.model, t))
    m = T.model
    m.encoder_hid_proj = None
    m.config.encoder_hid_dim_type = None
    m.set_default_attn_processor()
    cm.reset()
    assert torch.equal(_out(T, cm, t), _out(T, m, t))
    assert cm.captures == 2


def test_a_config_attribute_is_guarded():
    """``model.config.name = value`` (as diffusers' own loaders do) changes an attribute of
    the FrozenDict, not its items: the guard sees it."""
    from fxcache.runtime.guards import snapshot

    T = tiny("dit")
    before = snapshot(T.model)
    T.model.config.norm_type = "something else"
    assert snapshot(T.model) != before
