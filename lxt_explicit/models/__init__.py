"""Loaders of real pretrained models that install from PyPI (see ``../shared/MODELS.md``) and of local folders."""
