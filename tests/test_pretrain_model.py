import dataclasses

import pytest
import torch

from conftest import tiny_model_config
from soho_ds.data.text import PretrainTextBuilder
from soho_ds.config import PretrainConfig
from soho_ds.models.backbone import ResNetBackbone
from soho_ds.models.soho import SohoModel, sine_position_encoding
from soho_ds.models.weights import load_checked
from soho_ds.pretrain.model import SohoPretrainer

CAPS = [["a small red circle at the top", "one shape: a small red circle"],
        ["a large blue square on the left", "a blue square on a grey background"],
        ["a small green triangle in the centre", "there is a small green triangle in the centre"]]


def make_batch(tokenizer, seed=0):
    batch = PretrainTextBuilder(tokenizer, 16, 2, 0.3, 0.5, seed)(CAPS)
    batch["images"] = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return batch


def test_every_head_gives_a_scalar_loss_and_every_trainable_parameter_a_gradient(tokenizer):
    torch.manual_seed(0)
    model = SohoPretrainer(tiny_model_config(), PretrainConfig(mvm_prob=1.0, itc_weight=0.5)).train()
    out = model.commit(model(make_batch(tokenizer)))
    for key in ("loss", "loss/mlm", "loss/mvm", "loss/itm", "loss/itc", "acc/itm", "acc/mlm", "acc/mvm", "acc/itc",
                "vd/usage"):
        assert out[key].shape == () and torch.isfinite(out[key]), key
    assert out["loss/mvm"] > 0 and out["loss/mlm"] > 0 and out["loss/itc"] > 0
    expected = out["loss/mlm"] + out["loss/mvm"] + out["loss/itm"] + 0.5 * out["loss/itc"]
    assert torch.allclose(out["loss"], expected)
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None)]
    assert not missing, missing


SOHO_HEADS = dict(pooling="raw_cls", itm_bias=False, gate="official")
SOHO_OBJECTIVES = dict(mvm_head="official", mvm_pairs="all", mlm_pairs="all")


def test_sohos_heads_and_objectives_train_every_parameter(tokenizer):
    """The official choices (model.pooling raw_cls, itm_bias false, gate official; pretrain.mvm_head
    official, mvm_pairs and mlm_pairs all) build, give finite losses and a gradient to every parameter."""
    torch.manual_seed(0)
    model = SohoPretrainer(tiny_model_config(**SOHO_HEADS), PretrainConfig(mvm_prob=1.0, **SOHO_OBJECTIVES)).train()
    assert model.itm_head.fc.bias is None and model.model.fusion.bert.pooler is None
    assert list(model.mvm_head.parameters()) == []  # the raw cosine has nothing to learn
    out = model.commit(model(make_batch(tokenizer)))
    assert all(torch.isfinite(out[k]) for k in ("loss", "loss/mlm", "loss/mvm", "loss/itm"))
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None)]
    assert not missing, missing


