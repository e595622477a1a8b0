"""Finetune and evaluate on retrieval.

    deepspeed launch/finetune_retrieval.py --deepspeed_config ds_configs/zero2.json --config configs/finetune_retrieval*.yaml --init runs/.../checkpoints
"""
from cli import main

if __name__ == "__main__":
    main("retrieval", __doc__)
