"""The `dit sample` wing: the request, checked before anything loads, and the prepared run (`request.py`), the
settings that decide the pixels (`config.py`), the loop that yields batches of images (`generate.py`), the model's
forward as sampling runs it, cast, compiled, packaged ahead of time or block-cached (`forward.py`, `aot.py`,
`block_cache.py`), and the writers that put the images on disk (`writers.py`)."""