def test_sohos_choices_compute_what_the_official_code_computes(tokenizer):
    """Each official choice against its formula written here: the raw [CLS] into a bias-free ITM
    Linear; MVM's raw cosine (temperature 1) scored on every pass; MLM labels on every caption; the gate
    a 1x1 conv + BatchNorm over [Linear(q), x] mixing q and x."""
    torch.manual_seed(0)
    batch = make_batch(tokenizer)
    negatives = batch["itm_labels"] == 0
    assert negatives.any() and (~negatives).any()
    model = SohoPretrainer(tiny_model_config(**SOHO_HEADS), PretrainConfig(mvm_prob=1.0, **SOHO_OBJECTIVES)).eval()
    visual = model.model.encode_image(batch["images"])
    sequence, pooled = model.model.fuse(batch["input_ids"], batch["attention_mask"], visual, batch["image_index"])
    torch.testing.assert_close(pooled, sequence[:, 0])
    torch.testing.assert_close(model.itm_head(pooled), sequence[:, 0] @ model.itm_head.fc.weight.t())
    hidden, entries = torch.randn(5, 64), torch.randn(32, 64)
    cosine = torch.nn.functional.cosine_similarity(hidden[:, None], entries[None], dim=-1)
    torch.testing.assert_close(model.mvm_head(hidden, entries), cosine, atol=1e-5, rtol=1e-5)
    # the gate, recomputed from its parts on the encoded grid
    neck = model.model.visual
    x = neck.proj(visual.features).flatten(2).transpose(1, 2)
    q, _ = neck.vd(x, visual.valid)
    h, w = visual.grid
    z = torch.cat([neck.gate_query(q), x], -1).transpose(1, 2).reshape(len(x), -1, h, w)
    bn = neck.gate[1]
    logits = torch.nn.functional.batch_norm(neck.gate[0](z), bn.running_mean, bn.running_var, bn.weight, bn.bias)
    weights = logits.flatten(2).transpose(1, 2).softmax(-1)
    torch.testing.assert_close(visual.tokens, neck.out(weights[..., :1] * q + weights[..., 1:] * x))
    # MLM: every caption's masked words carry labels, ITM negatives' too
    every = PretrainTextBuilder(tokenizer, 16, 2, 0.3, 0.5, 0, mlm_on_negatives=True)(CAPS)
    matched_only = PretrainTextBuilder(tokenizer, 16, 2, 0.3, 0.5, 0)(CAPS)
    torch.testing.assert_close(every["input_ids"], matched_only["input_ids"])  # the same masking
    labelled = (every["mlm_labels"] != -100).any(1)
    assert labelled[every["itm_labels"] == 0].any() and not (matched_only["mlm_labels"] != -100).any(1)[
        matched_only["itm_labels"] == 0].any()
    # MVM on every pass: with negatives present, more masked tokens count than on matched pairs alone
    torch.manual_seed(1)
    official = SohoPretrainer(tiny_model_config(), PretrainConfig(mvm_prob=1.0, mvm_pairs="all")).train()
    matched = SohoPretrainer(tiny_model_config(), PretrainConfig(mvm_prob=1.0, mvm_pairs="matched")).train()
    matched.load_state_dict(official.state_dict())
    scored = {}
    for name, m in (("all", official), ("matched", matched)):
        torch.manual_seed(2)  # the same masks
        out = m(batch)
        m.commit(out)
        scored[name] = out["loss/mvm"]
    assert not torch.allclose(scored["all"], scored["matched"])


def test_weight_decay_on_every_parameter_as_sohos_code():
    from soho_ds.config import TrainConfig
    from soho_ds.runtime.engine import param_groups

    model = SohoPretrainer(tiny_model_config(), PretrainConfig())
    official = {g["name"]: g["weight_decay"] for g in param_groups(model, TrainConfig(weight_decay=0.01))}
    spared = {g["name"]: g["weight_decay"] for g in param_groups(model, TrainConfig(weight_decay=0.01,
                                                                                  decay_norms_and_biases=False))}
    assert official == {"cnn": 0.01, "head": 0.01, "transformer": 0.01}  # the default
    assert spared["transformer_no_decay"] == 0.0 and spared["transformer"] == 0.01
    counts = lambda groups: sum(len(g["params"]) for g in groups)  # noqa: E731
    assert counts(param_groups(model, TrainConfig())) == counts(param_groups(
        model, TrainConfig(decay_norms_and_biases=False)))


def test_mlm_decoder_is_tied_to_the_word_embeddings(tokenizer):
    model = SohoPretrainer(tiny_model_config(), PretrainConfig())
    assert model.mlm_head.word_embeddings.weight is model.model.fusion.word_embeddings.weight


def test_loss_weights_are_applied(tokenizer):
    torch.manual_seed(0)
    model = SohoPretrainer(tiny_model_config(), PretrainConfig(mvm_prob=1.0, mlm_weight=0.5, itm_weight=2.0,
                                                               mvm_weight=0.25))
    out = model(make_batch(tokenizer))
    assert torch.allclose(out["loss"], 0.5 * out["loss/mlm"] + 2.0 * out["loss/itm"] + 0.25 * out["loss/mvm"])


