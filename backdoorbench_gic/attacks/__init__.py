"""Our own backdoor attacks, re-implemented from the papers with BackdoorBench's default settings, writing
BackdoorBench-format records: ``badnet``, ``blended``, ``sig``, ``wanet``, ``inputaware`` (Input-aware dynamic), ``lf`` (low-frequency), and
``prototype`` (clean training).

``run_attack(config, bb_root=...)`` is the entry point the CLI (``bbgic attack``), the demo and the matrix runner
share; ``ATTACKS.build(name, **keys)`` gives an :class:`Attack` whose poisoning steps can be used on their own.
"""
from .base import Attack, AttackConfig, poisoned_view
from .runner import (RecordExistsError, build_attack, default_folder_name, load_attack, run_attack,
                     train_victim)

from . import badnet, blended, inputaware, lowfreq, prototype, sig, wanet  # noqa: F401,E402  (register the attacks)
from .badnet import BadNet, BadNetConfig  # noqa: E402
from .blended import Blended, BlendedConfig  # noqa: E402
from .inputaware import InputAware, InputAwareConfig  # noqa: E402
from .lowfreq import LowFrequency, LowFrequencyConfig  # noqa: E402
from .prototype import Prototype, PrototypeConfig  # noqa: E402
from .sig import InfeasiblePoisonRatio, Sig, SigConfig  # noqa: E402
from .wanet import WaNet, WaNetConfig  # noqa: E402

__all__ = [
    "Attack", "AttackConfig", "poisoned_view", "RecordExistsError", "build_attack", "default_folder_name",
    "load_attack", "run_attack", "train_victim", "BadNet", "BadNetConfig", "Blended", "BlendedConfig", "InputAware",
    "InputAwareConfig", "LowFrequency", "LowFrequencyConfig", "Prototype", "PrototypeConfig", "InfeasiblePoisonRatio",
    "Sig", "SigConfig", "WaNet", "WaNetConfig",
]
