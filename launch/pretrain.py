"""Pretrain SOHO.

    deepspeed launch/pretrain.py --deepspeed_config ds_configs/zero2.json --config configs/pretrain_coco_vg.yaml
"""
import argparse

from soho_ds.pretrain.run import pretrain
from soho_ds.runtime.run import add_run_arguments, main

if __name__ == "__main__":
    main(pretrain, add_run_arguments(argparse.ArgumentParser(description=__doc__)))
