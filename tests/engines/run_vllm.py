"""Logprobs and greedy text of a model directory in vLLM (CPU build, fp32), run by the engines lane in
the vllm environment:  python run_vllm.py REQUEST.json RESULT.json   (formats as in run_hf.py)

vLLM starts worker processes, so everything runs under `if __name__ == "__main__"`.
"""

import json
import os
import sys


def main(req_path, out_path):
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    req = json.load(open(req_path))
    llm = LLM(
        model=req["model"],
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        seed=0,
        max_num_seqs=1,
    )
    tok = llm.get_tokenizer()
    ids = req["ids"]
    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    (scored,) = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)
    lps = []
    for t, entry in zip(ids[1:], scored.prompt_logprobs[1:]):
        lps.append(entry[t].logprob)  # the prompt token's own logprob is always in its entry
    g = SamplingParams(max_tokens=req["new_tokens"], temperature=0.0, ignore_eos=True)
    (gen,) = llm.generate([TokensPrompt(prompt_token_ids=req["prompt_ids"])], g, use_tqdm=False)
    greedy = list(gen.outputs[0].token_ids)
    json.dump(
        {
            "engine": "vllm",
            "version": vllm.__version__,
            "class": llm.llm_engine.model_config.architectures[0],
            "ids": tok.encode(req["text"], add_special_tokens=False),
            "logprobs": lps,
            "greedy_ids": greedy,
            "greedy_text": tok.decode(greedy),
        },
        open(out_path, "w"),
    )


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    main(*sys.argv[1:3])
