"""fxcache's artefacts on disk: one reader and one writer for all of them.

An artefact (a :class:`~fxcache.artefacts.Profile`, a
:class:`~fxcache.rewrite.adapters.ScaleShift` checkpoint) is one ``.safetensors``
file: its arrays as tensors, and a JSON header in the file's metadata under one key
(``"fxcache.profile"``, ``"fxcache.scale_shift"``). No pickle anywhere.

:func:`read_artefact` reads the header and the *declared* dtype and shape of every
tensor, not the tensors (safetensors itself checks that each tensor's bytes fit its
shape and the file). A loader checks the header's fields and what they declare against
the stored shapes first, and only then reads the tensors it needs
(:meth:`Artefact.load`): a damaged or hostile file cannot make fxcache allocate anything
sized from its metadata. Every problem is a :class:`~fxcache.errors.CheckpointError`
naming the file and what is wrong.

Also here, because the schedules read them without torch: the scale-shift checkpoint's
header (:func:`read_scale_shift`) and the comparison of the table adapters were
trained for with the table they are used with (:func:`check_trained_table`).
No torch in this module, and no import of any other fxcache stage: the artefacts sit
below the schedules, the rewrite and calibration, which all read them.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

from ..errors import ArtefactMismatchError, CheckpointError

__all__ = [
    "Artefact",
    "read_artefact",
    "write_artefact",
    "atomic_path",
    "write_text_atomic",
    "read_scale_shift",
    "check_trained_table",
    "describe_schedule",
    "feature_channels",
    "adapter_key",
    "SCALE_SHIFT_KEY",
    "SCALE_SHIFT_VERSION",
]

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
SCALE_SHIFT_KEY = "fxcache.scale_shift"
SCALE_SHIFT_VERSION = 1
_MISSING = object()
_DAMAGED = "the file is damaged or was not written by fxcache: write it again"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Artefact:
    """The header of an artefact file and the declared ``(dtype, shape)`` of its tensors
    (safetensors dtype names: ``"F32"``, ``"I64"``...). Nothing is loaded yet."""

    path: str
    what: str
    key: str
    header: dict
    tensors: Mapping[str, tuple[str, tuple[int, ...]]]

    def error(self, problem: str, fix: str = "") -> CheckpointError:
        return CheckpointError(f"{self.what} '{self.path}': {problem}" + (f"; {fix}" if fix else ""))

    def field(self, name: str, valid: Callable[[Any], bool], expected: str, *, default: Any = _MISSING) -> Any:
        """Header field ``name``, checked with ``valid``; absent: ``default`` (or an error)."""
        if name not in self.header:
            if default is not _MISSING:
                return default
            raise self.error(f"its '{self.key}' metadata has no field '{name}'", _DAMAGED)
        value = self.header[name]
        if not valid(value):
            raise self.error(f"metadata field '{name}' = {_short(value)} is not {expected}", _DAMAGED)
        return value

    def tensor(self, name: str, shape: tuple[int, ...] | None = None, *, dtypes: Iterable[str] = FLOAT_DTYPES,
               why: str = "") -> tuple[int, ...]:
        """The stored shape of tensor ``name``, after checking it exists, has one of
        ``dtypes`` and (when given) the expected ``shape``."""
        if name not in self.tensors:
            raise self.error(f"it has no tensor '{name}'", _DAMAGED)
        dtype, stored = self.tensors[name]
        dtypes = tuple(dtypes)
        if dtype not in dtypes:
            raise self.error(f"tensor '{name}' has dtype {dtype}; expected one of {list(dtypes)}")
        if shape is not None and tuple(stored) != tuple(shape):
            raise self.error(f"tensor '{name}' has shape {tuple(stored)}; expected {tuple(shape)}{why}")
        return tuple(stored)

    def load(self, names: Iterable[str], framework: str = "np") -> dict:
        """Read the tensors ``names`` (``framework``: ``"np"`` or ``"pt"``, on the CPU)."""
        from safetensors import safe_open

        names = list(names)
        unknown = [n for n in names if n not in self.tensors]
        if unknown:
            raise self.error(f"it has no tensors {unknown}")
        try:
            with safe_open(self.path, framework=framework, device="cpu") as f:
                return {n: f.get_tensor(n) for n in names}
        except Exception as exc:  # safetensors raises its own error types
            raise self.error(f"its tensors cannot be read ({exc})", "the file is damaged: write it again") from None


def read_artefact(
    path: Any,
    *,
    key: str,
    what: str,
    version: int | None = None,
    missing_hint: str = "",
    content: str | None = None,
) -> Artefact:
    """The header under metadata ``key`` and the declared tensors of the artefact at
    ``path``. ``what`` names the artefact in errors (``"profile"``); ``version``: the
    header's ``"version"`` must equal it; ``missing_hint``: what to do when there is no
    file; ``content``: what the file would be if it had the key (default ``an fxcache {what}``)."""
    from safetensors import safe_open

    try:
        path = os.fspath(path)
    except TypeError:
        raise CheckpointError(f"the path of a {what} must be a str or os.PathLike; got {type(path).__name__}") from None
    if not os.path.exists(path):
        raise CheckpointError(f"no {what} at '{path}'" + (f"; {missing_hint}" if missing_hint else ""))
    if os.path.isdir(path):
        raise CheckpointError(f"{what} '{path}' is a directory; give the .safetensors file itself")
    try:
        with safe_open(path, framework="np") as f:
            metadata = dict(f.metadata() or {})
            tensors = {}
            for name in f.keys():
                sl = f.get_slice(name)
                tensors[name] = (str(sl.get_dtype()), tuple(int(d) for d in sl.get_shape()))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(
            f"{what} '{path}' is not a readable safetensors file ({exc}); give a file fxcache wrote"
        ) from None
    if key not in metadata:
        raise CheckpointError(
            f"{what} '{path}': the file has no '{key}' metadata: it is a safetensors file but not "
            f"{content or 'an fxcache ' + what}"
        )
    try:
        header = json.loads(metadata[key])
    except RecursionError:
        header = _MISSING
        problem = "is nested too deeply"
    except ValueError as exc:
        header = _MISSING
        problem = f"is not valid JSON ({exc})"
    else:
        problem = "" if isinstance(header, dict) else f"is not a JSON object (it holds a {type(header).__name__})"
    art = Artefact(path, what, key, header if isinstance(header, dict) else {}, tensors)
    if problem:
        raise art.error(f"its '{key}' metadata {problem}", _DAMAGED)
    if version is not None:
        v = header.get("version")
        if type(v) is not int or v != version:
            raise art.error(f"it has format version {_short(v)}; this fxcache reads version {version}")
    return art


@contextlib.contextmanager
def atomic_path(path: Any) -> Iterator[str]:
    """A temporary path to write instead of ``path``: in the same folder (so the final
    ``os.replace`` stays on one filesystem and is atomic) with the same extension (so a
    writer that picks the format from the name, PIL or matplotlib, still does). When the
    block ends without error the file is flushed to disk and moved onto ``path``;
    otherwise it is removed. A failed write leaves the previous file as it was (or no
    file), never a truncated one. A symbolic link is written through (its target is
    replaced, the link stays). The folder must exist."""
    path = os.fspath(path)
    if os.path.islink(path):
        path = os.path.realpath(path)
    folder, name = os.path.split(path)
    root, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{root}.{os.getpid()}-{threading.get_ident()}.tmp{ext}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_text_atomic(path: Any, text: str, encoding: str = "utf-8") -> str:
    """Write ``text`` to ``path`` through :func:`atomic_path`; returns the path as given."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)
    return os.fspath(path)


