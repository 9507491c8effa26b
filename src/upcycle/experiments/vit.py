"""Sparse Upcycling's vision recipe at small scale: a ViT pretrained from scratch on scikit-learn's
handwritten digits (1,797 8x8 images, shipped inside the scikit-learn wheel), then continued four ways
at matched extra compute:

    dense             the dense ViT, its own AdamW state, the schedule continued
    upcycled          MoE blocks in place of the chosen MLPs: expert choice (C = 2), combine weights
                      normalised per token, the dense AdamW state carried over (the paper's vision recipe)
    upcycled_nonorm   the same without the normalisation
    upcycled_fresh    the same as `upcycled`, with a fresh optimizer state

The schedule is linear warmup then inverse square root (T5 / the paper: continuing runs just continue
it), so every arm is one run to the largest budget, evaluated at each budget. Budgets are extra compute
as a share of the dense pretraining FLOPs; an arm gets as many steps as its FLOPs per step allow.

FLOPs per image (training, forward + backward): `train.flops.flops_per_example`, 6 T N_body + 6 N_head +
12 L d T^2, with T tokens (the patches and CLS), N_body the matmul weights a token passes through (patch
projection, attention, MLP; MoE experts counted E ceil(C T / E) / T / E of their size for expert choice,
each image being one routing group: 40/17 experts per token at C = 2, E = 8, T = 17, not C = 2; plus the
router), N_head the classifier (once per image) and the last term attention scores and values. Biases,
norms and position embeddings are left out.

Reported per budget: test accuracy of the classifier and 10-shot linear-probe accuracy (closed-form
ridge regression on the CLS features of 10 training images per class, averaged over `probe_draws`
draws, the linear few-shot evaluation of the paper's vision models), over `seeds` continuation seeds."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from upcycle.errors import UpcycleError
from upcycle.experiments.vit_report import _row, plot, results_markdown, write_csv
from upcycle.io import yamlio
from upcycle.io.yamlio import option

ARMS = ("dense", "upcycled", "upcycled_nonorm", "upcycled_fresh")


@dataclass(frozen=True)
class VitRecipe:
    name: str = option("vit-small", "name of the experiment")
    seed: int = option(0, "seed of the split, the dense pretraining and the routers")
    seeds: int = option(1, "continuation seeds per arm (data order, augmentation, router initialisation)")
    test_size: int = option(497, "held-out test images (of 1,797)")
    model: dict = option(
        dict(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, patch_size=2), "the dense ViT"
    )
    batch_size: int = option(128, "images per step")
    pretrain_steps: int = option(2000, "dense pretraining steps (budget B)")
    lr: float = option(1e-3, "peak learning rate")
    warmup: int = option(200, "warmup steps, then inverse square root")
    weight_decay: float = option(0.05, "AdamW weight decay")
    extra: list = option([0.1, 0.25, 0.5, 1.0], "extra compute budgets, as shares of the pretraining FLOPs")
    arms: list = option(list(ARMS), "arms to run")
    plan: dict = option(
        dict(num_experts=8, router="expert_choice", capacity_factor=2.0, layers="every_k:2:1"),
        "the upcycling plan (upcycled_nonorm sets normalize: false)",
    )
    shots: int = option(10, "images per class for the linear probe")
    probe_draws: int = option(5, "random draws of the few-shot training set")
    ridge: float = option(1e-2, "ridge regularisation of the linear probe (times the feature dimension)")
    threads: int = option(1, "torch CPU threads")
    tiny: dict = option({}, "overrides for --tiny (smoke tests)")

    def __post_init__(self) -> None:
        if not self.extra or any(not isinstance(x, (int, float)) or x <= 0 for x in self.extra):
            raise UpcycleError(f"extra: expected positive budget shares, got {self.extra!r}")
        bad = [a for a in self.arms if a not in ARMS]
        if bad:
            raise UpcycleError(f"arms: unknown arm {bad[0]!r}; choose from {', '.join(ARMS)}")
        for name in ("seeds", "batch_size", "pretrain_steps", "shots", "probe_draws", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise UpcycleError(f"{name}: expected a positive integer, got {v!r}")

    def plan_obj(self, normalize: bool = True, seed: int = 0):
        """The recipe's plan; routers seeded by recipe seed + `seed` (the continuation seed)."""
        from upcycle.methods.plan import UpcyclePlan

        return UpcyclePlan.from_dict(dict(self.plan, normalize=normalize, seed=self.seed + seed), source="recipe plan")

    @classmethod
    def from_dict(cls, d: dict, source: str = "recipe", tiny: bool = False) -> "VitRecipe":
        return yamlio.recipe_from_dict(cls, d, source, tiny)

    @classmethod
    def from_yaml(cls, path: str | Path, tiny: bool = False) -> "VitRecipe":
        return cls.from_dict(yamlio.read_mapping(path, "recipe"), str(path), tiny)


