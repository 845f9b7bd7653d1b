"""DiT weights on disk, in every format: the typed `Checkpoint` record every reader fills (`record.py`), reading and
writing our .safetensors, released .pt files and training checkpoints (`checkpoint.py`), the explicit key map to
diffusers (`diffusers_format.py`), the EMA record (`ema.py`), the registry of known checkpoints and where to find them
(`registry.py`, `locate.py`), and the core of `dit convert` (`convert.py`)."""
