"""Loglikelihoods and greedy text of a model directory through lm-eval's HFLM (the harness's own request
types, as its tasks issue them), run by the engines lane in the lmeval environment:
    python run_lmeval.py REQUEST.json RESULT.json

The text is cut into word chunks; "logprobs" holds each chunk's loglikelihood given the text before it
(a sum over the chunk's tokens), then the text's rolling loglikelihood. Greedy text is generate_until
with do_sample false.
"""

import json
import sys


def chunks(text, n=6):
    words = text.split(" ")
    step = max(1, len(words) // n)
    cuts = list(range(step, len(words), step))
    return [(" ".join(words[:a]), " " + " ".join(words[a : a + step])) for a in cuts]


def main(req_path, out_path):
    import lm_eval
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(2)
    req = json.load(open(req_path))
    lm = HFLM(pretrained=req["model"], device="cpu", dtype="float32", batch_size=1)
    ll = [Instance("loglikelihood", {}, c, i) for i, c in enumerate(chunks(req["text"]))]
    scores = [s for s, _ in lm.loglikelihood(ll, disable_tqdm=True)]
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (req["text"],), 0)], disable_tqdm=True)
    gen = Instance(
        "generate_until",
        {},
        (req["prompt"], {"until": ["<|im_end|>"], "max_gen_toks": req["new_tokens"], "do_sample": False}),
        0,
    )
    (text,) = lm.generate_until([gen], disable_tqdm=True)
    json.dump(
        {
            "engine": "lm-eval",
            "version": lm_eval.__version__,
            "class": type(lm.model).__name__,
            "ids": lm.tok_encode(req["text"]),
            "logprobs": [float(s) for s in scores] + [float(rolling[0])],
            "greedy_ids": lm.tok_encode(text),
            "greedy_text": text,
        },
        open(out_path, "w"),
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