def digits(seed: int, test_size: int) -> dict[str, torch.Tensor]:
    """scikit-learn's digits as (N, 1, 8, 8) floats in [0, 1], split once by a seeded permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UpcycleError(
            "the ViT experiment reads scikit-learn's digits: pip install scikit-learn (in the dev extra)"
        ) from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:test_size], perm[test_size:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (zero padding): the only augmentation."""
    B = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (B,), generator=g)
    dx = torch.randint(0, 3, (B,), generator=g)
    rows = (dy.view(B, 1) + torch.arange(8)).view(B, 1, 8, 1).expand(B, 1, 8, 10)
    out = torch.gather(padded, 2, rows)
    cols = (dx.view(B, 1) + torch.arange(8)).view(B, 1, 1, 8).expand(B, 1, 8, 8)
    return torch.gather(out, 3, cols)


def dense_vit(recipe: VitRecipe) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    m = recipe.model
    config = ViTConfig(
        image_size=8,
        patch_size=m.get("patch_size", 2),
        num_channels=1,
        hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_layers"],
        num_attention_heads=m["num_heads"],
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(recipe.seed)
    return ViTForImageClassification(config)


def tokens_per_image(config) -> int:
    return (config.image_size // config.patch_size) ** 2 + 1


def flops_per_image(model: nn.Module, dense: bool = False) -> int:
    """Training FLOPs per image (module docstring). dense=True: the dense model this one came from."""
    from upcycle.train.flops import flops_per_example

    return flops_per_example(model, tokens_per_image(model.config), dense, head=model.classifier)


def lr_at(step: int, recipe: VitRecipe) -> float:
    """Linear warmup, then inverse square root of the step (T5's schedule; continuing just continues)."""
    s = step + 1
    return recipe.lr * min(s / recipe.warmup, math.sqrt(recipe.warmup / s))


def train_steps(
    model: nn.Module,
    opt,
    data: dict,
    recipe: VitRecipe,
    start: int,
    steps: int,
    seed: int,
    aux_coef: float = 0.0,
    on_step=None,
    progress: bool = False,
    desc: str = "",
) -> list[float]:
    """`steps` AdamW steps from global step `start` (the schedule's position); returns the losses."""
    from tqdm.auto import tqdm

    from upcycle.train.step import optimizer_step

    def image_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(pixel_values=images).logits, labels)

    g = torch.Generator().manual_seed(seed)
    x, y = data["x_train"], data["y_train"]
    n = len(y)
    losses = []
    model.train()
    perm, pos = torch.randperm(n, generator=g), 0
    for i in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        if pos + recipe.batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + recipe.batch_size]
        pos += recipe.batch_size
        batch = (augment(x[idx], g), y[idx])
        sums, _ = optimizer_step(model, opt, lr_at(start + i, recipe), [batch], image_loss, (aux_coef, 0.0), 1.0)
        losses.append(sums[1].item())  # the classification loss, without the aux terms
        if on_step is not None:
            on_step(start + i + 1, i + 1)
    model.eval()
    return losses


