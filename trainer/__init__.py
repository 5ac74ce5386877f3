"""Trainer: Keras 3 functional models built from the data contract, trained with model.fit."""
