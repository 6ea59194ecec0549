"""The converter command lines keep JAX (imported by Orbax) on the CPU backend unless told."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from convert.host import keep_jax_on_host


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
