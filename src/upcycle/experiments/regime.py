"""The regime study: when does sparse upcycling beat dense continuation, and by how much?

The literature's wins come from capacity-limited dense models and long upcycling budgets (Komatsuzaki et
al. 2023 from T5 checkpoints of 1M steps; He et al. 2024 from Nemotron 2B at ~550 tokens per parameter;
Skywork-MoE, OLMoE and Drop-Upcycling from 1000+); this study measures where that regime starts, at CPU size.

    dense phase  a Llama from scratch per model size, warmup then a constant LR (a warmup-stable-decay
                 run stopped in its stable phase): a checkpoint at each branch point, `tokens_per_param`
                 training tokens per non-embedding parameter (the main setting, and each point of the map)
    budgets      B = the dense FLOPs up to the branch point; an arm gets share x B FLOPs (`extra`)
    LR path      every continued arm: a re-warm over `rewarm` x B FLOPs, the stable LR, then a linear
                 decay to `final_lr_ratio` x lr over the last `decay_fraction` of its budget. One stable run
                 per (arm, seed) to the largest budget; each smaller budget is a decay branch from the
                 stable run's checkpoint at its decay start (the LR before a decay does not depend on the
                 budget, so the branch is exactly that budget's run)
    arms         dense (continued) | upcycled (plan variants, `surgery.upcycle`) | moe_scratch (the
                 upcycled shape from a random init, for B + extra) | dense_wide_scratch (the positive
                 control: the dense model with the MoE layers' MLPs as wide as all their experts together,
                 from scratch, for the same tokens as the dense arm: B + extra FLOPs of the dense model)
    optimizer    `optimizer: reset` (a fresh AdamW state for every arm) or carry (the dense run's state,
                 mapped onto the experts); an arm may override it
    data         one split by document; the pretraining reads its first sequences in a fixed order; the
                 continued arms read the sequences it did not, in the order of their seed; the scratch
                 arms read the pretraining's sequences and then the dense arm's; no sequence twice in a run
    seeds        a run's seed sets its data order and its router and expert initialisations
    map          dense vs upcycled (and the best other arm of the main setting) over the dense model's
                 training amount, per model size, every point with `map_seeds` seeds

Every run writes OUT/<size>/tpp-<N>/<arm>/seed-<s>/result.json when it has finished; running the study
again skips finished runs and resumes unfinished ones from their newest checkpoint. `regime_report`
turns whatever has finished into results.json, results.csv, results.md and the figures.
"""

from __future__ import annotations

import time
from pathlib import Path

from upcycle.errors import UpcycleError
from upcycle.experiments.common import keep_recipe
from upcycle.experiments.regime_recipe import Job, RegimeRecipe, best_other_arm, job_done, plan_jobs, save_state
from upcycle.experiments.regime_report import regime_report
from upcycle.experiments.regime_runs import prepare_data, run_job


def run_study(r: RegimeRecipe, out: str | Path, log=print, command: str | None = None, progress: bool = False) -> dict:
    """Run (or resume) the study; `workers` runs side by side. Returns the report (see regime_report)."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keep_recipe(out, r, free=("arms", "map", "tiny", "workers", "map_seeds"), what="a study")
    t0 = time.perf_counter()
    prepare_data(r, out, log)  # tokenizer and packed sequences, cached for the workers
    done_before = {j for j in plan_jobs(r) if job_done(out, j)}
    running: dict = {}
    failed: list[str] = []
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, r.workers), mp_context=ctx) as pool:
        while True:
            jobs = plan_jobs(r, best_other_arm(r, out))
            todo = [j for j in jobs if not job_done(out, j) and j not in running.values() and j.name not in failed]
            ready = [j for j in todo if j.arm is None or job_done(out, Job(j.size))]
            while ready and len(running) < max(1, r.workers):
                j = ready.pop(0)
                log(f"start {j.name}")
                running[pool.submit(run_job, r, str(out), j, progress)] = j
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                j = running.pop(fut)
                try:
                    msg = fut.result()
                    log(f"done  {j.name}: {msg}")
                except Exception as e:  # one failed run does not stop the others; it is reported
                    failed.append(j.name)
                    log(f"FAILED {j.name}: {type(e).__name__}: {e}")
    report = regime_report(r, out, command=command, wall_s=time.perf_counter() - t0, resumed=len(done_before))
    if failed:
        raise UpcycleError(
            f"{len(failed)} run(s) failed: {', '.join(failed)}; the finished ones are in {out}/"
            "results.md; run the same command again to retry them"
        )
    return report


def publish(r: RegimeRecipe, out: str | Path, dest: str | Path, command: str | None = None) -> dict:
    """The study in `out` as it stands, written to dest (e.g. results/upcycling-regime): the report
    (results.md/json/csv, figures) and, under dest/state, what a fresh machine needs to resume it
    (`save_state`). Trains nothing; a study still running is read as far as it has finished."""
    import shutil

    out, dest = Path(out), Path(dest)
    save_state(out, dest / "state")
    res = regime_report(r, dest / "state", command=command)
    for name in ["results.md", "results.json", "results.csv", *res["figures"]]:
        shutil.move(str(dest / "state" / name), dest / name)
    return res