@torch.no_grad()
def features_and_logits(model: nn.Module, x: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS features after the final LayerNorm (the classifier's input) and the logits."""
    model.eval()
    feats, logits = [], []
    for i in range(0, len(x), batch):
        h = model.vit(pixel_values=x[i : i + batch]).last_hidden_state[:, 0]
        feats.append(h)
        logits.append(model.classifier(h))
    return torch.cat(feats), torch.cat(logits)


def linear_probe(
    f_train: torch.Tensor,
    y_train: torch.Tensor,
    f_test: torch.Tensor,
    y_test: torch.Tensor,
    shots: int,
    draws: int,
    ridge: float,
    seed: int,
) -> float:
    """Mean test accuracy of closed-form ridge classifiers (one-hot targets, bias, standardised features)
    fit on `shots` training images per class, over `draws` draws."""
    g = torch.Generator().manual_seed(seed)
    accs = []
    classes = int(y_train.max()) + 1
    for _ in range(draws):
        idx = torch.cat(
            [
                c_idx[torch.randperm(len(c_idx), generator=g)[:shots]]
                for c_idx in (torch.nonzero(y_train == c).flatten() for c in range(classes))
            ]
        )
        a = f_train[idx].double()
        mu, sd = a.mean(0), a.std(0).clamp_min(1e-6)
        a = torch.cat([(a - mu) / sd, torch.ones(len(idx), 1, dtype=a.dtype)], 1)
        t = F.one_hot(y_train[idx], classes).double()
        w = torch.linalg.solve(a.T @ a + ridge * a.shape[1] * torch.eye(a.shape[1], dtype=a.dtype), a.T @ t)
        b = torch.cat([(f_test.double() - mu) / sd, torch.ones(len(f_test), 1, dtype=a.dtype)], 1)
        accs.append(float(((b @ w).argmax(1) == y_test).double().mean()))
    return float(np.mean(accs))


def evaluate(model: nn.Module, data: dict, recipe: VitRecipe) -> dict[str, float]:
    from upcycle.moe.block import moe_blocks

    f_tr, _ = features_and_logits(model, data["x_train"])
    f_te, logits = features_and_logits(model, data["x_test"])
    left = [b.router_stats()["tokens_left_behind"] for _, b in moe_blocks(model)]
    return {
        "accuracy": float((logits.argmax(1) == data["y_test"]).double().mean()),
        "test_loss": float(F.cross_entropy(logits, data["y_test"])),
        "probe_accuracy": linear_probe(
            f_tr, data["y_train"], f_te, data["y_test"], recipe.shots, recipe.probe_draws, recipe.ridge, recipe.seed
        ),
        "tokens_left_behind": float(np.mean(left)) if left else 0.0,
    }


def make_optimizer(model: nn.Module, recipe: VitRecipe):
    from upcycle.train.config import TrainConfig
    from upcycle.train.optim import build_optimizer

    return build_optimizer(model, TrainConfig(lr=recipe.lr, weight_decay=recipe.weight_decay, beta2=0.999))


def run_vit_experiment(
    recipe: VitRecipe, out_dir: str | Path, progress: bool = True, log=print, command: str = ""
) -> dict:
    from upcycle.experiments.common import machine
    from upcycle.io.dirs import atomic_dir
    from upcycle.methods.surgery import upcycle
    from upcycle.train.optim import carry_over_optimizer_state, load_named_optimizer_state, named_optimizer_state

    torch.set_num_threads(recipe.threads)
    out_dir = Path(out_dir)
    t0 = time.time()
    data = digits(recipe.seed, recipe.test_size)
    dense = dense_vit(recipe)
    opt = make_optimizer(dense, recipe)
    fpi_dense = flops_per_image(dense)
    log(
        f"[vit] dense pretraining: {recipe.pretrain_steps} steps of {recipe.batch_size} images "
        f"({sum(p.numel() for p in dense.parameters()) / 1e3:.0f}k parameters)"
    )
    pre_losses = train_steps(
        dense, opt, data, recipe, 0, recipe.pretrain_steps, recipe.seed, progress=progress, desc="dense pretraining"
    )
    pretrain_flops = fpi_dense * recipe.batch_size * recipe.pretrain_steps
    start = evaluate(dense, data, recipe)
    log(f"[vit] pretrained: accuracy {start['accuracy']:.4f}, 10-shot probe {start['probe_accuracy']:.4f}")
    dense_state = named_optimizer_state(opt)
    dense_sd = {k: v.clone() for k, v in dense.state_dict().items()}

    rows: list[dict] = []
    curves: dict[str, dict] = {}
    fpis: dict[str, int] = {}
    budgets = sorted(recipe.extra)
    for arm in recipe.arms:
        for s in range(recipe.seeds):
            base = dense_vit(recipe)
            base.load_state_dict(dense_sd)
            if arm == "dense":
                model = base
            else:
                model = upcycle(base, recipe.plan_obj(normalize=arm != "upcycled_nonorm", seed=s))
            o = make_optimizer(model, recipe)
            if arm == "dense":
                load_named_optimizer_state(o, dense_state)
            elif arm != "upcycled_fresh":
                load_named_optimizer_state(o, carry_over_optimizer_state(dense_state, dense, model))
            fpi = flops_per_image(model)
            fpis[arm] = fpi
            steps_at = {b: max(1, round(b * pretrain_flops / (fpi * recipe.batch_size))) for b in budgets}
            init = evaluate(model, data, recipe)
            rows.append(_row(arm, s, 0.0, 0, 0.0, init))
            t_arm = time.time()

            def on_step(
                global_step: int, k: int, arm=arm, s=s, model=model, fpi=fpi, steps_at=steps_at, t_arm=t_arm
            ) -> None:
                for b, n in steps_at.items():
                    if n == k:
                        r = evaluate(model, data, recipe)
                        model.train()
                        rows.append(
                            _row(arm, s, b, k, k * fpi * recipe.batch_size / pretrain_flops, r, time.time() - t_arm)
                        )
                        log(
                            f"[vit] {arm} seed {s} +{b:.0%}: {k} steps, accuracy {r['accuracy']:.4f}, "
                            f"probe {r['probe_accuracy']:.4f}, left behind {r['tokens_left_behind']:.3f}"
                        )

            losses = train_steps(
                model,
                o,
                data,
                recipe,
                recipe.pretrain_steps,
                max(steps_at.values()),
                recipe.seed + 1000 * (s + 1),
                aux_coef=0.0,
                on_step=on_step,
                progress=progress,
                desc=f"{arm} seed {s}",
            )
            curves[f"{arm}/{s}"] = {"flops_per_image": fpi, "losses": losses}
    info = {
        "recipe": dataclasses.asdict(recipe),
        "machine": machine(),
        "command": command,
        "pretrain_flops": pretrain_flops,
        "dense_flops_per_image": fpi_dense,
        "flops_per_image": fpis,
        "pretrained": start,
        "pretrain_losses": pre_losses,
        "wall_s": time.time() - t0,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with atomic_dir(out_dir, overwrite=True) as tmp:
        write_csv(rows, tmp / "results.csv")
        (tmp / "results.json").write_text(json.dumps({"rows": rows, "curves": curves, "info": info}, indent=1))
        (tmp / "results.md").write_text(results_markdown(rows, info))
        plot(rows, curves, info, tmp / "accuracy_vs_flops.png")
    return {"rows": rows, "info": info}
