"""Pretrain SOHO.

    deepspeed launch/pretrain.py --deepspeed_config ds_configs/zero2.json --config configs/pretrain_coco_vg.yaml
"""
from cli import main

if __name__ == "__main__":
    main("pretrain", __doc__)
