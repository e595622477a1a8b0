"""Pretraining variants on the demo, compared: does the semantic visual loss make pretraining converge
faster, which of its three terms does it, and how do SOHO's own heads and dictionary do against
soho-ds's departures from them? Every arm from the same stand-ins (the concept-trained CNN, which reads colours
but not shapes, and MiniLM), several seeds each.

    python benchmarks/compare_semantic.py --seeds 1,2,3 --steps 200       # about 35 minutes on 2 CPU cores
    python benchmarks/compare_semantic.py --on departures --arms soho,soho_recipe,soho+semantic,object,attribute,\
region_feature --checkpoints 200 --out benchmarks/pretraining_variants     # the recorded study

Arm "soho": configs/pretrain_synthetic.yaml as shipped (MLM + MVM + ITM + ITC, SOHO's choices), or with
soho-ds's former defaults (`--on departures`: config.FORMER_DEFAULTS; MiniLM's mean pooling and the
demo's then γ 0.95 kept); every other arm adds its keys to that. "soho+semantic": the
same plus the three semantic losses on the synthetic detections (the shape is the object class,
colour and size the attributes); "object", "attribute", "region_feature": one of them alone.
"soho_recipe": the official choices of configs/pretrain_coco_vg.yaml, named (the released dictionary update at
γ 0.4, its gate, MVM and MLM on every pass, MVM's raw cosine, bias-free ITM, decay on everything)
where the demo's encoder allows them (MiniLM's mean pooling stays: its early [CLS] is near constant).
Every --eval-every steps the runs record held-out ITM accuracy;
at each --checkpoints step a checkpoint is scored on shape-hard pairs (each true test caption against
the same caption with one shape word swapped for a shape absent from the image: only shape
knowledge tells them apart; accuracy = how often the true one scores higher), and retrieval is
finetuned from it (--finetune-steps) and evaluated (R@1).
Reports mean +- std over seeds, the steps each arm needs to reach --target held-out ITM, the
wall-clock per step, and a plot. Writes benchmarks/semantic_convergence.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import time
from pathlib import Path

import torch

from harness import ROOT
from soho_ds.config import FORMER_DEFAULTS, as_overrides

SIZES = ["semantic.num_objects=4", "semantic.num_attributes=8", "semantic.feature_dim=64", "semantic.max_boxes=8"]
SEMANTIC = ["semantic.object_weight=1.0", "semantic.attribute_weight=1.0", "semantic.feature_weight=1.0", *SIZES]
SOHO_RECIPE = ["model.vd_variant=official", "model.vd_momentum=0.4", "model.gate=official", "model.itm_bias=false",
               "pretrain.mvm_head=official", "pretrain.mvm_pairs=all", "pretrain.mlm_pairs=all",
               "train.decay_norms_and_biases=true"]
DEPARTURES = [*as_overrides({k: v for k, v in FORMER_DEFAULTS.items() if k != "model.pooling"}),
              "model.vd_momentum=0.95"]
ARMS = {"soho": [], "soho+semantic": SEMANTIC, "object": ["semantic.object_weight=1.0", *SIZES],
        "attribute": ["semantic.attribute_weight=1.0", *SIZES],
        "region_feature": ["semantic.feature_weight=1.0", *SIZES], "soho_recipe": SOHO_RECIPE}


def shape_hard_pairs(downstream: Path) -> tuple[list[str], list[str], list[int]]:
    """(image, caption, label): each test caption that names a shape, true (1), and with one shape word
    swapped for a shape that no object in the image has (0)."""
    from soho_ds.synthetic.world import SHAPES
    from soho_ds.tasks.retrieval import read_karpathy

    images, texts, labels = [], [], []
    for im in read_karpathy(downstream / "retrieval/dataset_synthetic.json", ("test",)):
        present = {s for s in SHAPES if re.search(rf"\b{s}\b", " ".join(im.captions))}
        other = next(s for s in SHAPES if s not in present)
        path = str(downstream / "images" / im.image)
        for caption in im.captions:
            shape = next((s for s in SHAPES if re.search(rf"\b{s}\b", caption)), None)
            if shape is None:
                continue
            images += [path, path]
            texts += [caption, re.sub(rf"\b{shape}\b", other, caption, count=1)]
            labels += [1, 0]
    return images, texts, labels


def pretrain(out: Path, root: Path, cnn: Path, seed: int, steps: int, eval_every: int, save_every: int,
             extra: list[str]) -> float:
    from soho_ds.pretrain.run import pretrain as run

    t0 = time.time()
    run(ROOT / "configs/pretrain_synthetic.yaml", ROOT / "ds_configs/zero2_cpu_demo.json", restart=True,
        overrides=[f"data.train_shards={root}/shards/train", f"data.val_shards={root}/shards/val",
                   f"model.backbone_weights={cnn}", f"train.output_dir={out}", f"train.max_steps={steps}",
                   f"train.eval_every={eval_every}", f"train.save_every={save_every}", f"train.seed={seed}",
                   "train.image_log_every=0", *extra])
    return (time.time() - t0) / steps


def finetune(init: Path, downstream: Path, out: Path, steps: int) -> dict:
    from soho_ds.tasks.run import finetune as run

    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "retrieval.yaml"
    cfg.write_text((ROOT / "configs/finetune_retrieval_synthetic.yaml").read_text().replace(
        "data/synthetic_downstream", str(downstream)))
    return run("retrieval", cfg, ROOT / "ds_configs/zero2_cpu_demo.json", init=init, restart=True,
               overrides=[f"train.output_dir={out}/run", f"train.max_steps={steps}",
                          f"train.warmup_steps={min(4, steps)}"])


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, v in curve if v >= target), None)


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--arms", default="soho,soho+semantic", help=f"any of {', '.join(ARMS)}")
    p.add_argument("--on", choices=("shipped", "departures"), default="shipped",
                   help="what each arm adds to: the demo's config, or it with soho-ds's former defaults")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--checkpoints", default="40,120,200", help="steps scored on shape-hard pairs and retrieval")
    p.add_argument("--finetune-steps", type=int, default=30)
    p.add_argument("--target", type=float, default=0.7, help="held-out ITM whose first step is reported")
    p.add_argument("--root", default="runs/semantic_compare")
    p.add_argument("--out", default="benchmarks/semantic_convergence")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import soho_ds
    from soho_ds.synthetic.backbone import train_concept_classifier
    from soho_ds.synthetic.downstream import make_downstream
    from soho_ds.synthetic.shards import make_dataset

    root = Path(a.root)
    if not (root / "shards/manifest.json").exists():
        make_dataset(root / "shards", num_train=1200, num_val=200, samples_per_shard=200, image_size=128, seed=0,
                     non_square=0.3)
        make_downstream(root / "downstream", num_train=160, num_eval=40, image_size=128, seed=12, non_square=0.3)
    cnn = root / "resnet18_concepts.pth"
    if not cnn.exists():
        torch.save(train_concept_classifier(f"{root}/shards/train", f"{root}/shards/val")[0], cnn)
    hard = shape_hard_pairs(root / "downstream")
    checkpoints = [int(s) for s in a.checkpoints.split(",")]
    arms = {arm: (DEPARTURES if a.on == "departures" else []) + ARMS[arm] for arm in a.arms.split(",")}
    runs = {arm: [] for arm in arms}
    for seed in (int(s) for s in a.seeds.split(",")):
        for arm, extra in arms.items():
            out = root / f"{arm.replace('+', '_')}_seed{seed}"
            seconds_per_step = pretrain(out, root, cnn, seed, a.steps, a.eval_every, math.gcd(*checkpoints), extra)
            evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
            record = {"seed": seed, "seconds_per_step": seconds_per_step,
                      "itm": [(e["step"], e["acc/itm"]) for e in evals],
                      "object_acc": [(e["step"], e.get("acc/object")) for e in evals], "at": {}}
            for step in checkpoints:
                tag = out / "checkpoints" / f"step_{step:08d}"
                model = soho_ds.load_model(tag, device="cpu")
                probs = model.itm(hard[0], hard[1])
                # pairwise: the true caption scored above its shape-swapped twin (chance 0.5, ties half);
                # a threshold at 0.5 would measure calibration, not shape knowledge
                true, swapped = probs[0::2], probs[1::2]
                shape_acc = float(((true > swapped).float() + 0.5 * (true == swapped).float()).mean())
                r = finetune(tag, root / "downstream", root / f"ft_{out.name}_{step}", a.finetune_steps)
                record["at"][step] = {"shape_hard_itm": shape_acc, "t2i_r1": r["t2i_r1"], "i2t_r1": r["i2t_r1"]}
            runs[arm].append(record)
            print(arm, seed, record["at"], flush=True)
            shutil.rmtree(out / "checkpoints")  # ~0.3 GB a tag; the numbers are in the record
    write(runs, a, checkpoints, len(hard[0]), Path(a.out))


def write(runs: dict, a, checkpoints: list[int], n_hard: int, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": vars(a), "runs": runs}, indent=1))
    rows = []
    for arm, records in runs.items():
        for step in checkpoints:
            itm = [dict(r["itm"])[step] for r in records]
            cells = {k: mean_std([r["at"][step][k] for r in records]) for k in ("shape_hard_itm", "t2i_r1", "i2t_r1")}
            rows.append(f"| {arm} | {step} | {mean_std(itm)[0]:.3f} ± {mean_std(itm)[1]:.3f} | "
                        f"{cells['shape_hard_itm'][0]:.3f} ± {cells['shape_hard_itm'][1]:.3f} | "
                        f"{cells['t2i_r1'][0]:.1f} ± {cells['t2i_r1'][1]:.1f} | "
                        f"{cells['i2t_r1'][0]:.1f} ± {cells['i2t_r1'][1]:.1f} |")
    summary = []
    for arm, records in runs.items():
        reach = [steps_to(r["itm"], a.target) for r in records]
        sec = mean_std([r["seconds_per_step"] for r in records])
        summary.append(f"| {arm} | {', '.join(str(s) if s is not None else f'not by {a.steps}' for s in reach)} | "
                       f"{sec[0]:.2f} ± {sec[1]:.2f} |")
    lines = [f"Seeds {a.seeds}; {a.steps} pretraining steps of configs/pretrain_synthetic.yaml (one rank, global batch "
             f"16); retrieval finetuned {a.finetune_steps} steps from each checkpoint, 40 test images x 200 captions; "
             f"shape-hard ITM over {n_hard // 2} pairs (a true caption and its twin with one shape word swapped; "
             f"correct when the true one scores higher, chance 0.5). Mean ± std over seeds.", "",
             "| arm | step | held-out ITM | shape-hard ITM | retrieval t2i R@1 | i2t R@1 |",
             "|---|---:|---:|---:|---:|---:|", *rows, "",
             f"| arm | first step with held-out ITM >= {a.target} (per seed) | seconds per step |", "|---|---|---:|",
             *summary]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for arm, records in runs.items():
        steps = [s for s, _ in records[0]["itm"]]
        curves = torch.tensor([[v for _, v in r["itm"]] for r in records])
        m, sd = curves.mean(0), curves.std(0) if len(records) > 1 else torch.zeros(len(steps))
        axes[0].plot(steps, m, "o-", label=arm)
        axes[0].fill_between(steps, m - sd, m + sd, alpha=0.2)
        for ax, key in ((axes[1], "shape_hard_itm"), (axes[2], "t2i_r1")):
            values = torch.tensor([[r["at"][s][key] for s in checkpoints] for r in records])
            ax.errorbar(checkpoints, values.mean(0), yerr=values.std(0) if len(records) > 1 else None, fmt="o-",
                        capsize=3, label=arm)
    for ax, title in zip(axes, ("held-out ITM accuracy", "shape-hard ITM accuracy", "retrieval t2i R@1 (finetuned)")):
        ax.set_title(title)
        ax.set_xlabel("pretraining step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].axhline(0.5, color="grey", lw=0.8)
    axes[1].axhline(0.5, color="grey", lw=0.8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