@pytest.mark.slow
def test_pretraining_steps_lower_the_loss_on_a_fixed_batch(tokenizer):
    torch.manual_seed(0)
    model = SohoPretrainer(tiny_model_config(), PretrainConfig(mvm_prob=1.0)).train()
    batch = make_batch(tokenizer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(20):
        out = model.commit(model(batch))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss/mlm"].item() + out["loss/itm"].item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_image_features_are_computed_once_per_image(tokenizer):
    model = SohoModel(tiny_model_config()).eval()
    images = torch.randn(2, 3, 64, 64)
    visual = model.encode_image(images)
    assert visual.tokens.shape == (2, 4, 64) and visual.vd_index.shape == (2, 4) and visual.grid == (2, 2)
    assert visual.valid.all()
    ids = torch.randint(1000, 2000, (4, 6))
    image_index = torch.tensor([0, 0, 1, 1])
    seq, pooled = model.fuse(ids, torch.ones_like(ids), visual, image_index)
    assert seq.shape == (4, 6 + 4, 64) and pooled.shape == (4, 64)
    # Same as feeding each image twice.
    seq2, _ = model.fuse(ids, torch.ones_like(ids), model.encode_image(images[image_index]))
    assert torch.allclose(seq, seq2, atol=1e-5)


def test_position_code_is_distinct_per_cell_and_relative_to_the_valid_extent():
    code = sine_position_encoding(torch.tensor([[3, 4]]), (3, 4), 64)[0]
    assert code.shape == (12, 64)
    assert torch.cdist(code, code).add(torch.eye(12) * 1e3).min() > 0.1
    # an image of 2x2 valid cells padded into a 3x4 grid: its cells carry the codes of a 2x2 grid
    small = sine_position_encoding(torch.tensor([[2, 2]]), (2, 2), 64)[0]
    padded = sine_position_encoding(torch.tensor([[2, 2]]), (3, 4), 64)[0].reshape(3, 4, 64)[:2, :2].reshape(4, 64)
    assert torch.equal(small, padded)
    # the same relative place at another resolution (the centre of a 3x3 and of a 5x5 grid) has one code
    c3 = sine_position_encoding(torch.tensor([[3, 3]]), (3, 3), 64)[0][4]
    c5 = sine_position_encoding(torch.tensor([[5, 5]]), (5, 5), 64)[0][12]
    torch.testing.assert_close(c3, c5)


def test_padding_cells_are_invalid_and_never_reach_the_valid_outputs(tokenizer):
    """Fusion output at valid positions does not change when the tokens of padding cells are
    replaced by noise: the transformer never attends to them."""
    torch.manual_seed(0)
    model = SohoModel(tiny_model_config()).eval()
    images = torch.randn(2, 3, 96, 128)
    sizes = torch.tensor([[96, 128], [64, 70]])  # image 1 fills 2 x 3 of the 3 x 4 cells
    visual = model.encode_image(images, sizes)
    assert visual.valid[0].all() and visual.valid[1].reshape(3, 4).tolist() == [[True] * 3 + [False]] * 2 + [
        [False] * 4]
    ids = torch.randint(1000, 2000, (2, 6))
    seq, pooled = model.fuse(ids, torch.ones_like(ids), visual)
    noisy = dataclasses.replace(visual, tokens=torch.where(visual.valid[..., None], visual.tokens,
                                                           torch.randn_like(visual.tokens) * 100))
    seq_noisy, pooled_noisy = model.fuse(ids, torch.ones_like(ids), noisy)
    keep = torch.cat([torch.ones(2, 6, dtype=torch.bool), visual.valid], 1)
    torch.testing.assert_close(seq[keep], seq_noisy[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, pooled_noisy, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seq[~keep], seq_noisy[~keep])  # the noise did arrive where it may


def test_pooled_visual_vector_for_itc_ignores_padding():
    from soho_ds.models.heads import ContrastiveHead

    head = ContrastiveHead(8, 4)
    tokens = torch.randn(1, 5, 8)
    valid = torch.tensor([[True, True, False, True, False]])
    noisy = torch.where(valid[..., None], tokens, torch.randn(1, 5, 8) * 1e3)
    torch.testing.assert_close(head.embed_image(tokens, valid), head.embed_image(noisy, valid))
    torch.testing.assert_close(head.embed_image(tokens, valid), head.embed_image(tokens[:, [0, 1, 3]],
                                                                                   valid[:, [0, 1, 3]]))


def test_non_finite_images_leave_batchnorm_and_vd_statistics_untouched(tokenizer):
    torch.manual_seed(0)
    model = SohoPretrainer(tiny_model_config(freeze_stem=False), PretrainConfig(mvm_prob=1.0)).train()
    statistics = lambda: {k: v.clone() for k, v in model.state_dict().items()  # noqa: E731
                          if "running" in k or "num_batches" in k or ".vd." in k}
    before = statistics()
    batch = make_batch(tokenizer)
    batch["images"][1, 0, 5, 5] = float("nan")
    assert torch.isnan(model.commit(model(batch))["loss"])  # its gradients are NaN: the optimizer skips it
    after = statistics()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k],
                                                                                                    after[k])]
    model.commit(model(make_batch(tokenizer, seed=1)))  # a good batch updates them
    changed = statistics()
    assert not torch.equal(before["model.visual.vd.ema_count"], changed["model.visual.vd.ema_count"])
    assert not torch.equal(before["model.backbone.layer2.0.bn1.running_mean"],
                           changed["model.backbone.layer2.0.bn1.running_mean"])


