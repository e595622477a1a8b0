"""Consolidate a DeepSpeed ZeRO checkpoint into one plain fp32 state dict (no DeepSpeed needed to load it).

    python tools/consolidate_checkpoint.py runs/demo_pretrain/checkpoints out.pt [--tag step_00000150]

The result loads into the same module without DeepSpeed, e.g. for inference or finetuning:
    SohoPretrainer(cfg.model, cfg.pretrain).load_state_dict(torch.load("out.pt"))
or as `--init out.pt` of any finetune driver. Uses DeepSpeed's own zero_to_fp32 utility.
"""
import argparse
import logging

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint_dir", help="the folder holding 'latest' and the step_* tags")
    p.add_argument("output", help="path of the .pt state dict to write")
    p.add_argument("--tag", help="a tag other than the latest")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    state = get_fp32_state_dict_from_zero_checkpoint(a.checkpoint_dir, tag=a.tag)
    torch.save(state, a.output)
    logging.info("wrote %d tensors (%.1fM values) to %s", len(state), sum(v.numel() for v in state.values()) / 1e6,
                 a.output)


if __name__ == "__main__":
    main()
