import pytest
import torch

from conftest import tiny_model_config
from soho_ds.data.text import PretrainTextBuilder
from soho_ds.models.backbone import ResNetBackbone, load_checked
from soho_ds.models.soho import SohoModel, sine_position_encoding
from soho_ds.pretrain.model import SohoPretrainer
from soho_ds.runtime.config import PretrainConfig

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
    out = model(make_batch(tokenizer))
    for key in ("loss", "loss/mlm", "loss/mvm", "loss/itm", "loss/itc", "acc/itm", "acc/mlm", "acc/mvm", "acc/itc",
                "vd/usage"):
        assert out[key].shape == () and torch.isfinite(out[key]), key
    assert out["loss/mvm"] > 0 and out["loss/mlm"] > 0 and out["loss/itc"] > 0
    expected = out["loss/mlm"] + out["loss/mvm"] + out["loss/itm"] + 0.5 * out["loss/itc"]
    assert torch.allclose(out["loss"], expected)
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None)]
    assert not missing, missing


def test_mlm_decoder_is_tied_to_the_word_embeddings(tokenizer):
    model = SohoPretrainer(tiny_model_config(), PretrainConfig())
    assert model.mlm_head.word_embeddings.weight is model.model.fusion.word_embeddings.weight


def test_loss_weights_are_applied(tokenizer):
    torch.manual_seed(0)
    model = SohoPretrainer(tiny_model_config(), PretrainConfig(mvm_prob=1.0, mlm_weight=0.5, itm_weight=2.0,
                                                               mvm_weight=0.25))
    out = model(make_batch(tokenizer))
    assert torch.allclose(out["loss"], 0.5 * out["loss/mlm"] + 2.0 * out["loss/itm"] + 0.25 * out["loss/mvm"])


def test_pretraining_steps_lower_the_loss_on_a_fixed_batch(tokenizer):
    torch.manual_seed(0)
    model = SohoPretrainer(tiny_model_config(), PretrainConfig(mvm_prob=1.0)).train()
    batch = make_batch(tokenizer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(20):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss/mlm"].item() + out["loss/itm"].item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_image_features_are_computed_once_per_image(tokenizer):
    model = SohoModel(tiny_model_config()).eval()
    images = torch.randn(2, 3, 64, 64)
    tokens, index, grid = model.image_tokens(images)
    assert tokens.shape == (2, 4, 64) and index.shape == (2, 4) and grid == (2, 2)
    ids = torch.randint(1000, 2000, (4, 6))
    image_index = torch.tensor([0, 0, 1, 1])
    seq, pooled = model.fuse(ids, torch.ones_like(ids), tokens, grid, image_index)
    assert seq.shape == (4, 6 + 4, 64) and pooled.shape == (4, 64)
    # Same as feeding each image twice.
    t2, _, _ = model.image_tokens(images[image_index])
    seq2, _ = model.fuse(ids, torch.ones_like(ids), t2, grid)
    assert torch.allclose(seq, seq2, atol=1e-5)


def test_sine_position_encoding_is_distinct_per_cell():
    code = sine_position_encoding(3, 4, 64)
    assert code.shape == (12, 64)
    assert torch.cdist(code, code).add(torch.eye(12) * 1e3).min() > 0.1


def test_backbone_loads_local_weights_and_refuses_mismatched_ones(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    backbone = ResNetBackbone("resnet18", str(path), pool_last=False)
    assert torch.equal(backbone.layer4[1].conv2.weight, net.layer4[1].conv2.weight)
    assert torch.equal(backbone.stem[1].running_var, net.bn1.running_var)
    # a classifier of any size (ImageNet's 1000 classes, the synthetic stand-in's 10) is not the trunk's
    net.fc = torch.nn.Linear(512, 10)
    torch.save(net.state_dict(), path)
    assert torch.equal(ResNetBackbone("resnet18", str(path)).layer1[0].conv1.weight, net.layer1[0].conv1.weight)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="resnet18.pth: weights do not fit"):
        ResNetBackbone("resnet18", str(path))
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
    from soho_ds.pretrain.backbone_init import CONCEPTS, concept_targets

    metas = [{"objects": [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "circle"}]},
             {"objects": [{"colour": "yellow", "shape": "diamond"}]}]
    targets = concept_targets(metas)
    assert CONCEPTS == ["blue", "green", "orange", "purple", "red", "yellow", "circle", "square", "triangle",
                        "diamond"]
    assert targets.tolist() == [[1, 0, 0, 0, 1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1, 0, 0, 0, 1]]


def test_contrastive_loss_against_a_hand_computed_case():
    import math

    from soho_ds.pretrain.objectives import contrastive_loss

    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # text 0 describes image 1, text 1 describes image 0
    loss, acc = contrastive_loss(image, text, torch.tensor([1, 0]), temperature=0.5)
    # logits = text @ image.T / 0.5: text 0 -> [0, 2, 1.6], text 1 -> [2, 0, 1.2]
    t2i = (-(2 - math.log(1 + math.exp(2) + math.exp(1.6))) - (2 - math.log(math.exp(2) + 1 + math.exp(1.2)))) / 2
    # image -> text over the two texts: image 1 -> [2, 0] (target 0), image 0 -> [0, 2] (target 1)
    i2t = -(2 - math.log(math.exp(2) + 1))
    assert loss.item() == pytest.approx((t2i + i2t) / 2, rel=1e-6)
    assert acc.item() == 1.0


def test_itc_takes_one_matched_caption_per_image_and_skips_images_without_one():
    from soho_ds.pretrain.model import first_matched_caption

    image_index = torch.tensor([0, 0, 1, 1, 2, 2])
    matched = torch.tensor([False, True, True, True, False, False])
    assert first_matched_caption(image_index, matched, 3).tolist() == [1, 2]
