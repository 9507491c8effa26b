"""The engines lane's figures (the JSON file UPCYCLE_ENGINES_RESULTS names) as a markdown table:
python tests/engines/report.py results/engines/results.json > results/engines/results.md
"""

import json
import sys


def main(path):
    d = json.load(open(path))
    rows = {k: v for k, v in d.items() if isinstance(v, dict)}
    print("| engine / export | class | max abs logprob diff | greedy text same | greedy text | seconds |")
    print("|---|---|---|---|---|---|")
    for k in sorted(rows):
        v = rows[k]
        if "refused" in v:
            print(f"| {k} | | refused as predicted: `{v['refused']}...` | | | |")
            continue
        diff = f"{v['max_abs_logprob_diff']:.2e}"
        if "max_abs_logprob_diff_vs_dense" in v:
            diff += f" (vs ours; the dense model is {v['max_abs_logprob_diff_vs_dense']:.2f} away)"
        text = v["greedy_text"].replace("\n", "\\n")
        print(f"| {k} | {v['class']} | {diff} | {v['greedy_same']} | `{text}` | {v['seconds']} |")
    rest = {k: v for k, v in d.items() if not isinstance(v, dict)}
    if rest:
        print()
        print(", ".join(f"{k}: {v}" for k, v in sorted(rest.items())))


if __name__ == "__main__":
    main(sys.argv[1])
