"""Figures of deformation derivatives, simulations and training traces; matplotlib is imported lazily."""