def write_artefact(path: Any, *, key: str, header: dict, tensors: Mapping[str, Any], framework: str = "np") -> str:
    """Write ``tensors`` (numpy arrays or torch tensors, per ``framework``) and ``header``
    as JSON under metadata ``key``; parent folders are created. The file is written
    beside its final name and moved into place (:func:`atomic_path`), so a failed write
    leaves no truncated file."""
    if framework == "pt":
        from safetensors.torch import save_file
    else:
        from safetensors.numpy import save_file
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    text = json.dumps(header)
    with atomic_path(path) as tmp:
        save_file(dict(tensors), tmp, metadata={key: text})
    return path


# ---------------------------------------------------------------------- scale-shift
def adapter_key(unit: str, k: int = 0) -> str:
    """ModuleDict key of the adapter of output ``k`` of ``unit``: dots (never in a key)
    become ``-`` (never in a module path), so keys are unique; ``:k`` names the output."""
    return f"{unit.replace('.', '-')}:{int(k)}"


def feature_channels(shape: Any) -> int | None:
    """Channels of a unit output: dim 1 of ``(B, C, *spatial)`` (4-D and more), the last of
    ``(B, *tokens, C)`` / ``(B, C)`` (2-D, 3-D); None below 2-D."""
    shape = tuple(shape)
    if len(shape) >= 4:
        return int(shape[1])
    if len(shape) in (2, 3):
        return int(shape[-1])
    return None


