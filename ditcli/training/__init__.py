"""The `dit train` wing: the run's typed config and presets (`config.py`), the `Trainer` loop (`trainer.py`) and the
components it asks: run checkpoints (`checkpoints.py`), each step's random draws (`draws.py`), the network as a step
calls it (`net.py`), the latent cache (`latent_cache.py`), preview grids and FID while training (`preview.py`,
`eval_hook.py`), experiment trackers (`trackers.py`), and starting from other weights (`finetune.py`)."""
