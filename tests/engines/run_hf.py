"""Logprobs and greedy text of a model directory in transformers (any version), run by the engines lane
in an engine's own environment:  python run_hf.py REQUEST.json RESULT.json

REQUEST: {"model": dir, "text": str, "ids": [token ids of text], "prompt": str, "prompt_ids": [...],
          "new_tokens": n}
RESULT:  {"version", "ids" (this tokenizer's ids of text), "logprobs" (of ids[1:], each given what
          precedes it), "greedy_ids", "greedy_text"}
"""

import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(2)


def main(req_path, out_path):
    req = json.load(open(req_path))
    tok = AutoTokenizer.from_pretrained(req["model"])
    model = AutoModelForCausalLM.from_pretrained(req["model"], dtype=torch.float32).eval()  # 4.57 reads dtype too
    ids = torch.tensor([req["ids"]])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        lp = lp.gather(1, ids[0, 1:, None])[:, 0]
        prompt = torch.tensor([req["prompt_ids"]])
        out = model.generate(
            prompt, max_new_tokens=req["new_tokens"], do_sample=False, attention_mask=torch.ones_like(prompt)
        )
    greedy = out[0, prompt.shape[1] :].tolist()
    json.dump(
        {
            "engine": "transformers",
            "version": transformers.__version__,
            "class": type(model).__name__,
            "ids": tok(req["text"], add_special_tokens=False).input_ids,
            "logprobs": lp.tolist(),
            "greedy_ids": greedy,
            "greedy_text": tok.decode(greedy),
        },
        open(out_path, "w"),
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
