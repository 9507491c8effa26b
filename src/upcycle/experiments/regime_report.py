"""The regime study's outputs from whatever runs have finished: results.json, results.csv, results.md
and the figures (see `upcycle.experiments.regime`). A partial study gives a partial report, which says what is
missing."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

from upcycle.experiments.regime_recipe import RegimeRecipe, best_other_arm, job_dir, job_done, plan_jobs


def _stats(vals: list[float]) -> tuple[float, float]:
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else float("nan"))


def collect(r: RegimeRecipe, out: Path) -> dict:
    """{(size, tpp, arm): [result per finished seed]} and the pretraining branch points."""
    runs: dict = {}
    for j in plan_jobs(r, best_other_arm(r, out)):
        f = job_dir(out, j) / "result.json"
        if j.arm is not None and f.is_file():
            runs.setdefault((j.size, j.tpp, j.arm), []).append(json.loads(f.read_text()))
    branches = {}
    for size in r.sizes:
        for tpp in r.branch_points(size):
            f = out / size / "pretrain" / f"branch-{tpp:g}" / "branch.json"
            if f.is_file():
                branches[(size, tpp)] = json.loads(f.read_text())
    return {"runs": runs, "branches": branches}


def run_machines(runs: dict) -> dict[str, int]:
    """{CPU: finished runs on it}, "not recorded" counting the runs made before runs kept their machine."""
    count: dict[str, int] = {}
    for results in runs.values():
        for res in results:
            cpu = (res.get("machine") or {}).get("cpu", "not recorded")
            count[cpu] = count.get(cpu, 0) + 1
    return count


def arm_points(results: list[dict], extras) -> list[dict]:
    pts = []
    for k, x in enumerate(extras):
        vals = [res["points"][k]["val_loss"] for res in results]
        m, s = _stats(vals)
        p0 = results[0]["points"][k]
        pts.append(
            {
                "extra": x,
                "val_loss_mean": m,
                "val_loss_std": s,
                "seeds": len(vals),
                "seed_values": vals,
                "flops": p0["flops"],
                "extra_flops": p0["extra_flops"],
                "target_flops": p0["target_flops"],
                "tokens": p0["tokens"],
                "steps": p0["steps"],
            }
        )
    return pts


def gap(runs: dict, key_a: tuple, key_b: tuple, k: int) -> dict | None:
    """a - b at budget k, paired by seed (a seed is the same data order in both arms)."""
    a = {x["seed"]: x["points"][k]["val_loss"] for x in runs.get(key_a, [])}
    b = {x["seed"]: x["points"][k]["val_loss"] for x in runs.get(key_b, [])}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    m, s = _stats(d)
    return {"gap_mean": m, "gap_std": s, "seeds": len(seeds)}


def crossing(runs: dict, size: str, tpp: float, arm: str, by: str = "extra_flops") -> dict | None:
    """Where the mean stable-phase curve of `arm` first goes below dense continuation's (x: extra FLOPs
    or tokens since the branch point), or None."""

    def mean_curve(key):
        rs = runs.get(key, [])
        if not rs:
            return None
        n = min(len(x["curve"]["step"]) for x in rs)
        B, c = rs[0]["B_flops"], rs[0]["curve"]
        xs = [(c["flops"][i] / B, c["tokens"][i], c["step"][i]) for i in range(n)]
        ys = [statistics.fmean(x["curve"]["val_loss"][i] for x in rs) for i in range(n)]
        return xs, ys

    a, d = mean_curve((size, tpp, arm)), mean_curve((size, tpp, "dense"))
    if not a or not d:
        return None
    import numpy as np

    dx = np.array([x[0] for x in d[0]])
    dy = np.array(d[1])
    for (fx, tok, step), y in zip(*a):
        if dx[0] <= fx <= dx[-1] and y < float(np.interp(fx, dx, dy)):
            return {"extra_share": fx, "tokens": tok, "step": step}
    return None


def regime_report(
    r: RegimeRecipe, out: Path, command: str | None = None, wall_s: float = 0.0, resumed: int = 0
) -> dict:
    from upcycle.experiments.common import machine

    out = Path(out)
    c = collect(r, out)
    runs, branches = c["runs"], c["branches"]
    size, tpp = r.main["size"], float(r.main["tokens_per_param"])
    b = branches.get((size, tpp))
    data_info = json.loads((out / "data" / "data.json").read_text()) if (out / "data" / "data.json").is_file() else {}
    res: dict = {
        "recipe": r.to_dict(),
        "machine": machine(),
        "run_machines": run_machines(runs),
        "command": command,
        "wall_s_this_call": wall_s,
        "data": data_info,
        "budgets": list(r.extra),
        "arms": {},
        "map": [],
        "crossing": {},
    }
    if b:
        res["dense"] = {
            "non_embedding_params": b["non_embedding_params"],
            "tokens": b["tokens"],
            "tokens_per_param": b["tokens"] / b["non_embedding_params"],
            "val_loss": b["val_loss"],
            "flops": b["flops"],
            "size": size,
            "model": r.sizes[size],
        }
    for arm in r.arms:
        rs = sorted(runs.get((size, tpp, arm), []), key=lambda x: x["seed"])
        if rs:
            res["arms"][arm] = {
                "kind": r.arms[arm]["kind"],
                "optimizer": r.arm_optimizer(arm),
                "flops_per_token": rs[0]["flops_per_token"],
                "points": arm_points(rs, r.extra),
                "start_val_loss": statistics.fmean(x["start_val_loss"] for x in rs),
                "wall_s": sum(x["wall_s"] for x in rs),
            }
            if arm != "dense":
                res["arms"][arm]["gap_vs_dense"] = [
                    gap(runs, (size, tpp, arm), (size, tpp, "dense"), k) for k in range(len(r.extra))
                ]
                cr = crossing(runs, size, tpp, arm)
                if cr:
                    res["crossing"][arm] = cr
    best = best_other_arm(r, out)
    res["best_other_arm"] = best
    for s, t in sorted({(j.size, j.tpp) for j in plan_jobs(r, best) if j.arm is not None}):
        for k, x in enumerate(r.extra):
            g = gap(runs, (s, t, "upcycled"), (s, t, "dense"), k)
            if g is None:
                continue
            row = {"size": s, "tokens_per_param": t, "extra": x, **g}
            if best:
                gb = gap(runs, (s, t, best), (s, t, "dense"), k)
                if gb:
                    row |= {
                        "best_other": best,
                        "best_other_gap_mean": gb["gap_mean"],
                        "best_other_gap_std": gb["gap_std"],
                        "best_other_seeds": gb["seeds"],
                    }
            res["map"].append(row)
    res["crossover"] = crossover(res["map"], r)
    res["branch_points"] = {f"{s}/{t:g}": v for (s, t), v in branches.items()}
    res["missing_runs"] = [j.name for j in plan_jobs(r, best) if not job_done(out, j)]
    res["runs_wall_s"] = sum(x["wall_s"] for rs in runs.values() for x in rs)
    write_csv(runs, r, out / "results.csv")
    from upcycle.experiments.regime_plots import plot_all
    from upcycle.experiments.regime_text import results_markdown

    res["figures"] = plot_all(res, runs, r, out)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out / "results.md").write_text(results_markdown(res, r))
    return res


def crossover(rows: list[dict], r: RegimeRecipe) -> dict:
    """Per size and budget: the tokens per parameter where upcycled - dense changes sign, interpolated in
    log(tokens per parameter) between the map's points ("above N" / "below N" where it does not change
    sign within the points, None where it changes back and forth)."""
    out: dict = {}
    for s in r.sizes:
        for x in r.extra:
            pts = sorted((m["tokens_per_param"], m["gap_mean"]) for m in rows if m["size"] == s and m["extra"] == x)
            if len(pts) < 2:
                continue
            found: float | str | None = None
            for (t0, g0), (t1, g1) in zip(pts, pts[1:]):
                if g0 > 0 >= g1:
                    f = g0 / (g0 - g1)
                    found = math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0)))
                    break
            if found is None:  # no sign change between the points: say on which side of the range it lies
                found = (
                    f"above {pts[-1][0]:g}" if pts[-1][1] > 0 else f"below {pts[0][0]:g}" if pts[0][1] <= 0 else None
                )
            out.setdefault(s, {})[f"{x:g}"] = found
    return out


# A point's columns in results.csv, between the run's (size, tokens_per_param, arm, seed) and its own.
_POINT = ("extra", "steps", "tokens", "flops", "extra_flops", "target_flops", "val_loss")


def write_csv(runs: dict, r: RegimeRecipe, path: Path) -> None:
    fields = ["size", "tokens_per_param", "arm", "seed", *_POINT, "start_val_loss", "flops_per_token"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for (s, t, a), rs in sorted(runs.items()):
            for x in sorted(rs, key=lambda x: x["seed"]):
                run = {"size": s, "tokens_per_param": t, "arm": a, "seed": x["seed"]}
                for p in x["points"]:
                    own = {"start_val_loss": x["start_val_loss"], "flops_per_token": x["flops_per_token"]}
                    w.writerow({**run, **{k: p[k] for k in _POINT}, **own})
