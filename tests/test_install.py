"""What a fresh install depends on: numba's cache outside the installed package, and the server's packages
installed with the tool."""

import glob
import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "llamalora")
COMPILE_ONE_KERNEL = ("import numpy as np\n"
                      "from llamalora import kernels\n"
                      "from llamalora.options import kernels_cached\n"
                      "kernels.quantize(kernels.GGMLType.Q8_0, np.ones((1, 32), np.float32))\n"
                      "print(kernels_cached())\n")


def run_python(code: str, env: dict) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def package_cache_files() -> set:
    return set(glob.glob(os.path.join(PACKAGE, "**", "*.nb[ic]"), recursive=True))


def test_kernels_are_cached_in_the_per_user_cache_folder(tmp_path):
    """An uninstall removes the package's own files only: a cache inside site-packages/llamalora outlives it and
    turns the folder into a namespace package that shadows the next install."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    before = package_cache_files()
    assert run_python(COMPILE_ONE_KERNEL, env) == "True"
    assert glob.glob(str(tmp_path / "xdg" / "llamalora" / "kernels_*" / "q8_0.quantize_rows-*.nbi"))
    assert package_cache_files() <= before  # nothing new inside the package
    env.pop("XDG_CACHE_HOME")
    env["HOME"] = str(tmp_path / "home")
    assert run_python("import llamalora, numba; print(numba.config.CACHE_DIR)", env) == \
        str(tmp_path / "home" / ".cache" / "llamalora")


def test_numba_cache_dir_still_wins(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "mine"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert run_python(COMPILE_ONE_KERNEL, env) == "True"
    assert glob.glob(str(tmp_path / "mine" / "kernels_*" / "*.nbi"))
    assert not (tmp_path / "xdg").exists()


def test_the_server_comes_with_the_tool():
    """`pip install .` must bring what `llamalora server` imports: starlette and uvicorn are not extras."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]}
    assert {"starlette", "uvicorn"} <= names
