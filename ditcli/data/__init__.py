"""What a model learns from and what it calls its classes: training sources (image folders, Fashion-MNIST idx files,
.npz arrays) read into uint8 `ImageSet`s (`sources.py`), image files and captioned grids (`images.py`), and the class
tables that `--class` looks names up in (`classes.py`)."""
