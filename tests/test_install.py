"""`pip install .` gives a working library and command lines, with the repository nowhere on the path.

The package is built from a copy of the sources into a fresh virtual environment. Its runtime
dependencies are the ones already installed here (a `.pth` file points at this interpreter's
site-packages), so nothing is downloaded; what is tested is the project's own packaging: the
declared package set, that the CLIs run without PYTHONPATH, and that `gmod_jax.load` reads a
checkpoint from outside the repository directory.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gmod_jax
from gmod_jax import config as C
from gmod_jax.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("gmod_jax", "train", "convert", "demo", "bench", "pyproject.toml", "requirements.txt", "README.md")


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_then_cli_and_load_outside_the_repo(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                        if (ROOT / name).is_dir() else {}))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    venv_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    Path(venv_site, "_deps_from_test_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", str(src)], capture_output=True, text=True, cwd=tmp_path, env=_clean_env())
    assert install.returncode == 0, install.stdout + install.stderr

    config = C.tiny()
    save_checkpoint(tmp_path / "ckpt", gmod_jax.init_random(config).params, config)
    work = tmp_path / "elsewhere"
    work.mkdir()
    for module in ("train", "convert", "convert.to_hf", "gmod_jax.generate", "gmod_jax.eval", "demo", "demo.ablation",
                   "bench", "gmod_jax.arank"):
        proc = subprocess.run([str(python), "-m", module, "--help"], capture_output=True, text=True, cwd=work,
                              env=_clean_env(), timeout=300)
        assert proc.returncode == 0, f"python -m {module} --help: {proc.stderr[-2000:]}"
        assert "usage" in proc.stdout.lower(), module

    script = textwrap.dedent(f"""
        import numpy as np
        import gmod_jax, train, convert
        for pkg in (gmod_jax, train, convert):
            assert {str(ROOT)!r} not in pkg.__file__, pkg.__file__
            assert {str(venv)!r} in pkg.__file__, pkg.__file__
        model = gmod_jax.load({str(tmp_path / 'ckpt')!r})
        logits = model.logits(np.ones((1, 5), np.int32))
        assert logits.shape == (1, 5, model.config.text.vocab_size), logits.shape
        try:
            import tests
        except ImportError:
            pass
        else:
            raise AssertionError("the test suite was installed: " + tests.__file__)
        print("ok")
        """)
    proc = subprocess.run([str(python), "-c", script], capture_output=True, text=True, cwd=work, env=_clean_env(),
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