def test_backbone_loads_local_weights_and_refuses_mismatched_ones(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    backbone = ResNetBackbone(name="resnet18", weights_path=str(path), pool_last=False)
    assert torch.equal(backbone.layer4[1].conv2.weight, net.layer4[1].conv2.weight)
    assert torch.equal(backbone.stem[1].running_var, net.bn1.running_var)
    # a classifier of any size (ImageNet's 1000 classes, the synthetic stand-in's 10) is not the trunk's
    net.fc = torch.nn.Linear(512, 10)
    torch.save(net.state_dict(), path)
    loaded = ResNetBackbone(name="resnet18", weights_path=str(path))
    assert torch.equal(loaded.layer1[0].conv1.weight, net.layer1[0].conv1.weight)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"model\.backbone_weights \(.*resnet18\.pth\): weights do not fit"):
        ResNetBackbone(name="resnet18", weights_path=str(path))
    with pytest.raises(ValueError, match="missing"):
        load_checked(net, {k: v for k, v in net.state_dict().items() if "fc" not in k}, "partial.pth")


def test_fusion_loads_a_local_pretrained_bert_folder(tmp_path):
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=128))
    bert.save_pretrained(tmp_path)
    model = SohoModel(tiny_model_config(bert_dir=str(tmp_path)))
    assert torch.equal(model.fusion.bert.encoder.layer[1].output.dense.weight,
                       bert.encoder.layer[1].output.dense.weight)
    assert model.hidden_size == 64


def test_concept_targets_name_each_images_colours_and_shapes():
    from soho_ds.synthetic.backbone import CONCEPTS, concept_targets

    metas = [{"objects": [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "circle"}]},
             {"objects": [{"colour": "yellow", "shape": "diamond"}]}]
    targets = concept_targets(metas)
    assert CONCEPTS == ["blue", "green", "orange", "purple", "red", "yellow", "circle", "square", "triangle",
                        "diamond"]
    assert targets.tolist() == [[1, 0, 0, 0, 1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1, 0, 0, 0, 1]]


def test_contrastive_loss_against_a_hand_computed_case():
    import math

    from soho_ds.models.losses import contrastive_loss

    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # the text of image 0, of image 1, and a placeholder for image 2, which has none
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    loss, acc = contrastive_loss(image, text, torch.tensor([True, True, False]), temperature=0.5)
    # logits = text @ image.T / 0.5: image 0's text -> [2, 0, 1.2], image 1's -> [0, 2, 1.6]
    t2i = (-(2 - math.log(1 + math.exp(2) + math.exp(1.6))) - (2 - math.log(math.exp(2) + 1 + math.exp(1.2)))) / 2
    # image -> text over the two real texts: image 0 -> [2, 0] (target 0), image 1 -> [0, 2] (target 1)
    i2t = -(2 - math.log(math.exp(2) + 1))
    assert loss.item() == pytest.approx((t2i + i2t) / 2, rel=1e-6)
    assert acc.item() == 1.0


