"""Finetune and evaluate on snli_ve.

    deepspeed launch/finetune_snli_ve.py --deepspeed_config ds_configs/zero2.json --config configs/finetune_snli_ve*.yaml --init runs/.../checkpoints
"""
from cli import main

if __name__ == "__main__":
    main("snli_ve", __doc__)
