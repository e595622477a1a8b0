"""A trained model on disk: the one place that knows its layouts and reads or writes them.

A trained model is its run config (which model it is and how its inputs are prepared), its
weights, for VQA its answer vocabulary, and the tokenizer its texts went through. `read(path)`
takes any of the four layouts a user holds:

- a checkpoint folder (it holds `latest`): its latest tag;
- one tag (`step_N`): run_config.yaml and the task's files inside, weights as ZeRO shards;
- a consolidated `X.pt` (`write_consolidated`): `X.yaml` beside it, `X.answer_vocab.json` for VQA;
- an export folder (`write_export`): run_config.yaml, model.safetensors, tokenizer/, answer_vocab.json.

`--init`, `soho_ds.load_model`, export and consolidation all go through it. It imports only the
config, the tokenizer loader and the checked weight reader.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from soho_ds.config import ConfigError, RunConfig, TrainConfig, saved_run_config
from soho_ds.data.text import load_tokenizer
from soho_ds.models.weights import WeightsError, read_state_dict

RUN_CONFIG = "run_config.yaml"
ANSWER_VOCAB = "answer_vocab.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    path = Path(ckpt_dir) / "latest"
    return path.read_text().strip() if path.exists() else None


def task_files(vocab: list[str] | None) -> dict[str, str]:
    """The files a model's task adds beside its run config (name -> text): VQA's answers."""
    return {ANSWER_VOCAB: json.dumps(vocab)} if vocab is not None else {}


@dataclass(frozen=True)
class SavedModel:
    """Where one trained model's parts are; `config`, `weights()` and `tokenizer()` read them."""

    path: Path  # as the user gave it
    folder: Path | None  # the tag or export folder holding the run config (None for a .pt)
    config_tree: dict | None  # the saved run config as written, None when there is none
    config_file: Path | None
    vocab: list[str] | None
    tokenizer_dir: str | None  # an export's own copy; else the run config's data.tokenizer_dir

    @property
    def config(self) -> RunConfig:
        if self.config_tree is None:
            raise ConfigError(f"{self.path}: no {RUN_CONFIG} beside it (a consolidated X.pt needs X.yaml; "
                              "soho-export writes a folder that has everything)")
        return saved_run_config(self.config_tree, str(self.config_file))

    @property
    def task(self) -> str:
        """The task it was trained for: a key of soho_ds.tasks.TASKS, or "pretrain"."""
        return ((self.config_tree or {}).get("task") or {}).get("name") or "pretrain"

    def weights(self) -> dict[str, torch.Tensor]:
        """A plain fp32 state dict; ZeRO shards consolidated by DeepSpeed's own zero_to_fp32."""
        path = self.path
        if path.is_file():
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))
            return read_state_dict(str(path), "checkpoint")
        if (path / WEIGHTS).is_file():
            from safetensors.torch import load_file

            return load_file(str(path / WEIGHTS))
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if (path / "latest").exists():
            return get_fp32_state_dict_from_zero_checkpoint(str(path))
        if path.is_dir() and ((path.parent / "latest").exists() or list(path.glob("*model_states.pt"))):
            return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        raise WeightsError(f"{path}: not a checkpoint (no 'latest' file, no model states, no {WEIGHTS}, not a .pt)")

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_dir or (self.config_tree or {}).get("data", {}).get("tokenizer_dir"))


def read(path: str | Path) -> SavedModel:
    """Finds a trained model's parts in any of the four layouts (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint, tag, .pt or export folder")
    if path.is_file():
        folder = None
        config_file = path.with_suffix(".yaml")
        vocab_file = path.with_name(f"{path.stem}.{ANSWER_VOCAB}")
    else:
        tag = latest_tag(path)
        folder = path / tag if tag else path
        config_file, vocab_file = folder / RUN_CONFIG, folder / ANSWER_VOCAB
    tree = (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else None
    vocab = json.loads(vocab_file.read_text()) if vocab_file.is_file() else None
    own_tokenizer = folder / TOKENIZER if folder is not None else None
    return SavedModel(path, folder, tree, config_file if tree is not None else None, vocab,
                      str(own_tokenizer) if own_tokenizer is not None and own_tokenizer.is_dir() else None)


def _refuse_overwrite(out: Path, overwrite: bool) -> None:
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists{'' if out.is_file() else ' and is not empty'}; choose another "
                              "path or pass overwrite (--force / --overwrite)")


def write_consolidated(checkpoint: str | Path, out: str | Path, tag: str | None = None,
                       overwrite: bool = False) -> Path:
    """One plain fp32 state dict `out` (.pt) from a checkpoint folder (`tag`, default its latest), with
    the run config as `out`.yaml and a VQA model's answers as `out`.answer_vocab.json."""
    out, checkpoint = Path(out), Path(checkpoint)
    _refuse_overwrite(out, overwrite)
    tag = tag or latest_tag(checkpoint)
    if tag is None or not (checkpoint / tag).is_dir():
        raise FileNotFoundError(f"{checkpoint}: no complete checkpoint ('latest' missing) or no tag {tag}")
    model = read(checkpoint / tag)
    torch.save(model.weights(), out)
    if model.config_file is not None:
        shutil.copyfile(model.config_file, out.with_suffix(".yaml"))
    for name, text in task_files(model.vocab).items():
        out.with_name(f"{out.stem}.{name}").write_text(text)
    return out


def write_export(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A self-contained, shareable folder: run_config.yaml (the model), model.safetensors (every weight,
    task head included), the tokenizer files and, for VQA, answer_vocab.json."""
    from safetensors.torch import save_file

    out = Path(out)
    _refuse_overwrite(out, overwrite)
    model = read(checkpoint)
    cfg, state = model.config, model.weights()
    out.mkdir(parents=True, exist_ok=True)
    # safetensors stores no shared tensors: tied weights (the MLM decoder) are written as copies
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(out / WEIGHTS),
              metadata={"format": "pt", "producer": "soho-ds"})
    tree = cfg.to_dict()
    # the model and how images and texts are prepared travel; the training machine's paths do not
    tree["data"].update(tokenizer_dir=None, train_shards=[], val_shards=[], retrieval_shards=[])
    tree["task"].update(train_file=None, eval_file=None, train_answers=None, eval_answers=None, image_root="")
    tree["train"]["output_dir"] = TrainConfig.output_dir
    (out / RUN_CONFIG).write_text(yaml.safe_dump(tree, sort_keys=False))
    model.tokenizer().save_pretrained(str(out / TOKENIZER))
    for name, text in task_files(model.vocab).items():
        (out / name).write_text(text)
    (out / "README.md").write_text(f"A soho-ds {cfg.task.name or 'pretraining'} model exported from "
                                   f"{Path(checkpoint).name}.\n\n    import soho_ds\n    model = "
                                   f"soho_ds.load_model(\"{out.name}\")\n")
    umask = os.umask(0)
    os.umask(umask)
    for path in out.rglob("*"):  # made to be shared: readable as any file this user writes
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    return out
