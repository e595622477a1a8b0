"""Finetune and evaluate on vqa.

    deepspeed launch/finetune_vqa.py --deepspeed_config ds_configs/zero2.json --config configs/finetune_vqa*.yaml --init runs/.../checkpoints
"""
from cli import main

if __name__ == "__main__":
    main("vqa", __doc__)
