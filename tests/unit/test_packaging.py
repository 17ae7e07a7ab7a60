"""The package list in pyproject.toml must name every package, or a wheel install misses code."""

from pathlib import Path
import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT / "services").parts)
        for init in (ROOT / "services").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    found.add("tastemaker_bench")
    assert found - listed == set(), f"add these packages to pyproject.toml: {sorted(found - listed)}"
    assert listed - found == set(), f"pyproject.toml lists packages that do not exist: {sorted(listed - found)}"


def _constraints() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name.split("[")[0])] = version
    return pins


def _project_requirements():
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"] + project["optional-dependencies"]["dev"]:
        yield Requirement(text)


def test_every_dependency_is_pinned_and_the_pin_satisfies_pyproject():
    """A fresh `make` installs with -c constraints.txt: every direct dependency (and the dev extra)
    must be pinned there, to a version pyproject's range allows, or two installs drift apart."""
    from packaging.utils import canonicalize_name

    pins = _constraints()
    for requirement in _project_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not pinned in constraints.txt; run scripts/lock-deps.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement}"
        )


def test_the_installed_environment_is_the_locked_one():
    """What the tests run against is what constraints.txt names (a stale .venv fails here)."""
    from importlib import metadata

    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = _constraints()
    mismatched = []
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in pins and Version(dist.version).public != Version(pins[name]).public:
            mismatched.append(f"{name}: installed {dist.version}, locked {pins[name]}")
    assert not mismatched, "; ".join(mismatched) + " (run `make clean test` or scripts/lock-deps.sh)"
