"""Plan a pretraining run: steps, epochs, wall-clock and GPU-hours on N GPUs, beside published budgets.

    soho-plan --config configs/pretrain_coco_vg.yaml --deepspeed_config ds_configs/zero2.json \\
        --from runs/soho/train.jsonl --measured-on 8 --gpus 8 16 64
    soho-plan ... --from benchmarks/bench_train.json --gpus 8     # a benchmark report
    soho-plan ... --images-per-s 120 --gpus 8                     # per GPU, measured elsewhere

The dataset's size comes from the indexes of data.train_shards; the throughput from a run's
train.jsonl (images/s of all its GPUs: say how many with --measured-on), a benchmark report, or a
number. --efficiency scales it for what multi-node scaling keeps (1.0: linear).
"""
import argparse

from soho_ds.config import ConfigError, load_config, one_line_errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the recipe YAML")
    p.add_argument("--deepspeed_config", required=True, help="the DeepSpeed JSON (micro-batch, accumulation)")
    p.add_argument("--set", action="append", default=[], help="key.sub=value overrides, as the drivers take")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="measured", help="a run's train.jsonl or a benchmarks/*.json report")
    source.add_argument("--images-per-s", type=float, help="measured images/s per GPU")
    p.add_argument("--measured-on", type=int, default=1, help="GPUs (or processes) the measurement ran on")
    p.add_argument("--gpus", type=int, nargs="+", default=[8])
    p.add_argument("--efficiency", type=float, default=1.0, help="share of linear scaling kept (0, 1]")
    a = p.parse_args()
    # imported after parsing: --help answers without loading torch
    from soho_ds.bench.plan import format_plan, measured_images_per_s, plan, source_sizes
    from soho_ds.runtime.engine import load_ds_config
    with one_line_errors():
        cfg = load_config(a.config, a.set)
        if not cfg.data.train_shards:
            raise ConfigError(f"{a.config}: data.train_shards is required to size an epoch")
        sources = source_sizes(cfg)
        images = sum(n for _, n, _ in sources)
        per_gpu = a.images_per_s if a.images_per_s else measured_images_per_s(a.measured, a.measured_on)
        rows = plan(cfg, load_ds_config(a.deepspeed_config), images, per_gpu, a.gpus, a.efficiency)
    print(format_plan(rows, images, per_gpu, sources))


if __name__ == "__main__":
    main()
