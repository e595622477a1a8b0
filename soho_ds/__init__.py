"""soho-ds: end-to-end vision-language pretraining (SOHO) with DeepSpeed ZeRO and NVIDIA DALI.

`soho_ds.load_model(path)` gives a trained model to use from Python (see soho_ds.inference).
"""


def load_model(path, device=None, batch_size: int = 16):
    """A trained model (checkpoint folder, consolidated .pt or soho-export folder), without DeepSpeed."""
    from soho_ds.inference import load_model as load

    return load(path, device, batch_size)
