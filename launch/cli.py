"""The drivers' command line, parsed into the typed arguments of soho_ds's `pretrain` and `finetune`.

Every launcher here is `main("<driver>")`; `deepspeed` starts one process per rank and passes
`--local_rank` (read by DeepSpeed itself), plus the options below.
"""
import argparse
import gc
import logging
import sys

import deepspeed
import torch

from soho_ds.config import ReportedError
from soho_ds.runtime.engine import PRECISIONS


def parser(description: str, finetune: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML (configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"),
                   help="continue from the latest checkpoint in output_dir (an error if there is none); "
                        "'--resume auto': continue if there is one, else start (for requeued jobs)")
    p.add_argument("--restart", action="store_true",
                   help="start over in an output_dir that holds a run: its files move to output_dir/previous/")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: the JSON's choice on GPU, bf16 instead of fp16 on CPU")
    p.add_argument("--inject_fault", metavar="R:N[-M]:KIND[:launcher]",
                   help="for resilience tests and soak runs: a fault at a fixed step (soho_ds/runtime/faults.py)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    if finetune:
        p.add_argument("--init", help="checkpoint to start from: a DeepSpeed checkpoint folder, one tag, a "
                                      "consolidated .pt or an export folder; its model config is used")
        p.add_argument("--eval_only", action="store_true", help="evaluate --init (or the resumed run) and stop")
    return deepspeed.add_config_arguments(p)


def main(driver: str, description: str) -> None:
    """Parses the command line and runs `driver` ("pretrain" or a finetune task's name). An error that
    explains itself (ReportedError) ends the process with its message and status 1, no traceback."""
    a = parser(description, finetune=driver != "pretrain").parse_args()
    common = dict(overrides=a.set, resume=a.resume, restart=a.restart, precision=a.precision)
    try:
        if a.inject_fault:
            from soho_ds.runtime.faults import FaultInjection

            common["hooks"] = FaultInjection(a.inject_fault)
        if driver == "pretrain":
            from soho_ds.pretrain.run import pretrain

            pretrain(a.config, a.deepspeed_config, **common)
        else:
            from soho_ds.tasks.run import finetune

            finetune(driver, a.config, a.deepspeed_config, init=a.init, eval_only=a.eval_only, **common)
    except ReportedError as e:
        logging.getLogger("soho_ds").error("%s", e)
        sys.exit(1)
    finally:
        gc.freeze()  # the exit then skips a collection over torch's millions of objects (~1.5 s a rank on 2 cores)
    if torch.distributed.is_initialized():  # NCCL reports leaked resources at exit otherwise
        torch.distributed.destroy_process_group()
