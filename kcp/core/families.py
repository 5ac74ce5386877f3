"""The model-family registry: `model.name` -> the family's config dataclass.

Each family's config dataclass lives beside its builder (trainer/models/<family>.py) and is
registered here with `@model_family(NAME)` when `trainer.models` is imported; the config
loader, the pipeline's planning and the tuner look families up here, so that the foundation
never imports a stage.
"""

from __future__ import annotations

from kcp.core.schema import ConfigError

MODEL_FAMILIES: dict[str, type] = {}  # model.name -> the family's config dataclass


def model_family(name: str):
    """Class decorator that registers a family's config dataclass as `model.name: NAME`."""
    def register(cls):
        MODEL_FAMILIES[name] = cls
        return cls
    return register


def family_config_class(name: str) -> type:
    """The config dataclass of family `name`; a ConfigError naming the families otherwise."""
    if not MODEL_FAMILIES:
        raise RuntimeError("no model family is registered: import trainer.models before loading a config")
    if name not in MODEL_FAMILIES:
        raise ConfigError(f"model.name: {name!r} is not one of {', '.join(MODEL_FAMILIES)}")
    return MODEL_FAMILIES[name]


def families_for(modality: str) -> tuple:
    """The names of the registered families that take `modality` data."""
    return tuple(name for name, family in MODEL_FAMILIES.items() if modality in family.modalities)


def check_family_takes(name: str, modality: str) -> None:
    """A ConfigError naming the families that do, when family `name` does not take `modality` data."""
    accepted = family_config_class(name).modalities
    if modality not in accepted:
        raise ConfigError(f"model.name: {name} takes {', '.join(accepted)} data, and this run's data is "
                          f"{modality}; for {modality} data use {' or '.join(families_for(modality))}")
