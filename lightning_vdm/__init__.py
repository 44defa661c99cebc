"""Vertical deformation mappings of the training loss for PyTorch Lightning."""
