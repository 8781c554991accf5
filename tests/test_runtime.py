"""runtime.py: XLA flag defaults and the persistent compilation cache (in a subprocess: both are process-global)."""

import json
import os
import subprocess
import sys

from conftest import REPO

_SCRIPT = r"""
import json, os, sys, time
from facecrafter_jax.runtime import configure_cpu, enable_compilation_cache
flags = configure_cpu()
folder = enable_compilation_cache(sys.argv[1] if len(sys.argv) > 1 else None, min_compile_seconds=0)
import jax, jax.numpy as jnp
x = jnp.ones((64, 64))
f = lambda x: jnp.tanh(x @ x.T) @ x
out = {"flags": flags, "folder": folder}
t0 = time.perf_counter(); a = jax.jit(f).lower(x).compile(); out["cold"] = time.perf_counter() - t0
files = sorted(os.listdir(folder)) if folder else []
jax.clear_caches()
t0 = time.perf_counter(); b = jax.jit(f).lower(x).compile(); out["warm"] = time.perf_counter() - t0
out["files"] = files
out["same"] = bool((a(x) == b(x)).all())
print("RESULT " + json.dumps(out))
"""


def _run(args, env_extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_extra}
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-c", _SCRIPT, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


def test_compilation_cache_stores_and_reuses_programs(tmp_path):
    out = _run([str(tmp_path / "cache")], {"FACECRAFTER_COMPILATION_CACHE": "off"})  # an explicit folder wins
    assert out["folder"] == str(tmp_path / "cache")
    assert any(f.startswith("jit_") for f in out["files"]), out["files"]  # the program was written to disk
    assert out["same"]
    assert "--xla_cpu_experimental_ynn_fusion_type=reduce" in out["flags"].split()


def test_compilation_cache_follows_the_environment(tmp_path, monkeypatch):
    # Folder resolution only (no compile), in process; the process-global settings are restored afterwards.
    import jax

    from facecrafter_jax.runtime import default_cache_dir, enable_compilation_cache

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    saved = {k: getattr(jax.config, k) for k in keys}
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("FACECRAFTER_COMPILATION_CACHE", "off")
        assert enable_compilation_cache() is None and jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv("FACECRAFTER_COMPILATION_CACHE", "")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert default_cache_dir() == str(tmp_path / "xdg" / "facecrafter_jax" / "xla")
        monkeypatch.setenv("FACECRAFTER_COMPILATION_CACHE", str(tmp_path / "env"))
        assert enable_compilation_cache() == str(tmp_path / "env") == jax.config.jax_compilation_cache_dir
        assert (tmp_path / "env").is_dir() and jax.config.jax_persistent_cache_min_compile_time_secs == 1.0
        assert enable_compilation_cache() == str(tmp_path / "env")  # a folder already configured is kept
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "user"))
        assert enable_compilation_cache() == str(tmp_path / "user")  # ... also one the user set
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
