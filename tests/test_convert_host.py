"""The converter command lines keep JAX (imported by Orbax) on the CPU backend unless told, and
exit without the interpreter's shutdown collections."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

from convert.host import keep_jax_on_host, run_cli


def test_selects_cpu_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    keep_jax_on_host()
    assert os.environ["JAX_PLATFORMS"] == "cpu"
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    keep_jax_on_host()
    assert os.environ["JAX_PLATFORMS"] == "cuda"


@pytest.mark.parametrize("module", ["convert", "convert.to_hf", "convert.to_mod"])
def test_every_cli_entry_point_calls_it(module):
    """Each command's `__main__` block runs it before `main` (and the library import does not)."""
    code = (f"import os, runpy; os.environ.pop('JAX_PLATFORMS', None); import {module}; "
            "assert 'JAX_PLATFORMS' not in os.environ, 'import changed the environment'; "
            "import sys; sys.argv = ['x', '--help']\n"
            f"try:\n    runpy.run_module({module!r}, run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print(os.environ.get('JAX_PLATFORMS'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "cpu"


def test_run_cli_exits_with_mains_status_after_freezing_the_heap(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    seen = {}

    def main():
        seen["platforms"] = os.environ.get("JAX_PLATFORMS")
        return 2

    try:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main)
        assert exit_info.value.code == 2
        assert seen["platforms"] == "cpu"  # set before main ran
        assert gc.get_freeze_count() > 0  # the shutdown collections will skip these objects
    finally:
        gc.unfreeze()  # give the test process its collector back
