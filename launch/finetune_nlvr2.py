"""Finetune and evaluate on nlvr2.

    deepspeed launch/finetune_nlvr2.py --deepspeed_config ds_configs/zero2.json --config configs/finetune_nlvr2_*.yaml --init runs/.../checkpoints
"""
import argparse

from soho_ds.tasks.run import add_finetune_arguments, finetune

if __name__ == "__main__":
    finetune(add_finetune_arguments(argparse.ArgumentParser(description=__doc__)).parse_args(), "nlvr2")
