"""Finetune and evaluate on vqa.

    deepspeed launch/finetune_vqa.py --deepspeed_config ds_configs/zero2.json --config configs/finetune_vqa*.yaml --init runs/.../checkpoints
"""
import argparse

from soho_ds.runtime.run import main
from soho_ds.tasks.run import add_finetune_arguments, finetune

if __name__ == "__main__":
    main(finetune, add_finetune_arguments(argparse.ArgumentParser(description=__doc__)), "vqa")
