"""Schedule configs and their lowering to Mask: hand-computed tables, errors, JSON round
trips, and property tests that every lowered table is a valid Plan. Pure Python + numpy."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxcache.artefacts import Profile, ProfileError
from fxcache.errors import CheckpointError, UnitError
from fxcache.plan import Plan, UnitInfo
from fxcache.schedules import (
    FORA,
    BlockCache,
    DeepCache,
    LearnedMask,
    Mask,
    ScheduleError,
    UnknownUnitError,
    deepcache_full_steps,
    delta_refresh,
    lower,
    rectify,
    register_lowering,
    schedule_from_dict,
    schedule_from_json,
    select_units,
    to_plan,
)


# ----------------------------------------------------------------------- fake models
def unet_units(num_branches: int = 3) -> list[UnitInfo]:
    """An SD-like U-Net: blocks, resnets, attentions with transformer blocks, skip branches."""
    u = []
    for i in range(2):
        u.append(UnitInfo(f"down_blocks.{i}", "down_block", flops=100))
        u.append(UnitInfo(f"down_blocks.{i}.resnets.0", "resnet", flops=40, parent=f"down_blocks.{i}"))
        att = f"down_blocks.{i}.attentions.0"
        u.append(UnitInfo(att, "attention", flops=50, parent=f"down_blocks.{i}"))
        tb = f"{att}.transformer_blocks.0"
        u.append(UnitInfo(tb, "transformer_block", flops=45, parent=att, index=0))
        u.append(UnitInfo(f"{tb}.attn1", "attention", flops=15, parent=tb, index=0, block=tb))
        u.append(UnitInfo(f"{tb}.attn2", "attention", flops=10, parent=tb, index=0, block=tb))
        u.append(UnitInfo(f"{tb}.ff", "mlp", flops=20, parent=tb, index=0, block=tb))
    u.append(UnitInfo("mid_block", "mid_block", flops=80))
    u.append(UnitInfo("up_blocks.0", "up_block", flops=120))
    u.append(UnitInfo("up_blocks.0.resnets.0", "resnet", flops=50, parent="up_blocks.0"))
    for m in range(num_branches):
        u.append(UnitInfo(f"skip_branch.{m}", "skip_branch", flops=300 - 50 * m, index=m))
    return u


def dit_units(depth: int = 3) -> list[UnitInfo]:
    u = []
    for i in range(depth):
        b = f"transformer_blocks.{i}"
        u.append(UnitInfo(b, "transformer_block", flops=30, index=i))
        u.append(UnitInfo(f"{b}.attn1", "attention", flops=12, parent=b, index=i, block=b))
        u.append(UnitInfo(f"{b}.ff", "mlp", flops=16, parent=b, index=i, block=b))
    return u


def flux_units() -> list[UnitInfo]:
    u = []
    b = "transformer_blocks.0"
    u.append(UnitInfo(b, "transformer_block", flops=40, index=0))
    u.append(UnitInfo(f"{b}.attn", "attention", flops=10, parent=b, index=0, block=b))
    u.append(UnitInfo(f"{b}.ff", "mlp", flops=10, parent=b, index=0, block=b))
    u.append(UnitInfo(f"{b}.ff_context", "mlp", flops=5, parent=b, index=0, block=b))
    for i in range(2):
        s = f"single_transformer_blocks.{i}"
        u.append(UnitInfo(s, "single_block", flops=30, index=i))
        u.append(UnitInfo(f"{s}.attn", "attention", flops=10, parent=f"{s}.branch", index=i, block=s))
        u.append(UnitInfo(f"{s}.branch", "branch", flops=28, parent=s, index=i, block=s))
    return u


def plan_of(schedule, units, num_steps=None) -> Plan:
    return to_plan(schedule, units, num_steps, full_flops=1000)


def computed(mask: Mask, unit: str, num_steps: int) -> list[int]:
    return list(mask.computed_steps(unit, num_steps))


# -------------------------------------------------------------------------- DeepCache
def test_deepcache_uniform_n3_over_7_steps():
    mask = lower(DeepCache(interval=3, branch=1), unet_units(), 7)
    assert mask.units == ("skip_branch.1",)
    assert mask.periodic and mask.table == ((True,), (False,), (False,))
    assert computed(mask, "skip_branch.1", 7) == [0, 3, 6]
    assert mask.expand(7).table == tuple((t in (0, 3, 6),) for t in range(7))
    plan = plan_of(DeepCache(interval=3, branch=1), unet_units(), 7)
    assert plan.periodic and plan.units == ("skip_branch.1",)


def test_deepcache_interval_1_is_always_full():
    mask = lower(DeepCache(interval=1, branch=0), unet_units(), None)
    assert mask.table == ((True,),) and mask.periodic


def test_deepcache_nonuniform_formula_by_hand():
    # T = 10, N = 3 -> k = ceil(10/3) = 4 points; c = 3, p = 1.4.
    T, N, c, p = 10, 3, 3.0, 1.4
    start = -(c ** (1 / p))  # sign(-c)|c|^(1/p) = -2.1918...
    end = (T - c) ** (1 / p)  # 7^(1/1.4) = 4.0146...
    ls = [start + (end - start) * i / 4 for i in range(4)]  # end excluded
    assert ls == pytest.approx([-2.19180, -0.64020, 0.91140, 2.46299], abs=1e-4)
    vals = [math.copysign(abs(x) ** p, x) + c for x in ls]
    assert vals == pytest.approx([0.0, 2.4644, 3.8782, 6.5322], abs=1e-3)
    expected = [0, 2, 3, 6]  # int() of the values above, all distinct at p = 1.4
    steps, used_p = deepcache_full_steps(T, N, center=c, power=p)
    assert list(steps) == expected and used_p == 1.4
    mask = lower(DeepCache(interval=3, branch=0, uniform=False, center=3.0, power=1.4), unet_units(), 10)
    assert not mask.periodic and mask.num_steps == 10
    assert computed(mask, "skip_branch.0", 10) == expected
    # the defaults are c = 0.3 T = 3 and p = 1.4, so they give the same steps here
    assert lower(DeepCache(interval=3, branch=0, uniform=False), unet_units(), 10) == mask


def test_deepcache_nonuniform_lowers_power_until_distinct():
    # T = 50, N = 2 needs 25 distinct steps; p = 1.4 collides, so p is lowered.
    steps, used_p = deepcache_full_steps(50, 2)
    assert len(steps) == 25 and steps[0] == 0 and 1.0 <= used_p < 1.4


def test_deepcache_nonuniform_steps_from_config_or_call():
    a = lower(DeepCache(interval=5, branch=2, uniform=False, num_steps=50), unet_units(), None)
    b = lower(DeepCache(interval=5, branch=2, uniform=False), unet_units(), 50)
    assert a == b and sum(r[0] for r in a.table) == 10
    with pytest.raises(ScheduleError, match="needs the number of steps"):
        lower(DeepCache(interval=5, branch=2, uniform=False), unet_units(), None)
    with pytest.raises(ScheduleError, match="num_steps = 50 but the generation has num_steps = 20"):
        lower(DeepCache(interval=5, branch=2, uniform=False, num_steps=50), unet_units(), 20)


def test_deepcache_errors():
    with pytest.raises(ScheduleError, match=r"branch = 5 .*\[0, 1, 2\]"):
        lower(DeepCache(interval=3, branch=5), unet_units(3), 10)
    with pytest.raises(ScheduleError) as e:
        lower(DeepCache(interval=3, branch=0), dit_units(), 10)
    msg = str(e.value)
    assert "U-Nets with skip connections" in msg and "FORA" in msg and "BlockCache" in msg and "Mask" in msg
    assert isinstance(e.value, UnitError)
    with pytest.raises(ScheduleError, match=r"DeepCache.interval = 0 .*integer >= 1"):
        DeepCache(interval=0, branch=0)
    with pytest.raises(ScheduleError, match="DeepCache.branch = -1"):
        DeepCache(interval=2, branch=-1)
    with pytest.raises(ScheduleError, match="DeepCache.interval = True"):
        DeepCache(interval=True, branch=0)
    with pytest.raises(ScheduleError, match="DeepCache.center = 3.0 .*uniform=True"):
        DeepCache(interval=2, branch=0, center=3.0)
    with pytest.raises(ScheduleError, match=r"DeepCache.power = 0.5 .*>= 1.0"):
        DeepCache(interval=2, branch=0, uniform=False, power=0.5)
    with pytest.raises(ScheduleError, match=r"DeepCache.center = 12.0 .*\[0, 10\)"):
        lower(DeepCache(interval=2, branch=0, uniform=False, center=12.0), unet_units(), 10)
    with pytest.raises(ScheduleError, match="DeepCache.uniform"):
        DeepCache(interval=2, branch=0, uniform="no")



@pytest.mark.parametrize("interval", [10**6, 2**70])
def test_huge_intervals_are_bounded_by_the_steps(interval):
    # an interval >= num_steps means only step 0 is full; no table of `interval` rows
    start = time.perf_counter()
    for sched, units in (
        (DeepCache(interval=interval, branch=0), unet_units()),
        (DeepCache(interval=interval, branch=0, uniform=False), unet_units()),
        (FORA(interval), dit_units(2)),
    ):
        mask = lower(sched, units, 10)
        assert mask.expand(10).table == (mask.table[0],) + ((False,) * len(mask.units),) * 9
        assert all(mask.table[0]) and mask.num_steps <= 10
        plan_of(sched, units, 10)
    assert time.perf_counter() - start < 2.0
    # unknown number of steps: a clear error instead of an overflow or a huge table
    with pytest.raises(ScheduleError, match=r"DeepCache.interval = .* pass num_steps"):
        lower(DeepCache(interval=interval, branch=0), unet_units())
    with pytest.raises(ScheduleError, match=r"FORA.interval = .* pass num_steps"):
        lower(FORA(interval), dit_units(2))
    # a long but bounded period still lowers without num_steps
    assert lower(FORA(1000), dit_units(1)).num_steps == 1000

@settings(max_examples=150, deadline=None)
@given(st.data())
def test_deepcache_nonuniform_exact_count(data):
    T = data.draw(st.integers(2, 200), label="T")
    N = data.draw(st.integers(1, T), label="N")
    steps, p = deepcache_full_steps(T, N)
    assert len(steps) == len(set(steps)) == math.ceil(T / N)
    assert steps[0] == 0 and all(0 <= s < T for s in steps) and 1.0 <= p <= 1.4
    mask = lower(DeepCache(interval=N, branch=0, uniform=False), unet_units(1), T)
    assert sum(r[0] for r in mask.table) == math.ceil(T / N)
    plan_of(DeepCache(interval=N, branch=0, uniform=False), unet_units(1), T)


def test_deepcache_nonuniform_exhaustive():
    # every T in 2..200 and N in 1..T: exactly ceil(T/N) distinct full steps, step 0 first
    for T in range(2, 201):
        for N in range(1, T + 1):
            steps, _ = deepcache_full_steps(T, N)
            assert len(set(steps)) == len(steps) == math.ceil(T / N) and steps[0] == 0 and steps[-1] < T, (T, N)


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(2, 120),
    N=st.integers(1, 12),
    center=st.floats(0, 0.99),
    power=st.floats(1.0, 3.0),
)
def test_deepcache_nonuniform_any_center_power(T, N, center, power):
    steps, p = deepcache_full_steps(T, N, center * T, power)
    assert len(set(steps)) == math.ceil(T / N) and steps[0] == 0 and p <= power


# ------------------------------------------------------------------------------- FORA
def test_fora_n2_and_n3():
    units = dit_units(2)
    names = ("transformer_blocks.0.attn1", "transformer_blocks.0.ff", "transformer_blocks.1.attn1", "transformer_blocks.1.ff")
    m2 = lower(FORA(2), units, 10)
    assert m2.units == names and m2.periodic
    assert m2.table == ((True,) * 4, (False,) * 4)
    m3 = lower(FORA(3), units, None)
    assert m3.table == ((True,) * 4, (False,) * 4, (False,) * 4)
    assert computed(m3, "transformer_blocks.1.ff", 8) == [0, 3, 6]
    plan = plan_of(FORA(3), units)
    # reusing attn1 and ff of both blocks saves 2 * (12 + 16) FLOPs on steps 1 and 2
    assert [k.flops for k in plan.step_kinds] == [1000, 1000 - 56]
    assert lower(FORA(1), units).table == ((True,) * 4,)


def test_fora_prefers_branch_units_and_skips_unet_level_attention():
    m = lower(FORA(2), flux_units())
    assert m.units == (
        "transformer_blocks.0.attn",
        "transformer_blocks.0.ff",
        "transformer_blocks.0.ff_context",
        "single_transformer_blocks.0.branch",
        "single_transformer_blocks.1.branch",
    )
    m = lower(FORA(2), unet_units())
    assert all(".transformer_blocks.0." in n for n in m.units) and len(m.units) == 6
    plan_of(FORA(2), flux_units())


def test_fora_errors():
    with pytest.raises(ScheduleError) as e:
        lower(FORA(2), [UnitInfo("down_blocks.0", "down_block"), UnitInfo("skip_branch.0", "skip_branch", index=0)])
    msg = str(e.value)
    assert "transformer blocks" in msg and "DeepCache" in msg and "BlockCache" in msg and "Mask" in msg
    with pytest.raises(ScheduleError, match=r"FORA.interval = 0 is not allowed; interval must be an integer >= 1"):
        FORA(0)
    with pytest.raises(ScheduleError, match="FORA.interval = 2.5"):
        FORA(2.5)


# ------------------------------------------------------------------------- BlockCache
def synthetic_profile() -> Profile:
    nan = float("nan")
    l1 = np.array(
        [
            [nan, nan, nan],
            [0.25, 0.0625, 1.0],
            [0.25, 0.0625, 1.0],
            [0.125, 0.0625, 1.0],
            [0.5, 0.0625, 1.0],
            [0.25, 0.0625, 1.0],
            [0.25, 0.0625, 1.0],
            [1.0, 0.0625, 1.0],
        ]
    )
    names = ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1", "transformer_blocks.2.attn1")
    return Profile(names, l1, cosine=1.0 - l1, timesteps=np.linspace(999, 0, 8), meta={"model": "fake", "seeds": [0, 1]})


def test_delta_rule_by_hand():
    # δ = 0.5; unit 0: sums since the last refresh 0.25, 0.5 (keep, <= δ), 0.625 (> δ: refresh at 3),
    # 0.5 (keep), 0.75 (refresh at 5), 0.25 (keep), 1.25 (refresh at 7).
    assert delta_refresh([math.nan, 0.25, 0.25, 0.125, 0.5, 0.25, 0.25, 1.0], 0.5) == (
        True, False, False, True, False, True, False, True,
    )
    mask = lower(BlockCache(0.5, synthetic_profile()), dit_units(3), 8)
    assert mask.units == ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1", "transformer_blocks.2.attn1")
    assert not mask.periodic
    cols = [mask.column(u) for u in mask.units]
    assert [t for t, c in enumerate(cols[0]) if c] == [0, 3, 5, 7]
    assert [t for t, c in enumerate(cols[1]) if c] == [0]  # 7 * 1/16 <= 0.5
    assert [t for t, c in enumerate(cols[2]) if c] == list(range(8))
    plan_of(BlockCache(0.5, synthetic_profile()), dit_units(3), 8)
    # NaN after row 0 counts as a change too large to reuse across
    assert delta_refresh([0.0, 0.1, math.nan, 0.1], 10.0) == (True, False, True, False)


def test_block_cache_selection_and_profile_path(tmp_path):
    prof = synthetic_profile()
    path = prof.save(tmp_path / "p.safetensors")
    by_path = BlockCache(0.5, path, units=("transformer_blocks.0.attn1", "transformer_blocks.2.attn1"))
    m = lower(by_path, dit_units(3), None)
    assert m.units == ("transformer_blocks.0.attn1", "transformer_blocks.2.attn1")
    # selection keeps model order whatever order the names were given in
    rev = BlockCache(0.5, prof, units=("transformer_blocks.2.attn1", "transformer_blocks.0.attn1"))
    assert lower(rev, dit_units(3)).units == m.units
    assert [u.name for u in select_units(dit_units(2), ("mlp", "transformer_blocks.0.attn1"))] == [
        "transformer_blocks.0.attn1", "transformer_blocks.0.ff", "transformer_blocks.1.ff",
    ]


def test_block_cache_errors(tmp_path):
    prof = synthetic_profile()
    with pytest.raises(ScheduleError, match="covers 8 steps but the generation has num_steps = 20"):
        lower(BlockCache(0.5, prof), dit_units(3), 20)
    with pytest.raises(ScheduleError, match=r"profile does not cover: \['transformer_blocks.0.ff'"):
        lower(BlockCache(0.5, prof, units="mlp"), dit_units(3), 8)
    with pytest.raises(UnknownUnitError, match=r"'resnet'\] is neither a unit kind .*allowed kinds: \['attention', 'mlp'"):
        lower(BlockCache(0.5, prof, units="resnet"), dit_units(3), 8)
    with pytest.raises(ScheduleError, match=r"BlockCache.threshold = -0.1 .*>= 0.0"):
        BlockCache(-0.1, prof)
    with pytest.raises(ScheduleError, match=r"BlockCache.threshold = nan"):
        BlockCache(float("nan"), prof)
    with pytest.raises(ScheduleError, match=r"BlockCache.units = \(\)"):
        BlockCache(0.1, prof, units=())
    with pytest.raises(ScheduleError, match=r"BlockCache.profile = 3"):
        BlockCache(0.1, 3)
    with pytest.raises(CheckpointError, match="no profile at"):
        lower(BlockCache(0.1, str(tmp_path / "missing.safetensors")), dit_units(3))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 30).flatmap(
        lambda T: st.tuples(
            st.just(T),
            st.lists(st.lists(st.floats(1e-6, 2.0), min_size=4, max_size=4), min_size=T, max_size=T),
            st.floats(0.0, 3.0),
        )
    )
)
def test_block_cache_properties(args):
    T, rows, delta = args
    l1 = np.array(rows)
    l1[0] = np.nan
    names = ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1", "transformer_blocks.1.ff", "transformer_blocks.2.attn1")
    prof = Profile(names, l1)
    units = dit_units(3)
    sched = BlockCache(delta, prof, units=("attention", "transformer_blocks.1.ff"))
    mask = lower(sched, units, T)
    assert mask.num_steps == T and all(mask.table[0])
    plan_of(sched, units, T)  # read-before-write holds
    # every kept run's accumulated change is <= delta, and a refresh happened because it would exceed delta
    for j, name in enumerate(mask.units):
        col = mask.column(name)
        acc = 0.0
        for t in range(1, T):
            acc += prof.column(name)[t]
            if col[t]:
                assert acc > delta
                acc = 0.0
            else:
                assert acc <= delta
    zero = lower(BlockCache(0.0, prof, units=sched.units), units, T)
    assert all(all(r) for r in zero.table)


# ------------------------------------------------------------------------------- Mask
def test_mask_basics_and_validation():
    m = Mask([[1, 0], [True, False]], ["a", "b"])
    assert m.table == ((True, False), (True, False)) and isinstance(m.units, tuple)
    assert hash(m) == hash(Mask(((True, False), (True, False)), ("a", "b")))
    assert Mask.full(["a", "b"], 3).table == ((True, True),) * 3
    full = Mask.full(dit_units(1))
    assert full.periodic and full.table == ((True, True, True),)
    assert Mask.from_steps({"a": [0, 2], "b": [0]}, 3).table == ((True, True), (False, False), (True, False))
    assert "a" in str(m) and "Mask(units=2" in repr(m)
    with pytest.raises(ScheduleError, match="row 1 has 1 entries"):
        Mask([[1, 0], [1]], ["a", "b"])
    with pytest.raises(ScheduleError, match=r"entry 2; allowed entries: True/False"):
        Mask([[1, 2]], ["a", "b"])
    with pytest.raises(ScheduleError, match=r"Mask.units = .*repeated: \['a'\]"):
        Mask([[1, 1]], ["a", "a"])
    with pytest.raises(ScheduleError, match=r"Mask.table = \(\)"):
        Mask((), ["a"])
    with pytest.raises(ScheduleError, match="Mask.periodic = 'yes'"):
        Mask([[1]], ["a"], periodic="yes")


def test_mask_lowering_checks_names_and_steps():
    units = dit_units(2)
    m = Mask([[1, 1], [0, 1]], ["transformer_blocks.0.attn1", "transformer_blocks.1.ff"])
    assert lower(m, units, 2) is m and lower(m, units, None) is m
    with pytest.raises(ScheduleError, match="2 rows but the generation has num_steps = 5"):
        lower(m, units, 5)
    p = Mask([[1, 1], [0, 1]], m.units, periodic=True)
    assert lower(p, units, 5) is p
    bad = Mask([[1]], ["transformer_blocks.0.atn1"])
    with pytest.raises(UnknownUnitError, match=r"'transformer_blocks.0.atn1' \(close: \['transformer_blocks.0.attn1'"):
        lower(bad, units, 1)
    plan_of(m, units, 2)


def test_mask_save_load(tmp_path):
    m = Mask([[1, 1, 0], [0, 1, 1]], ["x", "y", "z"], periodic=True)
    path = m.save(tmp_path / "sub" / "mask.json")
    assert Mask.load(path) == m
    d = json.loads(open(path).read())
    assert d["type"] == "Mask" and d["table"] == ["110", "011"]
    # lists of booleans are accepted on load too
    assert schedule_from_dict({"type": "Mask", "units": ["x"], "table": [[True], [False]]}).table == ((True,), (False,))
    with pytest.raises(ScheduleError, match="expected a Mask"):
        Mask.from_json(FORA(2).to_json())



def test_mask_accepts_numpy_bools():
    table = np.array([[True, False], [False, True]])
    m = Mask(table, ["a", "b"])
    assert m.table == ((True, False), (False, True))
    assert Mask([[np.bool_(True), np.bool_(False)]], ["a", "b"]).table == ((True, False),)
    assert Mask([[np.int64(1), np.uint8(0)]], ["a", "b"]).table == ((True, False),)
    assert Mask(np.array([[1, 0]]), ["a", "b"]).table == ((True, False),)
    with pytest.raises(ScheduleError, match="entry 2"):
        Mask(np.array([[1, 2]]), ["a", "b"])
    with pytest.raises(ScheduleError, match="entry 0.5"):
        Mask(np.array([[0.5, 1.0]]), ["a", "b"])


@pytest.mark.parametrize(
    "content, match",
    [
        (bytes(range(256)), "not UTF-8 text"),
        (b"{", "not valid schedule JSON"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        (b'{"type": ["Mask"], "table": ["1"], "units": ["a"]}', "schedule type"),
        (b'{"type": "Mask", "units": ["a"]}', "needs 'table'"),
        (b'{"type": "Mask", "units": "ab", "table": 5}', "Mask.units"),
        (b'{"type": "Mask", "units": ["a"], "table": [{"x": 1}]}', "row 0"),
        (b'{"type": "Mask", "units": [1], "table": ["1"]}', "Mask.units"),
        (b'{"type": "Mask", "units": ["a"], "table": ["1"], "periodic": "yes"}', "Mask.periodic"),
        (b'{"type": "FORA", "interval": 2}', "holds a FORA"),
    ],
    ids=["binary", "bad-json", "deep", "type-list", "no-table", "wrong-types", "row-dict", "unit-int", "periodic-str",
         "not-a-mask"],
)
def test_mask_load_errors_name_the_file(tmp_path, content, match):
    path = tmp_path / "mask.json"
    path.write_bytes(content)
    with pytest.raises(ScheduleError, match=match) as info:
        Mask.load(path)
    assert str(path) in str(info.value)


def test_mask_load_of_a_directory_or_nothing(tmp_path):
    with pytest.raises(ScheduleError, match="is a directory") as info:
        Mask.load(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ScheduleError, match="no mask at"):
        Mask.load(tmp_path / "missing.json")


def test_schedule_dict_with_missing_or_bad_fields():
    with pytest.raises(ScheduleError, match=r"FORA needs the fields \['interval'\]"):
        schedule_from_dict({"type": "FORA"})
    with pytest.raises(ScheduleError, match=r"schedule type = \['FORA'\] is unknown"):
        schedule_from_dict({"type": ["FORA"]})
    with pytest.raises(ScheduleError, match="BlockCache.profile"):
        schedule_from_dict({"type": "BlockCache", "threshold": 0.1, "profile": {"units": 3}})

# -------------------------------------------------------------------------- rectify
def test_rectify_hand_made_4x3():
    m = Mask(
        [
            [1, 1, 1],
            [1, 1, 0],
            [1, 1, 1],
            [1, 0, 1],
        ],
        ["b0", "b1", "b2"],
    )
    expected = (
        (True, True, True),  # step 0 fills every cache
        (False, False, False),  # b1: b2 reuses at 1 and b1 recomputes at 2 -> 0; then b0 the same (cascade)
        (True, True, True),
        (False, False, True),  # last step: b1 reuses, nobody reads b0's cache afterwards -> 0
    )
    assert rectify(m).table == expected
    # the next step reads block b's cache -> kept (b0 at step 2 feeds a reuse at step 3)
    m2 = Mask([[1, 1, 1], [1, 1, 1], [1, 0, 1], [0, 0, 1]], ["b0", "b1", "b2"])
    assert rectify(m2).table == ((True,) * 3, (True,) * 3, (True, False, True), (False, False, True))
    # order: the chain may be given explicitly; units outside it are untouched
    m3 = Mask([[1, 1, 1], [1, 0, 1]], ["b1", "b0", "x"])
    assert rectify(m3, order=["b1", "b0"]).table == ((True, True, True), (False, False, True))
    with pytest.raises(ScheduleError, match="close"):
        rectify(m3, order=["b1", "b00"])


def test_rectify_periodic_keeps_row_0():
    m = Mask([[1, 1], [1, 0], [1, 0]], ["a", "b"], periodic=True)
    # step 2 wraps to row 0 (recompute) and b reuses at 2 -> a is not needed at 2. At step 1, a's
    # value is then read from cache at step 2 (m[2, a] = 0 now), so the paper's rule keeps it.
    assert rectify(m).table == ((True, True), (True, False), (False, False))


mask_tables = st.integers(1, 8).flatmap(
    lambda B: st.integers(1, 10).flatmap(
        lambda T: st.tuples(
            st.lists(st.lists(st.booleans(), min_size=B, max_size=B), min_size=T, max_size=T), st.booleans()
        )
    )
)


@settings(max_examples=200, deadline=None)
@given(mask_tables)
def test_rectify_idempotent_and_monotone(args):
    rows, periodic = args
    units = [f"transformer_blocks.{i}" for i in range(len(rows[0]))]
    m = Mask(rows, units, periodic=periodic)
    r = rectify(m)
    assert rectify(r) == r
    assert all(not (new and not old) for ro, rn in zip(m.table, r.table) for old, new in zip(ro, rn))
    # a valid mask (everything computed at step 0) stays a valid plan
    valid = Mask([[True] * len(units)] + [list(x) for x in rows[1:]], units, periodic=periodic)
    infos = [UnitInfo(n, "transformer_block", flops=1, index=i) for i, n in enumerate(units)]
    Plan(infos, rectify(valid).table, periodic=periodic, full_flops=10)


# ---------------------------------------------------------------------- LearnedMask
def test_learned_mask():
    lm = LearnedMask(lambda_sparsity=0.05, iters=10)
    assert lm.threshold == 0.5 and lm.units == "transformer_block"
    with pytest.raises(ScheduleError, match=r"fxcache.learn_mask\(.*returns a Mask"):
        lower(lm, dit_units(2), 10)
    with pytest.raises(ScheduleError, match=r"LearnedMask.threshold = 1.5 .*<= 1.0"):
        LearnedMask(threshold=1.5)
    with pytest.raises(ScheduleError, match="LearnedMask.iters = 0"):
        LearnedMask(iters=0)
    with pytest.raises(ScheduleError, match="LearnedMask.lr = 0"):
        LearnedMask(lr=0)


# ------------------------------------------------------------------- registry & JSON
def test_unknown_schedule_type():
    with pytest.raises(ScheduleError, match=r"type int has no lowering; allowed schedule types: \[.*'DeepCache'"):
        lower(3, dit_units(1))
    with pytest.raises(ScheduleError, match=r"schedule type = 'Nope' is unknown; allowed types"):
        schedule_from_dict({"type": "Nope"})
    with pytest.raises(ScheduleError, match=r"FORA has no fields \['period'\]; its fields are \['interval'\]"):
        schedule_from_dict({"type": "FORA", "period": 2})


def test_register_lowering_dispatches_on_type():
    class EveryOther:
        pass

    @register_lowering(EveryOther)
    def _lower(s, units, num_steps):
        names = tuple(u.name for u in units if u.kind == "transformer_block")
        return Mask(((True,) * len(names), (False,) * len(names)), names, periodic=True)

    try:
        assert lower(EveryOther(), dit_units(2)).units == ("transformer_blocks.0", "transformer_blocks.1")
    finally:
        from fxcache.schedules import registry

        registry._LOWERINGS.pop(EveryOther)


def all_schedules(profile: Profile, path: str, scale_shift: str):
    return [
        DeepCache(interval=3, branch=1),
        DeepCache(interval=4, branch=0, uniform=False, center=5.0, power=1.3, num_steps=40),
        FORA(interval=2),
        BlockCache(0.3, profile),
        BlockCache(0.3, path, units=("attention", "transformer_blocks.0.ff"), scale_shift=scale_shift),
        LearnedMask(lambda_bimodal=0.2, units=("transformer_blocks.0", "transformer_blocks.1"), num_steps=20),
        Mask([[1, 0], [0, 1]], ["a", "b"]),
    ]


def test_json_round_trip_every_schedule(tmp_path):
    prof = synthetic_profile()
    path = prof.save(tmp_path / "p.safetensors")
    # a BlockCache reads the checkpoint it names when it is built: a real (untrained) one
    from fxcache.calibrate.scale_shift import ScaleShift

    ss = ScaleShift({"transformer_blocks.0.attn1": [((1, 4, 6), "float32")]}, 3, temb_module="t")
    for s in all_schedules(prof, path, ss.save(tmp_path / "ss.safetensors")):
        text = s.to_json()
        json.loads(text)  # strict JSON (no NaN)
        back = schedule_from_json(text)
        assert back == s and type(back) is type(s), s
        assert schedule_from_dict(s.to_dict()) == s
        assert hash(back) == hash(s)


# ---------------------------------------------------------------------------- Profile
def test_profile_save_load_plot(tmp_path):
    prof = synthetic_profile()
    path = prof.save(tmp_path / "prof.safetensors")
    back = Profile.load(path)
    assert back == prof and back.num_steps == 8 and back.meta == {"model": "fake", "seeds": [0, 1]}
    assert np.isnan(back.l1rel[0]).all() and back.timesteps[0] == 999
    with open(path, "rb") as f:
        assert b"pickle" not in f.read(200)
    assert Profile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof
    png = tmp_path / "prof.png"
    fig = prof.plot(png, units=["transformer_blocks.0.attn1", "transformer_blocks.2.attn1"])
    assert png.stat().st_size > 1000 and len(fig.axes) == 2
    many = Profile(tuple(f"u{i}" for i in range(20)), np.random.default_rng(0).random((6, 20)))
    many.plot(tmp_path / "heat.png")
    assert (tmp_path / "heat.png").exists()
    assert prof.select(["transformer_blocks.2.attn1"]).l1rel.shape == (8, 1)


def test_profile_validation(tmp_path):
    with pytest.raises(ProfileError, match=r"Profile.l1rel has shape \(3, 2\); expected .*num_units = 3"):
        Profile(("a", "b", "c"), np.zeros((3, 2)))
    with pytest.raises(ProfileError, match="negative"):
        Profile(("a",), np.array([[0.0], [-1.0]]))
    with pytest.raises(ProfileError, match=r"Profile.cosine has shape \(2, 2\)"):
        Profile(("a",), np.zeros((2, 1)), cosine=np.zeros((2, 2)))
    with pytest.raises(ProfileError, match="repeated"):
        Profile(("a", "a"), np.zeros((2, 2)))
    with pytest.raises(ProfileError, match="JSON-serialisable"):
        Profile(("a",), np.zeros((2, 1)), meta={"x": object()})
    with pytest.raises(ProfileError, match=r"unit 'b' is not in this profile"):
        Profile(("a",), np.zeros((2, 1))).column("b")
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not an fxcache profile"):
        Profile.load(tmp_path / "other.safetensors")
    prof = Profile(("a",), np.zeros((2, 1)))
    with pytest.raises(ValueError):
        prof.l1rel[0, 0] = 1.0  # arrays are read-only


# ---------------------------------------------------------------- every mask is a Plan
@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["deepcache", "deepcache_nu", "fora"]),
    N=st.integers(1, 10),
    T=st.integers(1, 60),
    branch=st.integers(0, 2),
)
def test_every_lowered_mask_is_a_valid_plan(kind, N, T, branch):
    if kind == "deepcache":
        sched, units = DeepCache(interval=N, branch=branch), unet_units()
    elif kind == "deepcache_nu":
        sched, units = DeepCache(interval=N, branch=branch, uniform=False), unet_units()
    else:
        sched, units = FORA(N), (dit_units(3) if branch == 0 else flux_units() if branch == 1 else unet_units())
    plan = plan_of(sched, units, T)
    assert plan.planned_flops <= plan.full_flops * plan.num_steps
    mask = lower(sched, units, T)
    assert mask.periodic == (kind != "deepcache_nu")
    assert all(mask.table[0])
