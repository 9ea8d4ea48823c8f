"""fxcache's artefacts on disk (profiles, scale-shift checkpoints) fail loudly: every load
error is a CheckpointError naming the file and what is wrong, sizes declared by the
metadata are checked against the stored tensors before anything is allocated, and an
artefact recorded for another model or another schedule table is refused where it is
used (issue 9, "Artefacts and schedules")."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as save_np

import fxcache
from fxcache.artefacts import Profile
from fxcache.calibrate.scale_shift import ScaleShift
from fxcache.errors import CheckpointError, FxcacheError
from fxcache.plan import UnitInfo
from fxcache.schedules import BlockCache, Mask, UnknownUnitError, lower, to_plan

NAN = math.nan
PROFILE_KEY = "fxcache.profile"
SCALE_SHIFT_KEY = "fxcache.scale_shift"


# ----------------------------------------------------------------------------- helpers
def _profile(meta=None) -> Profile:
    return Profile(
        units=("a", "b"),
        l1rel=np.array([[NAN, NAN], [0.1, 0.3], [0.1, 0.3], [0.4, 0.1]]),
        meta={"model_class": "M"} if meta is None else meta,
    )


def _units() -> list[UnitInfo]:
    return [UnitInfo("a", "attention", flops=10), UnitInfo("b", "attention", flops=10)]


def _stored(path) -> tuple[dict, dict]:
    """The tensors (numpy) and the metadata of a safetensors file."""
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _rewrite(path, key, text=None, edit=None, tensors=None) -> str:
    """Write ``path`` again with the metadata under ``key`` replaced by ``text`` (or the
    JSON after ``edit(header)``) and optionally other tensors."""
    stored, metadata = _stored(path)
    if edit is not None:
        header = json.loads(metadata[key])
        edit(header)
        text = json.dumps(header)
    metadata[key] = text
    save_np(stored if tensors is None else tensors, str(path), metadata=metadata)
    return str(path)


def _adapters(mask=None, schedule=None, temb_dim=3) -> ScaleShift:
    return ScaleShift(
        {"a": [((1, 4, 6), "float32")], "b": [((1, 4, 6), "float32")]},
        temb_dim,
        temb_module="t",
        model_class="M",
        schedule=schedule,
        mask=mask,
    )


# ------------------------------------------------------------------ damaged profiles
def _set(key, value):
    def edit(h):
        h[key] = value

    return edit


def _drop(key):
    def edit(h):
        del h[key]

    return edit


@pytest.mark.parametrize(
    "text, edit, match",
    [
        ("{not json", None, "not valid JSON"),
        ("[1, 2]", None, "not a JSON object"),
        (None, _drop("units"), "'units'"),
        (None, _set("units", "ab"), "'units'"),
        (None, _set("units", [1, 2]), "'units'"),
        (None, _set("units", ["a", "b", "c"]), r"'l1rel'.*\(4, 2\).*3 units"),
        (None, _set("meta", ["model_class"]), "'meta'"),
        (None, _set("version", "1"), "format version"),
    ],
    ids=["not-json", "not-object", "no-units", "units-str", "units-int", "units-count", "meta-list", "version-str"],
)
def test_damaged_profile_metadata_is_a_checkpoint_error(tmp_path, text, edit, match):
    path = _rewrite(_profile().save(tmp_path / "p.safetensors"), PROFILE_KEY, text, edit)
    with pytest.raises(CheckpointError, match=match) as info:
        Profile.load(path)
    assert path in str(info.value)


@pytest.mark.parametrize(
    "tensors, match",
    [
        ({"cosine": np.zeros((4, 2))}, "'l1rel'"),  # missing
        ({"l1rel": np.zeros(4)}, r"'l1rel'.*\(4,\)"),
        ({"l1rel": np.zeros((4, 2)), "cosine": np.zeros((3, 2))}, r"'cosine'.*\(3, 2\)"),
        ({"l1rel": np.zeros((4, 2)), "timesteps": np.zeros(5)}, r"'timesteps'.*\(5,\)"),
        ({"l1rel": -np.ones((4, 2))}, "negative"),
        ({"l1rel": np.zeros((4, 2), dtype=np.int64)}, "I64"),
    ],
    ids=["no-l1rel", "l1rel-1d", "cosine-shape", "timesteps-shape", "negative", "int-dtype"],
)
def test_damaged_profile_tensors_are_a_checkpoint_error(tmp_path, tensors, match):
    path = _profile().save(tmp_path / "p.safetensors")
    _, metadata = _stored(path)
    save_np(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=match) as info:
        Profile.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("load", [Profile.load, ScaleShift.load], ids=["profile", "scale-shift"])
def test_not_a_file_is_a_checkpoint_error(tmp_path, load):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    for path in (tmp_path, tmp_path / "empty.safetensors", tmp_path / "junk.safetensors"):
        with pytest.raises(CheckpointError) as info:
            load(path)
        assert str(path) in str(info.value)


# ----------------------------------------------------------- damaged scale-shift files
@pytest.mark.parametrize(
    "text, edit, match",
    [
        ("{not json", None, "not valid JSON"),
        ("null", None, "not a JSON object"),
        (None, _drop("out_shapes"), "'out_shapes'"),
        (None, _drop("temb_module"), "'temb_module'"),
        (None, _set("temb_dim", "3"), "'temb_dim'"),
        (None, _set("units", "ab"), "'units'"),
        (None, _set("out_shapes", {"a": [[[1, 4, 6], "float32"]]}), r"'out_shapes'.*'b'"),
        (None, _set("out_shapes", {"a": [[[4], "float32"]], "b": [[[1, 4, 6], "float32"]]}), r"unit 'a'.*\(4,\)"),
        (None, _set("mask", {"type": "Mask", "table": 5, "units": ["a"]}), "'mask'"),
        (None, _set("num_steps", "ten"), "'num_steps'"),
        (None, _set("model_class", 3), "'model_class'"),
    ],
    ids=["not-json", "null", "no-out-shapes", "no-temb-module", "temb-dim-str", "units-str", "shapes-missing-unit",
         "shape-1d", "mask-bad", "num-steps-str", "model-class-int"],
)
def test_damaged_scale_shift_metadata_is_a_checkpoint_error(tmp_path, text, edit, match):
    mask = Mask([[1, 1], [0, 1], [1, 0]], ["a", "b"])
    path = _rewrite(_adapters(mask=mask).save(tmp_path / "ss.safetensors"), SCALE_SHIFT_KEY, text, edit)
    with pytest.raises(CheckpointError, match=match) as info:
        ScaleShift.load(path)
    assert path in str(info.value)


@pytest.mark.parametrize(
    "edit",
    [
        _set("temb_dim", 2**40),
        _set("out_shapes", {"a": [[[1, 4, 2**40], "float32"]], "b": [[[1, 4, 6], "float32"]]}),
    ],
    ids=["temb-dim", "channels"],
)
def test_sizes_in_metadata_are_checked_against_the_tensors_before_allocating(tmp_path, edit):
    # 2**40 inputs or channels would be terabytes of zeros: refused from the stored shapes
    path = _rewrite(_adapters().save(tmp_path / "ss.safetensors"), SCALE_SHIFT_KEY, edit=edit)
    with pytest.raises(CheckpointError, match=r"declares .*1099511627776.* but the file stores") as info:
        ScaleShift.load(path)
    assert path in str(info.value)


def test_scale_shift_tensors_must_match_their_metadata(tmp_path):
    path = _adapters().save(tmp_path / "ss.safetensors")
    stored, metadata = _stored(path)
    extra = dict(stored, surprise=np.zeros(2, dtype=np.float32))
    save_np(extra, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="'surprise'"):
        ScaleShift.load(path)
    wrong = {k: (v.astype(np.int32) if k.endswith("bias") else v) for k, v in stored.items()}
    save_np(wrong, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="I32"):
        ScaleShift.load(path)


def test_good_artefacts_still_round_trip(tmp_path):
    prof = _profile()
    assert Profile.load(prof.save(tmp_path / "p.safetensors")) == prof
    mask = Mask([[1, 1], [0, 1], [1, 0]], ["a", "b"])
    ss = _adapters(mask=mask)
    with torch.no_grad():
        for i, p in enumerate(ss.parameters()):
            p.fill_(0.01 * (i + 1))
    back = ScaleShift.load(ss.save(tmp_path / "ss.safetensors"))
    assert back.meta == ss.meta
    for (k, v), (k2, v2) in zip(ss.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_one_loader_for_both_artefacts(tmp_path):
    from fxcache.artefacts import read_artefact

    prof_path = _profile().save(tmp_path / "p.safetensors")
    ss_path = _adapters().save(tmp_path / "ss.safetensors")
    art = read_artefact(prof_path, key=PROFILE_KEY, what="profile")
    assert art.tensors["l1rel"] == ("F64", (4, 2)) and art.header["units"] == ["a", "b"]
    art = read_artefact(ss_path, key=SCALE_SHIFT_KEY, what="scale-shift checkpoint")
    assert art.header["temb_dim"] == 3
    # the other artefact's file is named and refused by the same words
    with pytest.raises(CheckpointError, match=rf"'{prof_path}'.*no '{SCALE_SHIFT_KEY}' metadata"):
        ScaleShift.load(prof_path)
    with pytest.raises(CheckpointError, match=rf"'{ss_path}'.*no '{PROFILE_KEY}' metadata"):
        Profile.load(ss_path)


# ---------------------------------------------------- artefacts for another model / table
def test_profile_of_another_model_class_is_refused():
    from fxcache.errors import ArtefactMismatchError
    from fxcache.schedules import ModelFacts

    sched = BlockCache(0.25, _profile({"model_class": "DiTTransformer2DModel"}))
    pixart = ModelFacts(model_class="PixArtTransformer2DModel")
    with pytest.raises(ArtefactMismatchError, match=r"DiTTransformer2DModel.*PixArtTransformer2DModel") as info:
        lower(sched, _units(), 4, model=pixart)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, FxcacheError)
    dit = ModelFacts(model_class="DiTTransformer2DModel")
    assert lower(sched, _units(), 4, model=dit) == lower(sched, _units(), 4)


def test_profile_of_other_unit_shapes_is_refused():
    from fxcache.errors import ArtefactMismatchError
    from fxcache.schedules import ModelFacts

    meta = {"model_class": "M", "out_shapes": {"a": [[2, 16, 64]], "b": [[2, 16, 64]]}}
    sched = BlockCache(0.25, _profile(meta))
    same = ModelFacts(model_class="M", out_shapes={"a": ((1, 64, 64),), "b": ((4, 16, 64),)})  # batch, tokens differ
    lower(sched, _units(), 4, model=same)
    narrow = ModelFacts(model_class="M", out_shapes={"a": ((2, 16, 32),), "b": ((2, 16, 64),)})
    with pytest.raises(ArtefactMismatchError, match=r"unit 'a'.*64 channels.*32"):
        lower(sched, _units(), 4, model=narrow)


def test_adapters_for_another_table_are_refused_when_attached(tmp_path):
    units = _units()
    trained_for = BlockCache(0.25, _profile(), units=("a", "b"))
    mask = lower(trained_for, units, 4)
    path = _adapters(mask=mask, schedule=trained_for).save(tmp_path / "ss.safetensors")
    same = BlockCache(0.25, _profile(), units=("a", "b"), scale_shift=path)
    assert lower(same, units, 4) == mask
    other = BlockCache(0.5, _profile(), units=("a", "b"), scale_shift=path)  # unit b: steps 0, 2 instead of 0-2
    with pytest.raises(CheckpointError, match=r"computes unit 'b' at steps \[0, 2\].*trained .* \[0, 1, 2\]") as info:
        lower(other, units, 4)
    assert path in str(info.value) and "threshold" in str(info.value)
    # the runtime's check, given the plan the adapters are attached to
    loaded = ScaleShift.load(path)
    shapes = {"a": [(2, 5, 6)], "b": [(2, 5, 6)]}
    loaded.check_compatible("M", shapes, to_plan(trained_for, units, 4))
    with pytest.raises(CheckpointError, match=r"computes unit 'b' at steps \[0, 2\]"):
        loaded.check_compatible("M", shapes, to_plan(BlockCache(0.5, _profile(), units=("a", "b")), units, 4))



def test_a_plan_without_a_recorded_table_is_checked_by_its_schedule(tmp_path):
    # adapters that recorded only their schedule config (no table): a plan is compared by its schedule
    units = _units()
    trained_for = BlockCache(0.25, _profile(), units=("a", "b"))
    loaded = ScaleShift.load(_adapters(schedule=trained_for).save(tmp_path / "ss.safetensors"))
    shapes = {"a": [(2, 5, 6)], "b": [(2, 5, 6)]}
    loaded.check_compatible("M", shapes, to_plan(trained_for, units, 4))
    with pytest.raises(CheckpointError, match=r"fields \['threshold'\] differ"):
        loaded.check_compatible("M", shapes, to_plan(BlockCache(0.5, _profile(), units=("a", "b")), units, 4))

def test_block_cache_reads_its_files_when_built_not_when_lowered(tmp_path):
    prof_path = _profile().save(tmp_path / "p.safetensors")
    mask = lower(BlockCache(0.25, _profile(), units=("a", "b")), _units(), 4)
    ss_path = _adapters(mask=mask).save(tmp_path / "ss.safetensors")
    sched = BlockCache(0.25, prof_path, units=("a", "b"), scale_shift=ss_path)
    (tmp_path / "p.safetensors").unlink()
    (tmp_path / "ss.safetensors").unlink()
    assert lower(sched, _units(), 4) == mask  # no file I/O in lowering
    # serialising still writes the paths it was built from
    d = json.loads(sched.to_json())
    assert d["profile"] == prof_path and d["scale_shift"] == ss_path
    # a missing or damaged file fails when the config is built, naming the file
    with pytest.raises(CheckpointError, match="no profile at"):
        BlockCache(0.25, prof_path)
    with pytest.raises(CheckpointError, match="no scale-shift checkpoint at"):
        BlockCache(0.25, _profile(), scale_shift=ss_path)
    bad = _rewrite(_profile().save(tmp_path / "p2.safetensors"), PROFILE_KEY, "{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        BlockCache(0.25, bad)


def test_scale_shift_checkpoint_of_another_model_class_is_refused_by_block_cache(tmp_path):
    from fxcache.schedules import ModelFacts

    path = _adapters().save(tmp_path / "ss.safetensors")
    sched = BlockCache(0.25, _profile({}), units=("a", "b"), scale_shift=path)  # a profile without a class
    with pytest.raises(CheckpointError, match=r"trained for a M, not a PixArtTransformer2DModel"):
        lower(sched, _units(), 4, model=ModelFacts(model_class="PixArtTransformer2DModel"))


# --------------------------------------------------------------- a module called twice
class _Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])

    def forward(self, x, timestep):
        b0, b1 = self.transformer_blocks
        return b1(b0(b0(x)))


def test_mask_naming_a_module_called_twice_says_why():
    from fxcache.schedules import ModelFacts

    unitset = fxcache.units(_Twice(), torch.randn(2, 4), torch.tensor(1))
    facts = ModelFacts.of(unitset, "_Twice")
    assert facts.model_class == "_Twice" and "transformer_blocks.0" in facts.skipped
    mask = Mask([[1, 1]], ["transformer_blocks.0", "transformer_blocks.1"])
    with pytest.raises(UnknownUnitError, match=r"'transformer_blocks.0'.*called more than once in one forward"):
        lower(mask, unitset.infos(), 1, model=facts)
    # a name nobody knows still lists the close matches
    with pytest.raises(UnknownUnitError, match=r"'transformer_blocks.2' \(close: "):
        lower(Mask([[1]], ["transformer_blocks.2"]), unitset.infos(), 1, model=facts)
    # BlockCache naming it by name says why too
    prof = Profile(("transformer_blocks.0",), np.zeros((2, 1)))
    with pytest.raises(UnknownUnitError, match="called more than once"):
        lower(BlockCache(0.1, prof, units=("transformer_blocks.0",)), unitset.infos(), 2, model=facts)


# ------------------------------------------------- through fxcache.compile (the runtime)
# Through fxcache.compile: the runtime hands lowering the model's facts and the
# adapters the plan.


def test_compile_refuses_a_dit_profile_on_a_pixart():
    from fxcache.errors import ArtefactMismatchError
    from fxcache.testing import tiny

    T = tiny("pixart")
    args, kwargs = T.inputs(T.timesteps[0])
    attn = [u.name for u in fxcache.units(T.model, *args, **kwargs) if u.kind == "attention"]
    rng = np.random.default_rng(0)
    l1rel = rng.random((len(T.timesteps), len(attn)))
    prof = Profile(tuple(attn), l1rel, meta={"model_class": "DiTTransformer2DModel"})
    cm = fxcache.compile(T.model, BlockCache(0.5, prof), backend=None)
    with pytest.raises(ArtefactMismatchError, match=r"DiTTransformer2DModel.*PixArtTransformer2DModel"):
        with torch.no_grad():
            T.call(cm, T.timesteps[0])


def test_compile_refuses_adapters_trained_for_another_table():
    from fxcache.testing import tiny

    T = tiny("dit")
    args, kwargs = T.inputs(T.timesteps[0])
    units = fxcache.units(T.model, *args, **kwargs).by_name()
    names = ["transformer_blocks.0", "transformer_blocks.1"]
    trained = Mask([[1, 1], [0, 1], [1, 0]], names)
    adapter = ScaleShift({n: units[n].out_shapes for n in names}, 16, temb_module="transformer_blocks.0.norm1.emb",
                         model_class="DiTTransformer2DModel", mask=trained)
    other = Mask([[1, 1], [0, 1], [0, 0]], names)
    cm = fxcache.compile(T.model, other, backend=None, scale_shift=adapter)
    with pytest.raises(CheckpointError, match=r"computes unit 'transformer_blocks.0' at steps \[0\].*\[0, 2\]"):
        with torch.no_grad():
            T.call(cm, T.timesteps[0])


def test_compile_says_why_a_module_called_twice_is_not_a_unit():
    mask = Mask([[1, 1]], ["transformer_blocks.0", "transformer_blocks.1"])
    cm = fxcache.compile(_Twice().eval(), mask, backend=None)
    with pytest.raises(UnknownUnitError, match="called more than once in one forward"):
        cm(torch.randn(2, 4), torch.tensor(1))


# ------------------------------------- every writer goes through a temporary file (issue 17)
OLD = b"the previous, complete file\n"


def _partial_then_fail(target_arg=0):
    """A stand-in for a library writer that writes half a file to the path it is given,
    then fails (a full disk, a killed process, an unserialisable value)."""

    def writer(*args, **kwargs):
        path = args[target_arg]
        with open(path, "wb") as f:
            f.write(b"half a fi")
        raise OSError(28, "No space left on device")

    return writer


def _intact(path, folder):
    assert path.read_bytes() == OLD, "a failed write truncated or replaced the existing file"
    assert sorted(p.name for p in folder.iterdir()) == [path.name], "a temporary file was left behind"


def test_atomic_path_moves_into_place_only_on_success(tmp_path):
    from fxcache.artefacts.store import atomic_path, write_text_atomic

    path = tmp_path / "x.png"
    path.write_bytes(OLD)
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            assert tmp.endswith(".png") and tmp != str(path) and str(tmp_path) in tmp  # same folder, same extension
            open(tmp, "wb").write(b"half")
            raise RuntimeError("interrupted")
    _intact(path, tmp_path)
    assert write_text_atomic(path, "new\n") == str(path)
    assert path.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_atomic_path_writes_through_a_symlink(tmp_path):
    from fxcache.artefacts.store import write_text_atomic

    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_bytes(OLD)
    link.symlink_to(target)
    write_text_atomic(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"


def test_mask_save_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    """The README promises a temporary file and a rename; Mask.save opened the file for
    writing (truncating it) before the JSON was made."""
    path = tmp_path / "mask.json"
    path.write_bytes(OLD)
    mask = Mask([[True, False]], ("a", "b"), periodic=True)

    def boom(self, indent=None):
        raise ValueError("not serialisable")

    monkeypatch.setattr(Mask, "to_json", boom)
    with pytest.raises(ValueError):
        mask.save(path)
    _intact(path, tmp_path)
    monkeypatch.undo()
    assert Mask.load(mask.save(path)) == mask


@pytest.mark.parametrize("what", ["profile", "scale_shift"])
def test_artefact_save_that_fails_leaves_the_old_file(what, tmp_path, monkeypatch):
    import safetensors.numpy
    import safetensors.torch

    path = tmp_path / "a.safetensors"
    path.write_bytes(OLD)
    monkeypatch.setattr(safetensors.numpy, "save_file", _partial_then_fail(1))
    monkeypatch.setattr(safetensors.torch, "save_file", _partial_then_fail(1))
    obj = _profile() if what == "profile" else _adapters()
    with pytest.raises(OSError):
        obj.save(path)
    _intact(path, tmp_path)


def test_profile_plot_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    path = tmp_path / "p.png"
    path.write_bytes(OLD)
    monkeypatch.setattr(Figure, "savefig", lambda self, fname, **kw: _partial_then_fail()(fname))
    with pytest.raises(OSError):
        _profile().plot(path)
    _intact(path, tmp_path)


def test_scale_shift_loss_plot_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from fxcache.calibrate import scale_shift

    path = tmp_path / "loss.png"
    path.write_bytes(OLD)
    monkeypatch.setattr(FigureCanvasAgg, "print_png", lambda self, fname, **kw: _partial_then_fail()(fname))
    with pytest.raises(OSError):
        scale_shift._plot_losses([1.0, 0.5], path, "t")
    _intact(path, tmp_path)


def test_demo_image_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    from PIL import Image

    from fxcache.evaluation.render import save_side_by_side

    path = tmp_path / "demo.png"
    path.write_bytes(OLD)
    monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **kw: _partial_then_fail()(fp))
    with pytest.raises(OSError):
        save_side_by_side(str(path), [torch.zeros(1, 1, 4, 4)], ["t"])
    _intact(path, tmp_path)
    monkeypatch.undo()
    save_side_by_side(str(path), [torch.zeros(1, 1, 4, 4)], ["t"])
    assert Image.open(path).format == "PNG"  # the format still follows the name's extension


def test_cli_bench_json_that_fails_leaves_the_old_file(tmp_path, monkeypatch, capsys):
    """``fxcache bench --json`` streamed json.dump into the opened file: a value it cannot
    encode left half a report."""
    from fxcache import cli
    from fxcache.evaluation import speed

    class Report:
        schedule = "x"  # the CLI prefixes what was typed to the report's schedule

        def __str__(self):
            return "report"

        def to_dict(self):
            return {"schedule": "x", "measured_speedup": 1.0, "bad": object()}

    monkeypatch.setattr(speed, "measure_speedup", lambda *a, **k: Report())
    path = tmp_path / "r.json"
    path.write_bytes(OLD)
    with pytest.raises(TypeError):
        cli.main(["bench", "--model", "unet", "--steps", "1", "--samples", "1", "--repeats", "1", "--json", str(path)])
    _intact(path, tmp_path)