def _is_int(x: Any, minimum: int = 0) -> bool:
    return type(x) is int and x >= minimum


def _is_name_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v) and len(set(v)) == len(v)


def read_scale_shift(path: Any, parse_mask: Callable[[dict], Any] | None = None) -> Artefact:
    """The header of a scale-shift checkpoint, every field checked, and every tensor the
    header declares checked against the stored shape (``linears.{key}.weight``:
    ``(2 C, temb_dim)``, ``.bias``: ``(2 C,)``); nothing else may be stored."""
    art = read_artefact(
        path,
        key=SCALE_SHIFT_KEY,
        what="scale-shift checkpoint",
        version=SCALE_SHIFT_VERSION,
        missing_hint="train one with train_scale_shift(..., checkpoint=path)",
        content="fxcache scale-shift adapters",
    )
    units = art.field("units", _is_name_list, "a non-empty list of unique unit names")
    shapes = art.field("out_shapes", lambda v: isinstance(v, dict), "a JSON object {unit: [[shape, dtype], ...]}")
    art.field("model_class", lambda v: isinstance(v, str), "a class name (str)", default="")
    art.field("temb_module", lambda v: isinstance(v, str) and bool(v), "a module path (non-empty str)")
    temb_dim = art.field("temb_dim", lambda v: _is_int(v, 1), "an integer >= 1")
    art.field("num_steps", lambda v: v is None or _is_int(v, 1), "an integer >= 1 or null", default=None)
    art.field("schedule", lambda v: v is None or isinstance(v, dict), "a schedule's JSON object or null", default=None)
    mask = art.field("mask", lambda v: v is None or isinstance(v, dict), "a Mask's JSON object or null", default=None)
    if mask is not None and parse_mask is not None:
        # the schedules know what a valid Mask is; they sit above this module
        try:
            parse_mask(mask)
        except ValueError as exc:
            raise art.error(f"metadata field 'mask' is not a valid Mask ({exc})") from None
    extra = sorted(set(shapes) - set(units))
    if extra:
        raise art.error(f"metadata field 'out_shapes' has units {extra[:6]} that 'units' does not list")
    expected: dict[str, tuple[tuple[int, ...], str]] = {}
    for unit in units:
        outs = shapes.get(unit)
        if not isinstance(outs, list) or not outs:
            raise art.error(f"metadata field 'out_shapes' has no entry for unit '{unit}'")
        for k, entry in enumerate(outs):
            ok = (
                isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
                and all(_is_int(d) for d in entry[0]) and isinstance(entry[1], str)
            )
            if not ok:
                raise art.error(
                    f"metadata field 'out_shapes': output {k} of unit '{unit}' is {_short(entry)}, not [shape, dtype]"
                )
            channels = feature_channels(entry[0])
            if channels is None or channels < 1:
                raise art.error(
                    f"metadata field 'out_shapes': output {k} of unit '{unit}' has shape {tuple(entry[0])}; an "
                    f"adapted output has 2 dimensions or more and at least one channel"
                )
            key = adapter_key(unit, k)
            declared = f"unit '{unit}' output {k} with {channels} channels and temb_dim {temb_dim}"
            expected[f"linears.{key}.weight"] = ((2 * channels, temb_dim), declared)
            expected[f"linears.{key}.bias"] = ((2 * channels,), declared)
    undeclared = sorted(set(art.tensors) - set(expected))
    if undeclared:
        raise art.error(f"it stores tensors its metadata does not declare: {undeclared[:6]}")
    for name, (shape, declared) in expected.items():
        if name not in art.tensors:
            raise art.error(f"its metadata declares {declared}, but the file has no tensor '{name}'")
        dtype, stored = art.tensors[name]
        if stored != shape:
            raise art.error(
                f"its metadata declares {declared}, so tensor '{name}' of shape {shape}, but the file stores "
                f"{stored}", "the file is damaged: train and save the adapters again"
            )
        if dtype not in FLOAT_DTYPES:
            raise art.error(f"tensor '{name}' has dtype {dtype}; expected one of {list(FLOAT_DTYPES)}")
    return art


