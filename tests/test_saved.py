"""The saved model: every layout a user holds reads back the same config, weights and answers, every
task's model is rebuilt from the one registry, and nothing is overwritten unasked."""
import json

import pytest
import torch
import yaml
from conftest import tiny_model_config
from safetensors.torch import save_file

from soho_ds import saved
from soho_ds.config import RunConfig, TaskConfig
from soho_ds.inference import build_module
from soho_ds.tasks import TASKS


def _tree(task: str) -> dict:
    cfg = RunConfig(model=tiny_model_config(), task=TaskConfig(name="" if task == "pretrain" else task))
    return json.loads(json.dumps(cfg.to_dict()))  # as it reads back from YAML: lists, not tuples


def test_the_four_layouts_give_the_same_model(tmp_path):
    tree, vocab = _tree("vqa"), ["yes", "no", "2"]
    state = {"model.w": torch.arange(6.0).reshape(2, 3), "head.b": torch.ones(3)}
    # a tag and its checkpoint folder (the weights of a tag are DeepSpeed's: read in the driver tests)
    tag = tmp_path / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    (tag / saved.RUN_CONFIG).write_text(yaml.safe_dump(tree))
    (tag / saved.ANSWER_VOCAB).write_text(json.dumps(vocab))
    (tmp_path / "checkpoints" / "latest").write_text("step_00000004")
    for path in (tmp_path / "checkpoints", tag):
        model = saved.read(path)
        assert (model.folder, model.config_tree, model.vocab, model.task) == (tag, tree, vocab, "vqa")
        assert model.tokenizer_dir is None  # the run config's tokenizer
    # a consolidated .pt with X.yaml and X.answer_vocab.json beside it
    torch.save(state, tmp_path / "vqa.pt")
    (tmp_path / "vqa.yaml").write_text(yaml.safe_dump(tree))
    (tmp_path / f"vqa.{saved.ANSWER_VOCAB}").write_text(json.dumps(vocab))
    # an export folder
    export = tmp_path / "export"
    (export / saved.TOKENIZER).mkdir(parents=True)
    save_file(state, str(export / saved.WEIGHTS))
    (export / saved.RUN_CONFIG).write_text(yaml.safe_dump(tree))
    (export / saved.ANSWER_VOCAB).write_text(json.dumps(vocab))
    for path in (tmp_path / "vqa.pt", export):
        model = saved.read(path)
        assert (model.config_tree, model.vocab, model.task) == (tree, vocab, "vqa")
        assert model.config.task.name == "vqa" and model.config.model.hidden_size == 64
        got = model.weights()
        assert sorted(got) == sorted(state) and all(torch.equal(got[k], state[k]) for k in state)
    assert saved.read(export).tokenizer_dir == str(export / saved.TOKENIZER)


def test_a_file_without_its_run_config_is_named(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "bare.pt")
    model = saved.read(tmp_path / "bare.pt")
    assert model.config_tree is None and model.task == "pretrain"
    with pytest.raises(ValueError, match=r"bare\.pt: no run_config\.yaml beside it \(a consolidated X\.pt needs X\.yaml"):
        model.config
    with pytest.raises(FileNotFoundError, match=r"missing: no such checkpoint, tag, \.pt or export folder"):
        saved.read(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"empty: not a checkpoint \(no 'latest' file"):
        (tmp_path / "empty").mkdir()
        saved.read(tmp_path / "empty").weights()


def test_consolidation_refuses_to_overwrite(tmp_path):
    (tmp_path / "out.pt").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match=r"out\.pt exists; choose another path or pass overwrite"):
        saved.write_consolidated(tmp_path / "checkpoints", tmp_path / "out.pt")
    assert (tmp_path / "out.pt").read_bytes() == b"keep"


@pytest.mark.parametrize("task", ["pretrain", *TASKS])
def test_every_task_is_rebuilt_from_the_one_registry(task):
    cfg = saved.SavedModel(None, None, _tree(task), "run_config.yaml", None, None).config
    vocab = ["yes", "no", "2", "red"] if task == "vqa" else None
    module = build_module(cfg, task, vocab)
    expected = {"pretrain": "SohoPretrainer", **{name: t.model_class.__name__ for name, t in TASKS.items()}}[task]
    assert type(module).__name__ == expected
    outputs = {"vqa": len(vocab or ()), "nlvr2": 2, "snli_ve": 3}
    if task in outputs:  # the head's width is the task's own label list (or answers)
        assert list(module.parameters())[-1].shape[0] == outputs[task]
        assert len(TASKS[task].labels) == (outputs[task] if task != "vqa" else 0)
    if task == "vqa":
        with pytest.raises(ValueError, match="a VQA model needs its answer vocabulary"):
            build_module(cfg, task, None)
