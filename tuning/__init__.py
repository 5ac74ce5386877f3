"""Tuning: Keras Tuner search over the trainer's model configs (see the tuning issue)."""