# ------------------------------------------------------------------- trained tables
def describe_schedule(d: Any) -> str:
    """``BlockCache(threshold=0.25, units=['a'], profile=...)`` from a schedule's dict."""
    if not isinstance(d, dict):
        return "an unrecorded schedule"
    parts = []
    for k, v in d.items():
        if k in ("type", "scale_shift", "table"):
            continue
        parts.append(f"{k}={'<inline>' if isinstance(v, dict) else _short(v, 40)}")
    return f"{d.get('type', 'schedule')}({', '.join(parts)})"


def _columns(d: dict, num_steps: int) -> dict[str, tuple[bool, ...]]:
    rows = [[c == "1" for c in r] if isinstance(r, str) else [bool(v) for v in r] for r in d["table"]]
    if d.get("periodic"):
        rows = [rows[s % len(rows)] for s in range(num_steps)]
    return {u: tuple(r[i] for r in rows) for i, u in enumerate(d["units"])}


def _steps(col: Iterable[bool], value: bool) -> list[int]:
    return [s for s, v in enumerate(col) if v == value]


def check_trained_table(
    trained: dict, num_steps: int | None, given: dict, *, where: str = "", trained_for: str = ""
) -> None:
    """Raise :class:`~fxcache.errors.ArtefactMismatchError` unless the table ``given`` (a
    Mask's dict) is the table ``trained`` (the Mask dict adapters were trained for, over
    ``num_steps`` steps) on every unit that either reuses. ``where`` names what is
    checked (a schedule and a checkpoint file); ``trained_for`` describes the schedule
    the adapters were trained for."""
    n = num_steps or len(trained["table"])
    head = f"{where}: " if where else ""
    tail = f" (the adapters were trained for {trained_for})" if trained_for else ""
    fix = ": train adapters for this schedule"
    if not given.get("periodic") and len(given["table"]) != n:
        raise ArtefactMismatchError(
            f"{head}the schedule covers {len(given['table'])} steps but these scale-shift adapters were "
            f"trained for {n} steps{tail}{fix}"
        )
    mine, theirs = _columns(trained, n), _columns(given, n)
    for unit, col in theirs.items():
        if False not in col:
            continue  # always computed: never reads a cache
        if unit not in mine:
            raise ArtefactMismatchError(
                f"{head}the schedule reuses unit '{unit}' (at steps {_steps(col, False)}) but these scale-shift "
                f"adapters were trained for a schedule without it (units {list(mine)}){tail}{fix}"
            )
    for unit in sorted(set(mine) | set(theirs), key=lambda u: (u not in theirs, u)):
        a, b = mine.get(unit, (True,) * n), theirs.get(unit, (True,) * n)
        if a != b:
            raise ArtefactMismatchError(
                f"{head}the schedule computes unit '{unit}' at steps {_steps(b, True)}, but these scale-shift "
                f"adapters were trained with it computed at steps {_steps(a, True)} (another schedule){tail}{fix}"
            )
