"""What a wheel holds: pyproject's explicit package list against the source tree."""

import tomllib

from helpers.paths import ROOT


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_in_the_source_tree_is_in_the_wheel():
    listed = set(_config()["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "fastsae").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert on_disk, "no package found under fastsae/"
    missing = sorted(on_disk - listed)
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}: a wheel would not ship them"


def test_every_listed_package_exists():
    config = _config()
    mapped = config.get("package-dir", {})
    for package in config["packages"]:
        folder = ROOT / mapped.get(package, package.replace(".", "/"))
        assert folder.is_dir(), f"pyproject.toml lists {package}, but {folder} does not exist"


def test_the_wheel_version_is_the_package_version():
    from fastsae.version import __version__

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == __version__
