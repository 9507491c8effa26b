"""Logprobs and greedy text of a model directory in llama.cpp, run by the engines lane in the llamacpp
environment:  python run_llamacpp.py REQUEST.json RESULT.json   (formats as in run_hf.py)

The directory is converted to an f32 GGUF by the convert_hf_to_gguf.py vendored in the llama-cpp-python
sdist (REQUEST["converter"]); a failed conversion is reported as {"convert_error": its last lines}.
The model runs with an f32 KV cache (the default f16 cache rounds keys and values).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def main(req_path, out_path):
    req = json.load(open(req_path))
    gguf = Path(req["work"]) / (Path(req["model"]).name + ".f32.gguf")
    conv = subprocess.run(
        [sys.executable, req["converter"], req["model"], "--outtype", "f32", "--outfile", str(gguf)],
        capture_output=True,
        text=True,
    )
    if conv.returncode != 0:
        json.dump({"engine": "llama.cpp", "convert_error": (conv.stderr or conv.stdout)[-2000:]}, open(out_path, "w"))
        return
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(gguf),
        n_ctx=512,
        n_batch=512,
        logits_all=True,
        n_threads=2,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )
    ids = req["ids"]
    llm.eval(ids)
    logits = llm.scores[: len(ids) - 1].astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(-1))
    lps = [float(logits[i, t] - lse[i]) for i, t in enumerate(ids[1:])]
    llm.reset()
    llm.eval(req["prompt_ids"])
    greedy = []
    for _ in range(req["new_tokens"]):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(nxt)
        llm.eval([nxt])
    json.dump(
        {
            "engine": "llama.cpp",
            "version": llama_cpp.__version__,
            "class": llm.metadata.get("general.architecture"),
            "ids": llm.tokenize(req["text"].encode(), add_bos=False, special=False),
            "logprobs": lps,
            "greedy_ids": greedy,
            "greedy_text": llm.detokenize(greedy).decode("utf-8", errors="replace"),
            "gguf_bytes": gguf.stat().st_size,
        },
        open(out_path, "w"),
    )
    gguf.unlink()  # f32 GGUFs are as large as the checkpoint


if __name__ == "__main__":
    main(*sys.argv[1:3])
