"""Convergence with and without the semantic visual losses, on the synthetic set (issue 6).

Pretrains twice with the same seed, data, steps and launcher: SOHO's losses alone
(configs/pretrain_synthetic.yaml) and SOHO + semantic losses (configs/pretrain_synthetic_semantic.yaml),
checkpointing at each of --steps. At each checkpoint it records held-out ITM accuracy and the
wall-clock time, then finetunes retrieval briefly from that checkpoint (and once from random
initialisation) and records text->image / image->text R@1 over the full synthetic test split.

    python tools/compare_semantic.py --steps 100,200,300      # ~35 min on 2 CPU cores

Writes benchmarks/semantic_convergence.{json,md,png} (the README shows the PNG and the table).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"soho": "configs/pretrain_synthetic.yaml", "soho+semantic": "configs/pretrain_synthetic_semantic.yaml"}
FINETUNE = "configs/finetune_retrieval_synthetic.yaml"


def launch(script: str, args: list[str], ranks: int, ds_config: str) -> None:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(29600 + os.getpid() % 1000), script,
           "--deepspeed_config", ds_config] + args
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def read_evals(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="100,200,300", help="checkpoint steps, comma-separated")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--deepspeed_config", default="ds_configs/zero2_cpu_demo.json")
    p.add_argument("--finetune-steps", type=int, default=60)
    p.add_argument("--runs", default="runs/semantic_compare", help="scratch folder for the runs")
    p.add_argument("--out", default="benchmarks/semantic_convergence", help="output path without extension")
    p.add_argument("--set", action="append", default=[], help="extra overrides for both pretraining arms")
    a = p.parse_args()
    steps = sorted(int(s) for s in a.steps.split(","))
    runs = ROOT / a.runs
    results: dict = {"steps": steps, "arms": {}, "ranks": a.ranks, "deepspeed_config": a.deepspeed_config,
                     "finetune_steps": a.finetune_steps}

    def finetune(name: str, init: Path | None) -> dict:
        out = runs / f"finetune_{name}"
        args = ["--config", FINETUNE, "--set", f"train.output_dir={out}", "--set",
                f"train.max_steps={a.finetune_steps}"]
        # --init replaces every weight; without it, nothing pretrained at all (no stand-ins either)
        args += ["--init", str(init)] if init else ["--set", "model.backbone_weights=null", "--set", "model.bert_dir=null"]
        if not (out / "eval.jsonl").exists():
            launch("launch/finetune_retrieval.py", args, a.ranks, a.deepspeed_config)
        last = read_evals(out)[-1]
        return {k: last[k] for k in ("t2i_r1", "i2t_r1", "t2i_r5", "i2t_r5")}

    for arm, config in ARMS.items():
        run = runs / arm.replace("+", "_")
        t0 = time.time()
        if not (run / "eval.jsonl").exists():
            launch("launch/pretrain.py", ["--config", config, "--set", f"train.output_dir={run}",
                                          "--set", f"train.max_steps={steps[-1]}",
                                          "--set", f"train.eval_every={steps[0]}",
                                          "--set", f"train.save_every={steps[0]}"] + sum((["--set", s] for s in a.set), []),
                   a.ranks, a.deepspeed_config)
        evals = {e["step"]: e for e in read_evals(run)}
        rows = []
        for s in steps:
            e = evals[s]
            rows.append({"step": s, "wall_s": e["wall_s"], "itm_acc": e["acc/itm"], "mlm_acc": e["acc/mlm"],
                         "object_acc": e.get("acc/object"), "attribute_acc": e.get("acc/attribute"),
                         **finetune(f"{run.name}_{s}", run / "checkpoints" / f"step_{s:08d}")})
        results["arms"][arm] = {"config": config, "rows": rows, "total_s": round(time.time() - t0, 1)}
    results["random_init"] = finetune("random_init", None)
    write(results, ROOT / a.out)


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    def acc(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["| arm | step | wall-clock s | held-out ITM acc | MLM acc | box object acc | box attribute acc "
             "| retrieval t2i R@1 | i2t R@1 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, r in results["arms"].items():
        for row in r["rows"]:
            lines.append(f"| {arm} | {row['step']} | {row['wall_s']:.0f} | {row['itm_acc']:.3f} | "
                         f"{row['mlm_acc']:.3f} | {acc(row.get('object_acc'))} | {acc(row.get('attribute_acc'))} | "
                         f"{row['t2i_r1']:.1f} | {row['i2t_r1']:.1f} |")
    ri = results["random_init"]
    lines.append(f"| random init | 0 | 0 | - | - | - | - | {ri['t2i_r1']:.1f} | {ri['i2t_r1']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for arm, r in results["arms"].items():
        rows = r["rows"]
        axes[0].plot([x["step"] for x in rows], [x["itm_acc"] for x in rows], "o-", label=arm)
        axes[1].plot([x["wall_s"] for x in rows], [x["itm_acc"] for x in rows], "o-", label=arm)
        axes[2].plot([x["step"] for x in rows], [x["t2i_r1"] for x in rows], "o-", label=f"{arm} t2i")
        axes[2].plot([x["step"] for x in rows], [x["i2t_r1"] for x in rows], "s--", label=f"{arm} i2t")
    axes[2].axhline(ri["t2i_r1"], color="grey", lw=0.8, label="random init t2i")
    for ax, title, xl in ((axes[0], "held-out ITM accuracy", "pretraining step"),
                          (axes[1], "held-out ITM accuracy", "wall-clock s"),
                          (axes[2], "retrieval R@1 after finetuning", "pretraining step")):
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].axhline(0.5, color="grey", lw=0.8)
    axes[1].axhline(0.5, color="grey", lw=0.8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
