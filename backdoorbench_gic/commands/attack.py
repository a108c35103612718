"""``bbgic attack``: train a backdoored (or clean) victim and write a BackdoorBench attack record.

Flags are generated from the attacks' config dataclasses (BackdoorBench's key names), so a key added to an
attack's config is a flag with no edit here. Precedence as in BackdoorBench: the dataclass defaults <
``--yaml_path`` (the prototype yaml) < ``--bd_yaml_path`` (the attack yaml) < flags given on the command line.
"""
from __future__ import annotations

import argparse
import typing

from .common import add_debug_arg

# the parser is generated from every attack's config (importing torch), so cli.py builds it only for `bbgic attack`
COMMANDS = {"attack": "train a victim with a backdoor attack (or clean) and write a BackdoorBench attack record"}

# keys that are not plain per-run settings: given explicitly below, or read by defenses only
_NOT_FLAGS = {"yaml_path", "bd_yaml_path"}

_HELP = {
    "attack": "which attack (badnet, blended, sig, wanet, or prototype for clean training)",
    "dataset": "a registered dataset (cifar10, fashion-mnist, digits, ...) or a split (fashion-mnist_split_5_seed_0)",
    "dataset_path": "folder holding <dataset>/ (relative paths start at --bb_root); default ./data",
    "model": "victim network (preactresnet18, ...)",
    "width": "base width of the network (ours; BackdoorBench's preactresnet18 is 64, 8-16 suit a CPU)",
    "pratio": "poisoning ratio, counted against the whole training set (default 0.1)",
    "attack_target": "target class for all2one (default 0)",
    "attack_label_trans": "all2one (to --attack_target) or all2all ((y + shift) mod K)",
    "attack_label_shift_amount": "the all2all shift (default 1)",
    "epochs": "training epochs (BackdoorBench's default 100)",
    "batch_size": "training batch size (default 128)",
    "lr": "learning rate (default 0.01)",
    "client_optimizer": "sgd, adam, adamw or adadelta",
    "lr_scheduler": "CosineAnnealingLR (default), StepLR, MultiStepLR, ReduceLROnPlateau or none",
    "random_seed": "one seed for poisoning, initialisation and data order (default 0)",
    "device": "auto (CUDA when present), cpu, cuda, cuda:1, ...",
    "amp": "true/false: bf16 autocast on CUDA (ignored on CPU)",
    "save_folder_name": "record folder name under <bb_root>/record/ (default: generated from the time)",
    "patch_mask_path": "badnet: trigger image whose non-zero pixels replace the image's (default: 3x3 white square)",
    "attack_trigger_img_path": "blended: trigger image (default: a fixed smooth pattern of ours)",
    "attack_train_blended_alpha": "blended: alpha on training images (default 0.2)",
    "attack_test_blended_alpha": "blended: alpha on test images (default 0.2)",
    "blend_pattern_seed": "blended: seed of the built-in pattern (default 0)",
    "sig_delta": "sig: amplitude on the 0-255 scale (default 40)",
    "sig_f": "sig: periods across the image width (default 6)",
    "k": "wanet: control grid size (default 4)",
    "s": "wanet: warping strength (default 0.5)",
    "grid_rescale": "wanet: grid rescale factor (default 1)",
    "cross_ratio": "wanet: noise-mode samples per backdoor sample (default 2)",
    "random_rotation": "wanet: post-poisoning random rotation in degrees (default 10)",
    "random_crop": "wanet: post-poisoning random shift in pixels (default 5)",
}
# accepted for BackdoorBench yaml compatibility but without effect here; kept off --help
_HIDDEN = {"pin_memory", "non_blocking", "prefetch", "num_workers", "frequency_save"}


def _config_fields() -> dict[str, typing.Any]:
    """Every config key of every registered attack, with its annotation (first definition wins)."""
    from ..attacks.base import DEFENSE_ONLY_KEYS
    from ..registry import ATTACKS

    out: dict[str, typing.Any] = {}
    for name in ATTACKS.names():
        cls = ATTACKS.get(name).config_class
        for key, tp in typing.get_type_hints(cls).items():
            if key not in out and key not in DEFENSE_ONLY_KEYS and key not in _NOT_FLAGS and not key.startswith("_"):
                out[key] = tp
    return out


def _generic_help(key: str, tp: typing.Any) -> str:
    """Help for a config key _HELP does not describe: its type, which attacks take it and their default."""
    import dataclasses

    from ..config import _type_name
    from ..registry import ATTACKS

    users = []
    for name in ATTACKS.names():
        fields = {f.name: f for f in dataclasses.fields(ATTACKS.get(name).config_class)}
        if key in fields:
            f = fields[key]
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
            users.append((name, default))
    defaults = {repr(d) for _, d in users}
    where = "every attack" if len(users) == len(ATTACKS.names()) else ", ".join(n for n, _ in users)
    return f"{_type_name(tp)}; {where}" + (f" (default {users[0][1]})" if len(defaults) == 1 and users else "")


def _is_list(tp: typing.Any) -> bool:
    """``list[...]`` or ``list[...] | None``: such keys take several values (``--steplr_milestones 100 200``)."""
    import types

    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return any(typing.get_origin(a) in (list, tuple) for a in options)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "attack", help=COMMANDS["attack"],
        description="Poison the training set (badnet, blended, sig) or each batch (wanet), train the victim, and write "
                    "<bb_root>/record/<save_folder_name>/ as BackdoorBench's attack scripts do. Precedence: defaults < "
                    "--yaml_path < --bd_yaml_path < flags. Values are checked against the attack's config: an unknown "
                    "key in a yaml file is an error naming the key and the file.")
    p.add_argument("--yaml_path", default=None,
                   help="yaml of training keys (BackdoorBench's config/attack/prototype/<ds>.yaml)")
    p.add_argument("--bd_yaml_path", default=None,
                   help="yaml of attack keys (BackdoorBench's config/attack/<attack>/default.yaml)")
    p.add_argument("--bb_root", default=".", help="BackdoorBench root: record/ and data/ live here (default: .)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished record of the same name")
    group = p.add_argument_group("attack and training keys",
                                 "BackdoorBench's names; a flag left out keeps the yaml's or the default value")
    for key, tp in _config_fields().items():
        group.add_argument(f"--{key}", default=None, nargs="+" if _is_list(tp) else None, metavar=key.upper(),
                           help=_HELP.get(key, argparse.SUPPRESS if key in _HIDDEN else _generic_help(key, tp)))
    add_debug_arg(p)
    p.set_defaults(func=run)
    return p



def cli_values(args: argparse.Namespace) -> dict[str, typing.Any]:
    """The config keys given on the command line (None: not given)."""
    return {k: getattr(args, k) for k in _config_fields() if getattr(args, k, None) is not None}


def run(args: argparse.Namespace) -> int:
    from ..attacks import load_attack, run_attack

    attack = load_attack(args.attack, args.yaml_path, args.bd_yaml_path, cli_values(args))
    record_dir = run_attack(attack, bb_root=args.bb_root, overwrite=args.overwrite)
    print(record_dir)
    return 0
