"""The math of the processes and their samplers: DDPM's discrete diffusion (`ddpm.py`), linear-interpolant flow
matching (`flow.py`) and mean flows (`meanflow.py`) behind one `Process` contract (`process.py`), the objective
adapters that own every choice that depends on which one trained a model (`objectives.py`), the samplers on one
contract (`samplers.py`, `flow_samplers.py`, `flow_map.py`), and the guidance and per-image noise adapters that turn
a DiT into the `model_fn` they call (`guidance.py`). Tensors in, tensors out: no files and no model loading."""
