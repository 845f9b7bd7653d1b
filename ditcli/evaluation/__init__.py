"""The `dit fid` wing: ADM's FID, sFID, Inception Score, precision and recall (`fid.py`, `scores.py`) on features
from the TF Inception graph or the Fashion-MNIST judge (`features.py`, `inception.py`, `judge.py`), the readers of
sample folders, .npz batches and reference statistics (`readers.py`, `references.py`), and DiT's published protocol
as a preset and a check (`protocol.py`)."""
