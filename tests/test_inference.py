"""A trained model from Python (soho_ds.load_model), exported folders, and search over one's own images:
each reproduces what the finetune drivers measured, without DeepSpeed."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import soho_ds
from launching import ENV


def same_answers(a, b):
    """Equal answers, scores equal up to float rounding (two model instances may sum in another order)."""
    return [[x for x, _ in row] for row in a] == [[x for x, _ in row] for row in b] and all(
        abs(s - t) < 1e-5 for ra, rb in zip(a, b) for (_, s), (_, t) in zip(ra, rb))


def eval_split(downstream):
    from soho_ds.tasks.retrieval import read_karpathy

    images = read_karpathy(downstream / "retrieval/dataset_synthetic.json", ("test",))
    return ([str(downstream / "images" / im.image) for im in images], [c for im in images for c in im.captions],
            torch.tensor([i for i, im in enumerate(images) for _ in im.captions]))


@pytest.mark.slow
def test_load_model_reproduces_the_retrieval_drivers_recall(grounded, grounded_retrieval):
    from soho_ds.tasks.retrieval import recall_at_k

    model = soho_ds.load_model(grounded_retrieval["checkpoint"], device="cpu")
    assert model.task == "retrieval"
    images, texts, text_image = eval_split(grounded["downstream"])
    scores = model.itm_matrix(images, texts)
    assert scores.shape == (20, 100) and 0 <= scores.min() and scores.max() <= 1
    ours = recall_at_k(scores, text_image)
    driver = grounded_retrieval["metrics"]
    assert {k: ours[k] for k in ours} == {k: driver[k] for k in ours}, (ours, driver)
    # pairs: the i-th image with the i-th caption, the matrix's probabilities up to the CNN's border
    # effect (these batches pad the images differently; test_grounding measures that effect)
    pairs = model.itm([images[int(i)] for i in text_image[:8]], texts[:8])
    # measured 2026-12-03: mean 0.028, max 0.081 over these 8 pairs (test_grounding bounds one image's effect)
    diffs = (pairs - scores[text_image[:8], torch.arange(8)]).abs()
    assert diffs.mean() < 0.04 and diffs.max() < 0.1, diffs


@pytest.mark.slow
def test_images_as_paths_pil_images_or_arrays_score_alike(grounded, grounded_retrieval):
    model = soho_ds.load_model(grounded_retrieval["checkpoint"], device="cpu")
    images, texts, _ = eval_split(grounded["downstream"])
    pil = [Image.open(p).convert("RGB") for p in images[:4]]
    by_path = model.itm(images[:4], texts[:20:5])
    by_pil = model.itm(pil, texts[:20:5])
    by_array = model.itm([np.asarray(im) for im in pil], texts[:20:5])
    torch.testing.assert_close(by_pil, by_array)
    # PIL's JPEG decoder and DALI's round a few pixels differently
    assert (by_path - by_pil).abs().max() < 0.05, (by_path, by_pil)
    with pytest.raises(ValueError, match="does not score image-text pairs|not a vqa"):
        model.answer(images[:1], ["what colour?"])


@pytest.mark.slow
def test_vqa_answers_reproduce_the_drivers_accuracy_and_survive_export(grounded, grounded_vqa, tmp_path):
    from soho_ds.tasks.vqa import read_vqa, vqa_accuracy

    root = grounded["downstream"]
    questions = read_vqa(root / "vqa/questions_val.json", root / "vqa/annotations_val.json")
    images = [str(root / "images" / f"{q.image_id}.jpg") for q in questions]
    model = soho_ds.load_model(grounded_vqa["checkpoint"], device="cpu")
    answers = model.answer(images, [q.question for q in questions], top_k=3)
    assert len(answers) == len(questions) and all(len(a) == 3 and a[0][1] >= a[1][1] >= a[2][1] for a in answers)
    accuracy = 100 * sum(vqa_accuracy(a[0][0], list(q.answers)) for a, q in zip(answers, questions)) / len(questions)
    assert accuracy == pytest.approx(grounded_vqa["metrics"]["vqa_accuracy"], abs=1e-6)

    # export: a self-contained folder with the same answers
    subprocess.run([str(Path(sys.executable).parent / "soho-export"), str(grounded_vqa["checkpoint"]),
                    str(tmp_path / "exported")], check=True, env=ENV, capture_output=True)
    files = {p.name for p in (tmp_path / "exported").iterdir()}
    assert {"run_config.yaml", "model.safetensors", "answer_vocab.json", "tokenizer", "README.md"} <= files
    saved = (tmp_path / "exported/run_config.yaml").read_text()
    assert "tokenizer_dir: null" in saved
    assert str(grounded["root"]) not in saved and str(grounded_vqa["run"]) not in saved  # no training machine path
    umask = os.umask(0)
    os.umask(umask)
    assert {oct((tmp_path / "exported" / name).stat().st_mode & 0o777) for name in files} >= {oct(0o666 & ~umask)}
    assert oct((tmp_path / "exported/model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~umask)
    exported = soho_ds.load_model(tmp_path / "exported", device="cpu")
    assert same_answers(exported.answer(images[:16], [q.question for q in questions[:16]], top_k=3), answers[:16])
    again = subprocess.run([str(Path(sys.executable).parent / "soho-export"), str(grounded_vqa["checkpoint"]),
                            str(tmp_path / "exported")], env=ENV, capture_output=True, text=True)
    assert again.returncode != 0 and "exists and is not empty" in again.stderr  # never overwritten unasked

    # a consolidated file carries its run config and vocabulary beside it
    subprocess.run([str(Path(sys.executable).parent / "soho-consolidate"), str(grounded_vqa["checkpoint"]),
                    str(tmp_path / "vqa.pt")], check=True, env=ENV, capture_output=True)
    assert (tmp_path / "vqa.yaml").is_file() and (tmp_path / "vqa.answer_vocab.json").is_file()
    consolidated = soho_ds.load_model(tmp_path / "vqa.pt", device="cpu")
    assert same_answers(consolidated.answer(images[:16], [q.question for q in questions[:16]], top_k=3),
                        answers[:16])


@pytest.mark.slow
@pytest.mark.parametrize("task", ["nlvr2", "snli_ve"])
def test_classifiers_reproduce_the_drivers_accuracy(task, downstream, classifier_runs):
    """The drivers' own runs (test_finetune.py's): the API must give the driver's predictions, right or not."""
    run = classifier_runs(task)
    metrics = run["metrics"]
    model = soho_ds.load_model(run["run"] / "checkpoints", device="cpu")
    if task == "nlvr2":
        from soho_ds.tasks.nlvr2 import read_nlvr2

        examples = read_nlvr2(downstream / "nlvr2/dev.json")
        probs = model.nlvr2([str(downstream / "images" / e.images[0]) for e in examples],
                            [str(downstream / "images" / e.images[1]) for e in examples],
                            [e.sentence for e in examples])
        predicted = [int(p["True"] > p["False"]) for p in probs]
    else:
        from soho_ds.tasks.snli_ve import LABELS, read_snli_ve

        examples = read_snli_ve(downstream / "snli_ve/snli_ve_dev.jsonl")
        probs = model.entailment([str(downstream / "images" / e.image) for e in examples],
                                 [e.hypothesis for e in examples])
        predicted = [LABELS[max(p, key=p.get)] for p in probs]
    assert all(abs(sum(p.values()) - 1) < 1e-5 for p in probs)
    accuracy = 100 * sum(p == e.label for p, e in zip(predicted, examples)) / len(examples)
    assert accuracy == pytest.approx(metrics["accuracy"], abs=1e-4)


