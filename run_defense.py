#!/usr/bin/env python
"""BackdoorBench-style entry point.

    python run_defense.py                      # the embedded demo: backdoor a victim on scikit-learn's digits,
                                               # remove it with FST (and GIC+FST) on reserved and shifted data
    python run_defense.py --dataset fashion-mnist        # the demo on another dataset
    python run_defense.py --result_file R --defense ft [--yaml_path Y --dataset D --device cuda:0 ...]
                                               # one defense on one record (as BackdoorBench's defense scripts)

This file sits in the clone's root, so `python run_defense.py` works only from there; the installed commands
`bbgic demo` and `bbgic defend --result_file R --defense D ...` do the same from any directory.
"""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not {"-h", "--help"} & set(argv):
        from backdoorbench_gic.cli import startup_check

        code = startup_check("run_defense.py")  # a torch/torchvision build mismatch, reported once, with its fix
        if code is not None:
            return code
    if "--result_file" in argv or any(a.startswith("--result_file=") for a in argv):
        from backdoorbench_gic.commands.defend import main as defend_main

        return defend_main(argv)
    from backdoorbench_gic.demo import main as demo_main

    return demo_main(argv)


if __name__ == "__main__":
    sys.exit(main())
