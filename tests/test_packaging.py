"""What pyproject declares is what is tested, and the package ships its type marker."""

import pathlib
import re
import tomllib

import fxcache

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pins() -> dict:
    pins = {}
    for line in (ROOT / "scripts" / "constraints.txt").read_text().splitlines():
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)==([^\s#]+)\s*(#.*)?", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_declared_floors_are_the_pinned_versions_ci_installs():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for d in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([^,<\s]+).*", d)
        if m:
            floors[m.group(1).lower()] = m.group(2)
    pins = _pins()
    for name in ("torch", "diffusers"):
        assert name in pins, f"{name} is not pinned in scripts/constraints.txt"
        assert floors.get(name) == pins[name].split("+")[0], (name, floors.get(name), pins[name])


def test_py_typed_ships():
    pkg = pathlib.Path(fxcache.__file__).parent
    assert (pkg / "py.typed").is_file()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in data.get("fxcache", [])


def test_public_signatures_are_typed():
    import inspect

    for fn in (fxcache.compile, fxcache.enable, fxcache.plan_for, fxcache.attach):
        sig = inspect.signature(fn)
        assert sig.parameters["schedule"].annotation is not inspect.Parameter.empty, fn.__name__
    assert "ScaleShift" in str(inspect.signature(fxcache.compile).parameters["scale_shift"].annotation)


def test_every_subpackage_and_its_data_is_declared():
    """A folder of fxcache with an ``__init__.py`` that pyproject's explicit ``packages``
    list leaves out is missing from the wheel (fxcache.runtime and fxcache.artefacts were);
    so is a data file no ``package-data`` pattern covers (the published configs)."""
    import fnmatch

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    pkg = ROOT / "fxcache"
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in pkg.rglob("__init__.py")}
    assert found == set(tool["packages"]), sorted(found ^ set(tool["packages"]))
    for package in ("fxcache.configs", "fxcache.models"):
        folder = ROOT.joinpath(*package.split("."))
        for f in folder.glob("*.json"):
            assert any(fnmatch.fnmatch(f.name, pat) for pat in tool["package-data"].get(package, [])), f