@pytest.mark.slow
def test_retrieve_tool_ranks_ones_own_images_and_caches_their_tokens(grounded, grounded_retrieval, tmp_path):
    from soho_ds.search import ImageIndex

    images, texts, text_image = eval_split(grounded["downstream"])
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in images:
        (folder / p.rsplit("/", 1)[1]).write_bytes(open(p, "rb").read())
    cmd = [str(Path(sys.executable).parent / "soho-retrieve"), "--model", str(grounded_retrieval["checkpoint"]),
           "--images", str(folder), "--top", "3", texts[0], texts[7]]
    first = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "20 images (20 encoded now" in first.stdout and (folder / ".soho_ds_cache/visual_tokens.pt").is_file()
    # a second search with broken photos among them: the 20 from the cache, the broken ones left out,
    # named and counted, the same ranking
    (folder / "garbage.jpg").write_bytes(b"not an image at all")
    (folder / "empty.png").write_bytes(b"")
    whole = open(images[0], "rb").read()
    (folder / "cut.jpg").write_bytes(whole[:len(whole) // 2])  # its header reads; its data does not decode
    second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "20 images (0 encoded now" in second.stdout  # from the cache
    assert "3 images left out (cannot be read or decoded):" in second.stdout
    assert f"{folder / 'empty.png'}: empty file" in second.stdout
    assert f"{folder / 'garbage.jpg'}: UnidentifiedImageError" in second.stdout
    assert f"{folder / 'cut.jpg'}: does not decode" in second.stdout
    assert [line for line in second.stdout.splitlines() if ". 0." in line or ". 1." in line] == \
        [line for line in first.stdout.splitlines() if ". 0." in line or ". 1." in line]
    for name in ("garbage.jpg", "empty.png", "cut.jpg"):
        (folder / name).unlink()
    # the ranking equals the ITM scores of the model over the same images (cache = direct encoding)
    model = soho_ds.load_model(grounded_retrieval["checkpoint"], device="cpu")
    index = ImageIndex(model, folder, tmp_path / "cache.pt")
    index.build(progress=False)
    direct = model.itm_matrix(index.paths, [texts[0]])[:, 0]
    hits = index.search(texts[0], top=20)
    assert [h.path for h in hits] == [index.paths[i] for i in direct.argsort(descending=True, stable=True).tolist()]
    torch.testing.assert_close(torch.tensor([h.score for h in hits]), direct.sort(descending=True).values,
                               rtol=1e-4, atol=1e-5)
    # first stage: only the 10 best by ITC are reranked, by the same ITM scores
    staged = index.search(texts[0], top=3, first_stage=10)
    by_itc = {index.paths[i] for i in index.itc_scores(texts[0]).argsort(descending=True)[:10].tolist()}
    scores = dict(zip(index.paths, direct.tolist()))
    assert len(staged) == 3 and {h.path for h in staged} <= by_itc
    assert all(abs(h.score - scores[h.path]) < 1e-4 for h in staged)
    assert [h.score for h in staged] == sorted((h.score for h in staged), reverse=True)
