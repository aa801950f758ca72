"""What starting octavcal imports: ``import octavcal``, the command line and every ``--help`` without torch.

Properties, not timings (those are in benchmarks/bench_startup.py). What is imported is checked in a fresh
interpreter, since this test process has imported torch long before.
"""

import json
import subprocess
import sys
import types

import pytest

import octavcal

HEAVY = ("torch", "numpy", "rich", "safetensors", "tqdm")


def python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def heavy_after(code: str) -> list[str]:
    """The HEAVY modules imported once ``code`` has run in a fresh interpreter."""
    out = python(
        f"{code}\nimport json, sys; print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    return json.loads(out.splitlines()[-1])


def test_import_octavcal_and_its_version_import_no_torch():
    assert heavy_after("import octavcal; octavcal.__version__; dir(octavcal)") == []


def test_every_help_imports_no_torch():
    code = """
import click, contextlib, io
from octavcal.cli import main

def paths(group, prefix):
    yield prefix
    for name, command in group.commands.items():
        yield from paths(command, [*prefix, name]) if isinstance(command, click.Group) else [[*prefix, name]]

for args in [*([*path, "--help"] for path in paths(main, [])), ["--version"]]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(args, standalone_mode=False) == 0 and out.getvalue(), args
"""
    assert heavy_after(code) == []


def test_python_dash_m_help_imports_no_torch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "octavcal", "calibrate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--methods" in result.stdout, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "octavcal.cli.commands" in imported  # the check sees the command line's own imports
    assert not imported & set(HEAVY)


def test_a_command_imports_what_it_uses_when_it_runs(tmp_path):
    missing = str(tmp_path / "missing.safetensors")
    code = f"""
import sys
from octavcal.cli import main
try:
    main(["inspect", {missing!r}], standalone_mode=False)
except SystemExit as exit:
    assert exit.code == 1 and "torch" in sys.modules, exit.code
"""
    assert {"rich", "safetensors", "torch"} <= set(heavy_after(code))  # (torch itself imports tqdm)


def test_lazy_names_are_the_public_api():
    exported = {name for names in octavcal._EXPORTS.values() for name in names}
    assert exported | {"__version__"} == set(octavcal.__all__)
    assert set(octavcal.__all__) <= set(dir(octavcal))
    for name in octavcal.__all__:
        assert getattr(octavcal, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'calibrat'"):
        octavcal.calibrat  # noqa: B018


@pytest.mark.parametrize("name", ["calibrate", "compare", "evaluate", "octav"])
def test_a_submodule_never_hides_the_function_of_its_name(name):
    # octavcal.octav is a module and a function: importing the module first must leave the function.
    code = (
        f"import octavcal.{name}, types\n"
        f"from octavcal import {name}\n"
        f"import octavcal\n"
        f"assert callable({name}) and not isinstance({name}, types.ModuleType), {name}\n"
        f"assert octavcal.{name} is {name}\n"
    )
    python(code)
    assert isinstance(sys.modules[f"octavcal.{name}"], types.ModuleType)
    assert callable(getattr(octavcal, name)) and not isinstance(getattr(octavcal, name), types.ModuleType)


def test_help_defaults_are_the_library_defaults():
    from octavcal.calibrate import CalibrationConfig
    from octavcal.defaults import DEFAULT_METHODS

    assert CalibrationConfig().methods == DEFAULT_METHODS
