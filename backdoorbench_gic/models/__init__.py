"""Classifiers by BackdoorBench name, the normalising wrapper, and state-dict helpers."""
from .build import build_model, build_model_for_state_dict, infer_arch_kwargs
from .wrapper import VictimModel, head_of

from . import preact_resnet, small_cnn, torchvision_models  # noqa: F401  (register the builders)

__all__ = ["build_model", "build_model_for_state_dict", "infer_arch_kwargs", "VictimModel", "head_of"]
