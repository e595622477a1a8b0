"""Pretrain SOHO.

    deepspeed launch/pretrain.py --deepspeed_config ds_configs/zero2.json --config configs/pretrain_coco_vg.yaml
"""
import argparse

from soho_ds.pretrain.run import add_run_arguments, pretrain

if __name__ == "__main__":
    pretrain(add_run_arguments(argparse.ArgumentParser(description=__doc__)).parse_args())
