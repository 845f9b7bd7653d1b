"""The network, at the bottom of the house: the DiT denoiser with its typed config and named preset table
(`dit.py`), and the codecs between images and the space it denoises, SD-VAE latents or pixels (`codec.py`). It imports
only the ground floor; every wing above builds on it."""
