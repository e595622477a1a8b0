"""Zero-shot retrieval measured while pretraining: the two-stage scores against an independent
computation (every pair's ITM and the ITC cosines), recall in eval.jsonl at each evaluation, the
evaluation's share of the run logged, and the best checkpoint by retrieval kept beside `latest`."""
import json

import pytest
import torch

from conftest import ROOT
from launching import TINY, pretrain_in_process
from soho_ds.config import ConfigError, load_config
from soho_ds.data.pipeline import ImageSpec, ShardLoader
from soho_ds.data.text import load_tokenizer
from soho_ds.pretrain.model import SohoPretrainer
from soho_ds.pretrain.retrieval import RERANKED, retrieval_scores


@pytest.fixture(scope="module")
def pretrainer_and_batches(synthetic_data):
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/pretrain_synthetic.yaml", TINY + ["pretrain.itc_weight=1.0"])
    model = SohoPretrainer(cfg.model, cfg.pretrain).eval()
    loader = ShardLoader(f"{synthetic_data}/val", 4, ImageSpec(mode="aspect", shorter_side=64, longer_side=96,
                                                                 stride=32), train=False, num_threads=1)
    batches = list(loader.epochs())[:3]  # 12 images
    tokenizer = load_tokenizer()

    def tokenize(texts):
        return tokenizer(texts, padding="max_length", truncation=True, max_length=20, return_tensors="pt")

    return model, batches, tokenize


def independent_scores(model, batches, tokenize):
    """Every (image, caption) pair's ITM score and ITC cosine, one pair at a time."""
    images = [(b.images[i:i + 1], b.image_sizes[i:i + 1], b.metas[i]["captions"]) for b in batches
              for i in range(len(b.metas))]
    texts = [c for _, _, caps in images for c in caps]
    enc = tokenize(texts)
    itm = torch.zeros(len(images), len(texts))
    cosine = torch.zeros(len(images), len(texts))
    with torch.no_grad():
        for i, (image, size, _) in enumerate(images):
            visual = model.model.encode_image(image, size)
            img = torch.nn.functional.normalize(model.itc_head.image(
                (visual.tokens * visual.valid[..., None]).sum(1) / visual.valid.sum(1, keepdim=True)), dim=-1)
            for t in range(len(texts)):
                ids, mask = enc["input_ids"][t:t + 1], enc["attention_mask"][t:t + 1]
                _, pooled = model.model.fuse(ids, mask, visual, torch.zeros(1, dtype=torch.long))
                logits = model.itm_head(pooled)[0]
                itm[i, t] = logits[1] - logits[0]
                txt = torch.nn.functional.normalize(model.itc_head.text(model.model.encode_text(ids, mask)), dim=-1)
                cosine[i, t] = (img @ txt.t())[0, 0]
    return itm, cosine, torch.tensor([i for i, (_, _, caps) in enumerate(images) for _ in caps])


def test_two_stage_scores_match_every_pair_computed_alone(pretrainer_and_batches):
    model, batches, tokenize = pretrainer_and_batches
    itm, cosine, text_image = independent_scores(model, batches, tokenize)
    # K as large as the set: every pair reranked, the ranking is ITM's alone
    scores, got_image = retrieval_scores(model, batches, tokenize, 1000, 1000, torch.device("cpu"), torch.float32)
    assert torch.equal(got_image, text_image)
    assert torch.allclose(scores - RERANKED, itm.double(), atol=1e-4)
    # K = 2: each image's two best captions by cosine and each caption's two best images get ITM's score
    # (lifted above every cosine); every other pair keeps its cosine
    scores, _ = retrieval_scores(model, batches, tokenize, 2, 1000, torch.device("cpu"), torch.float32)
    wanted = torch.zeros_like(cosine, dtype=torch.bool)
    wanted.scatter_(1, cosine.topk(2, dim=1).indices, True)
    wanted.scatter_(0, cosine.topk(2, dim=0).indices, True)
    assert torch.allclose(scores[wanted] - RERANKED, itm[wanted].double(), atol=1e-4)
    assert torch.allclose(scores[~wanted], cosine[~wanted].double(), atol=1e-5)
    # the image cap: 5 of the 12 images, with their captions only
    scores, got_image = retrieval_scores(model, batches, tokenize, 2, 5, torch.device("cpu"), torch.float32)
    assert scores.shape == (5, int((text_image < 5).sum())) and torch.equal(got_image, text_image[text_image < 5])


@pytest.mark.slow
def test_pretraining_measures_retrieval_at_each_evaluation_and_keeps_the_best_checkpoint(synthetic_data, tmp_path,
                                                                                         world_of_one, monkeypatch):
    pretrain_in_process(tmp_path, f"{synthetic_data}/train", 4,
                        sets=[f"data.retrieval_shards={synthetic_data}/val", "train.eval_every=2",
                              "train.retrieval_images=12", "train.retrieval_rerank=3"])
    evals = [json.loads(line) for line in (tmp_path / "run/eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:
        assert e["retrieval/images"] == 12.0 and e["eval_s"] > 0
        assert {f"retrieval/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} <= set(e)
        assert e["retrieval/rsum"] == pytest.approx(sum(e[f"retrieval/{d}_r{k}"] for d in ("i2t", "t2i")
                                                        for k in (1, 5, 10)))
    ckpt = tmp_path / "run/checkpoints"
    best = json.loads((ckpt / "best.json").read_text())
    winner = max(evals, key=lambda e: (e["retrieval/rsum"], -e["step"]))  # a tie keeps the earlier one
    assert best == {"tag": f"step_{winner['step']:08d}", "step": winner["step"], "metric": "retrieval/rsum",
                    "value": winner["retrieval/rsum"]}
    assert (ckpt / "best").read_text() == best["tag"] and (ckpt / best["tag"] / "meta.json").is_file()
    assert (ckpt / "latest").read_text() == "step_00000004"


def test_retrieval_without_the_itc_first_stage_is_refused(synthetic_data):
    with pytest.raises(ConfigError, match=r"data.retrieval_shards needs pretrain.itc_weight > 0"):
        load_config(ROOT / "configs/pretrain_synthetic.yaml",
                    TINY + ["pretrain.itc_weight=0", f"data.retrieval_shards={synthetic_data}/val"])
