import torch

from soho_ds.data.text import IGNORE, PretrainTextBuilder, tokenize
from soho_ds.pretrain.objectives import sample_mvm_mask

# 8 images, 2 captions each; captions of different images differ in at least four words
# (colour, shape, relation, background), so one masked word cannot make them ambiguous.
SCENES = [("green", "circle", "above", "grey"), ("yellow", "square", "below", "white"),
          ("purple", "triangle", "left of", "black"), ("orange", "diamond", "right of", "beige"),
          ("blue", "star", "near", "pink"), ("red", "cross", "far from", "brown"),
          ("white", "heart", "under", "green"), ("black", "ring", "over", "blue")]
CAPTIONS = [[f"a small {c} {s} {r} a large {d} box on a {b} background" for d in ("red", "blue")]
            for c, s, r, b in SCENES]


def build(tokenizer, **kw):
    args = dict(max_len=20, captions_per_image=4, mlm_prob=0.15, itm_neg_prob=0.5, seed=0)
    args.update(kw)
    return PretrainTextBuilder(tokenizer, **args)


def test_mlm_masking_rates_follow_80_10_10(tokenizer):
    builder = build(tokenizer, itm_neg_prob=0.0)
    masked = maskable = as_mask = as_random = kept = 0
    for _ in range(60):
        batch = builder(CAPTIONS)
        labels, ids = batch["mlm_labels"], batch["input_ids"]
        special = torch.tensor([[t in tokenizer.all_special_ids for t in row] for row in ids.tolist()])
        sel = labels != IGNORE
        assert not (sel & (batch["attention_mask"] == 0)).any(), "padding was masked"
        assert (labels[sel] > 103).all(), "a special token was chosen for MLM"
        masked += int(sel.sum())
        maskable += int(((batch["attention_mask"] == 1) & ~special | sel).sum())
        as_mask += int((ids[sel] == tokenizer.mask_token_id).sum())
        kept += int((ids[sel] == labels[sel]).sum())
        as_random += int(((ids[sel] != tokenizer.mask_token_id) & (ids[sel] != labels[sel])).sum())
    assert abs(masked / maskable - 0.15) < 0.02
    assert abs(as_mask / masked - 0.8) < 0.04
    assert abs(as_random / masked - 0.1) < 0.04  # a random word may equal the original: counted as kept
    assert abs(kept / masked - 0.1) < 0.04


def test_itm_negatives_are_other_images_captions_and_carry_no_mlm(tokenizer):
    """Negatives carry no MLM loss but are masked alike: [MASK] must not reveal the ITM label."""
    builder = build(tokenizer)
    negatives = total = 0
    masked_neg, masked_pos = [], []
    candidates = tokenize(tokenizer, sum(CAPTIONS, []), builder.max_len)["input_ids"]
    for _ in range(30):
        batch = builder(CAPTIONS)
        itm, img = batch["itm_labels"], batch["image_index"]
        assert img.tolist() == [i for i in range(8) for _ in range(4)]
        assert (batch["mlm_labels"][itm == 0] == IGNORE).all()
        restored = torch.where(batch["mlm_labels"] != IGNORE, batch["mlm_labels"], batch["input_ids"])
        for t in range(len(itm)):
            # The caption it came from: the candidate agreeing on the most token positions
            # (a negative's masked or randomised words cannot be restored, so no exact match).
            agree = (candidates == restored[t]).sum(1)
            owner = int(agree.argmax()) // 2  # CAPTIONS has 2 captions per image
            assert agree.max() >= (batch["attention_mask"][t].sum() * 0.6), t
            # matched: a caption of its own image; negative: a caption of another image
            assert (owner == int(img[t])) == bool(itm[t] == 1), (t, owner, int(img[t]))
        negatives += int((itm == 0).sum())
        total += len(itm)
        masked_inputs = (batch["input_ids"] == tokenizer.mask_token_id).any(1)
        masked_neg.append(masked_inputs[itm == 0].float().mean())
        masked_pos.append(masked_inputs[itm == 1].float().mean())
    assert abs(negatives / total - 0.5) < 0.05
    assert abs(sum(masked_neg) / len(masked_neg) - sum(masked_pos) / len(masked_pos)) < 0.1


def test_mvm_masks_every_cell_of_the_chosen_visual_word():
    g = torch.Generator().manual_seed(0)
    vd_index = torch.tensor([[1, 2, 1, 3, 1, 2], [4, 4, 5, 6, 7, 4]])
    mask = sample_mvm_mask(vd_index, None, prob=1.0, generator=g)
    for row, m in zip(vd_index, mask):
        chosen = row[m]
        assert len(chosen) > 0 and (chosen == chosen[0]).all()
        assert m.sum() == (row == chosen[0]).sum()  # all cells of that word, and only those


def test_mvm_masks_rows_with_the_configured_probability():
    g = torch.Generator().manual_seed(0)
    vd_index = torch.randint(0, 50, (4000, 16), generator=g)
    mask = sample_mvm_mask(vd_index, None, prob=0.3, generator=g)
    assert abs(mask.any(1).float().mean().item() - 0.3) < 0.03
    assert not sample_mvm_mask(vd_index, None, prob=0.0, generator=g).any()


def test_mvm_never_picks_or_masks_a_padding_cell():
    """Padding cells share VD indices with valid ones here (they would in practice: the padding is one
    colour); still no padding cell is ever the picked cell or masked with its word."""
    g = torch.Generator().manual_seed(1)
    vd_index = torch.randint(0, 3, (3000, 12), generator=g)
    valid = torch.zeros(3000, 12, dtype=torch.bool)
    valid[:, :5] = True
    mask = sample_mvm_mask(vd_index, valid, prob=1.0, generator=g)
    assert not (mask & ~valid).any()
    assert mask.any(1).all()  # every row masked one of its valid words


def test_mvm_probability_applies_per_image_caption_pair_as_the_official_code():
    """With pretrain.mvm_unit = pair each caption's copy of its image is masked on its own draw: with
    4 captions an image is masked in about 1 - (1 - p)^4 of its copies' rows, not shared."""
    from conftest import tiny_model_config
    from soho_ds.config import PretrainConfig
    from soho_ds.pretrain.model import SohoPretrainer

    torch.manual_seed(0)
    model = SohoPretrainer(tiny_model_config(), PretrainConfig(mvm_prob=0.3, mvm_unit="pair")).train()
    visual = model.model.encode_image(torch.randn(2, 3, 64, 64))
    image_index = torch.arange(2).repeat_interleave(2000)  # 2000 captions per image
    mask = model.mvm_mask(visual, image_index)
    per_pair = mask.any(1).float()
    assert abs(per_pair.mean().item() - 0.3) < 0.03
    # pairs of one image are masked independently (not all-or-nothing, as with mvm_unit: image)
    assert 0.2 < per_pair[:2000].mean().item() < 0.4
    model.cfg = PretrainConfig(mvm_prob=0.3, mvm_unit="image")
    shared = model.mvm_mask(visual, image_index).any(1).float()
    assert set(shared[:2000].tolist()) <= {0.0, 1.0} and shared[:2000].std() == 0
