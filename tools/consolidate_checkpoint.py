"""Consolidate a DeepSpeed ZeRO checkpoint into one plain fp32 state dict (no DeepSpeed needed to load it).

    python tools/consolidate_checkpoint.py runs/demo_pretrain/checkpoints out.pt [--tag step_00000150]

Writes out.pt and, beside it, out.yaml: the run config (the model it belongs to; and a VQA model's
out.answer_vocab.json), so that
`--init out.pt` and `soho_ds.load_model("out.pt")` rebuild the model. Uses DeepSpeed's own
zero_to_fp32 utility (with its progress bars). For a shareable folder see tools/export.py.
"""
import argparse
import logging
import shutil
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from soho_ds.runtime.checkpoint import RUN_CONFIG, latest_tag
from soho_ds.tasks.vqa import ANSWER_VOCAB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint_dir", help="the folder holding 'latest' and the step_* tags")
    p.add_argument("output", help="path of the .pt state dict to write")
    p.add_argument("--tag", help="a tag other than the latest")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(a.output)
    if out.exists() and not a.force:
        raise SystemExit(f"{out} exists; pass --force to overwrite it")
    tag = a.tag or latest_tag(a.checkpoint_dir)
    if tag is None or not (Path(a.checkpoint_dir) / tag).is_dir():
        raise SystemExit(f"error: {a.checkpoint_dir}: no complete checkpoint ('latest' missing) or no tag {tag}")
    state = get_fp32_state_dict_from_zero_checkpoint(a.checkpoint_dir, tag=tag)
    torch.save(state, out)
    shutil.copyfile(Path(a.checkpoint_dir) / tag / RUN_CONFIG, out.with_suffix(".yaml"))
    if (Path(a.checkpoint_dir) / tag / ANSWER_VOCAB).is_file():  # a VQA model's answers travel with it
        shutil.copyfile(Path(a.checkpoint_dir) / tag / ANSWER_VOCAB, out.with_name(f"{out.stem}.{ANSWER_VOCAB}"))
    logging.info("wrote %d tensors (%.1fM values) to %s, and its run config to %s", len(state),
                 sum(v.numel() for v in state.values()) / 1e6, out, out.with_suffix(".yaml"))


if __name__ == "__main__":
    main()
