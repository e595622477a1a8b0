"""Consolidate a DeepSpeed ZeRO checkpoint into one plain fp32 state dict (no DeepSpeed needed to load it).

    soho-consolidate runs/demo_pretrain/checkpoints out.pt [--tag step_00000150]

Writes out.pt and, beside it, out.yaml: the run config (the model it belongs to; and a VQA model's
out.answer_vocab.json), so that `--init out.pt` and `soho_ds.load_model("out.pt")` rebuild the
model. Uses DeepSpeed's own zero_to_fp32 utility (with its progress bars). For a shareable folder
see tools/export.py.
"""
import argparse
import gc
import logging

from soho_ds.config import one_line_errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint_dir", help="the folder holding 'latest' and the step_* tags")
    p.add_argument("output", help="path of the .pt state dict to write")
    p.add_argument("--tag", help="a tag other than the latest")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    a = p.parse_args()
    # imported after parsing: --help answers without loading torch
    import torch

    from soho_ds.saved import write_consolidated
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with one_line_errors():
        out = write_consolidated(a.checkpoint_dir, a.output, a.tag, a.force)
    state = torch.load(out, weights_only=True)
    logging.info("wrote %d tensors (%.1fM values) to %s, and its run config to %s", len(state),
                 sum(v.numel() for v in state.values()) / 1e6, out, out.with_suffix(".yaml"))
    gc.freeze()  # the exit then skips a collection over torch's millions of objects (~1.3 s on 2 cores)


if __name__ == "__main__":
    main()
