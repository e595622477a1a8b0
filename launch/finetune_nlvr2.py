"""Finetune and evaluate on nlvr2.

    deepspeed launch/finetune_nlvr2.py --deepspeed_config ds_configs/zero2.json --config configs/finetune_nlvr2*.yaml --init runs/.../checkpoints
"""
from cli import main

if __name__ == "__main__":
    main("nlvr2", __doc__)