def test_itc_takes_one_matched_caption_per_image_and_skips_images_without_one():
    from soho_ds.pretrain.model import first_matched_caption

    image_index = torch.tensor([0, 0, 1, 1, 2, 2])
    matched = torch.tensor([False, True, True, True, False, False])
    first, has_text = first_matched_caption(image_index, matched, 3)
    assert first.tolist() == [1, 2, 0] and has_text.tolist() == [True, True, False]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """model.grad_checkpointing recomputes the CNN stages and the transformer layers in the backward pass
    instead of keeping their activations: the loss and every gradient are those of the plain model."""
    torch.manual_seed(0)
    plain = SohoModel(tiny_model_config(use_vd=False, freeze_stem=False)).train()
    recomputed = SohoModel(tiny_model_config(use_vd=False, freeze_stem=False, grad_checkpointing=True)).train()
    recomputed.load_state_dict(plain.state_dict())
    assert recomputed.backbone.grad_checkpointing and recomputed.fusion.bert.is_activation_checkpointing
    images = torch.randn(2, 3, 64, 96)
    ids = torch.randint(1000, 2000, (2, 8))
    mask = torch.ones_like(ids)
    losses = []
    for model in (plain, recomputed):
        visual = model.encode_image(images)
        sequence, pooled = model.fuse(ids, mask, visual)
        loss = model.commit(sequence.square().mean() + pooled.mean() + visual.features.mean())
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    again = {n: p.grad for n, p in recomputed.named_parameters() if p.grad is not None}
    # the checkpointed CNN stages and transformer layers are in the graph
    assert set(grads) == set(again) and any(n.startswith("backbone.layer2") for n in grads)
    assert any(".layer.1." in n for n in grads), sorted(grads)[:5]
    for name, g in grads.items():
        assert torch.allclose(g, again[name], rtol=1e-5, atol=1e-7), name


def test_itm_scores_of_all_pairs_equal_each_pair_fused_alone(tokenizer):
    """The one scorer (finetune negatives, retrieval, load_model, search): chunking and sharing an image's
    tokens across captions change nothing; its score's sigmoid is the head's P(matched)."""
    torch.manual_seed(0)
    model = SohoPretrainer(tiny_model_config(), PretrainConfig()).eval()
    batch = make_batch(tokenizer)
    ids, mask = batch["input_ids"][:5], batch["attention_mask"][:5]
    with torch.no_grad():
        visual = model.model.encode_image(batch["images"])
        every = model.itm_head.score_all(model.model, visual, ids, mask, chunk=2)
        alone = torch.zeros(3, 5)
        for i in range(3):
            one = model.model.encode_image(batch["images"][i:i + 1])
            for t in range(5):
                _, pooled = model.model.fuse(ids[t:t + 1], mask[t:t + 1], one)
                alone[i, t] = model.itm_head(pooled).float().softmax(-1)[0, 1]
    assert every.shape == (3, 5)
    torch.testing.assert_close(every.sigmoid(), alone, atol=1e-5, rtol=0)
    assert len(set(every.flatten().tolist())) == 15  # the images and captions really differ


def test_a_training_forward_that_was_never_committed_stops_the_next_one(tokenizer):
    """The VD and BatchNorm statistics of a training forward wait for the loop's one commit; a loop that
    forgets it fails at its next forward instead of committing them unchecked."""
    from soho_ds.models.soho import UncommittedStatistics

    torch.manual_seed(0)  # soho_ds: its dictionary update waits for the commit (official's is in the forward)
    model = SohoPretrainer(tiny_model_config(vd_variant="soho_ds"), PretrainConfig(mvm_prob=1.0)).train()
    count = model.model.visual_dictionary.ema_count.clone()
    model(make_batch(tokenizer))
    assert torch.equal(model.model.visual_dictionary.ema_count, count)  # staged, not applied
    with pytest.raises(UncommittedStatistics, match="never committed; end every training forward with commit"):
        model(make_batch(tokenizer, seed=1))
    model.commit({"loss": torch.tensor(1.0)})
    assert not torch.equal(model.model.visual_dictionary.ema_count, count)  # the first forward's, now applied
    with pytest.raises(UncommittedStatistics, match="no training forward to commit"):
        model.commit({"loss": torch.tensor(1.0)})  # committed twice
    model.eval()(make_batch(tokenizer, seed=2))  # evaluation stages nothing: no commit needed
    official = SohoPretrainer(tiny_model_config(), PretrainConfig(mvm_prob=1.0)).train()  # the default variant
    official(make_batch(tokenizer))
    with pytest.raises(UncommittedStatistics, match="never committed"):
        official(make_batch(tokenizer, seed=1))
