"""What fxcache reads and writes on disk, below every stage that uses it.

- :mod:`.store`: one reader and one writer for every artefact (``.safetensors`` with a
  JSON header, no pickle), and the scale-shift checkpoint's header checks.
- :mod:`.profile`: :class:`Profile`, the per-step change of each unit's output.

This package imports nothing from the other fxcache stages (only :mod:`fxcache.errors`),
so the schedules, the rewrite, calibration and the runtime can all read artefacts
without importing each other.
"""

from .profile import Profile, ProfileError
from .store import (
    SCALE_SHIFT_KEY,
    SCALE_SHIFT_VERSION,
    Artefact,
    adapter_key,
    atomic_path,
    check_trained_table,
    describe_schedule,
    feature_channels,
    read_artefact,
    read_scale_shift,
    write_artefact,
    write_text_atomic,
)

__all__ = [
    "Profile",
    "ProfileError",
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
