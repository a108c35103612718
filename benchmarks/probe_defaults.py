"""Fix the retuning probe's settings for a domain on the victims and the clean control, on held-out data only.

Rule (written before this script ran on MNIST): candidates, in this order, are the issue's example (1 % of the
training split, 10 % of it poisoned, 5 epochs, SGD lr 0.01: the code's defaults), the poisoned share halved (5 %),
the learning rate divided by ten (0.001), and both. A candidate is admissible when, on every given victim's
held-out images (the split's ``reserved`` part, which neither the victim nor the control saw, and the same images
poisoned by the victim's attack: ``attacks.runner.heldout_sets``), the retuned clean control keeps its C-Acc within 5
points of its own (a retuning that wrecks a clean model says nothing about a backdoor) and its P-ASR is at most 20 %
(it must not learn the trigger from the retuning set alone), while the retuned victim's P-ASR is at least 80 % (the
retuning keeps a backdoor that is there). The first admissible candidate is the domain's setting. No defense, no
purified model and no test image is read.

Amendment (2026-12-07, after the first run chose none, before any defense result was compared): on the Blended
victim the clean control learns the trigger under every candidate (held-out P-ASR 100 %), so no candidate can be
admissible there; the setting is the first candidate admissible on every victim where any candidate is, and the
others are reported as victims whose P-ASR cannot be read against a clean model (``unreadable``).

    python benchmarks/probe_defaults.py --bb_root bbgic_bench --records badnet_mn_cnn16 blended_mn_cnn16 \
        wanet_mn_cnn16 --out benchmarks/results/probe_defaults_mnist.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

CANDIDATES = [{}, {"retune.poison_share": 0.05}, {"retune.lr": 0.001},
              {"retune.poison_share": 0.05, "retune.lr": 0.001}]
CONTROL_ACC_DROP, CONTROL_P_ASR, VICTIM_P_ASR = 0.05, 0.20, 0.80


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bb_root", required=True)
    p.add_argument("--records", nargs="+", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch

    from backdoorbench_gic.analysis import command_line, describe_machine
    from backdoorbench_gic.data.transforms import TrainAugment
    from backdoorbench_gic.attacks.runner import heldout_sets
    from backdoorbench_gic.evaluation import evaluate
    from backdoorbench_gic.probes import ProbeSettings, clean_control, retune_set, retuned
    from backdoorbench_gic.records import load_attack_record

    cpu = torch.device("cpu")
    rows, chosen = [], None
    for options in CANDIDATES:
        settings = ProbeSettings.from_dict(options)
        ok = True
        for name in args.records:
            rec = load_attack_record(name, args.bb_root)
            clean, bd = heldout_sets(rec)
            data = retune_set(rec, settings.retune, settings.seed)
            aug = TrainAugment.for_spec(rec.spec) if settings.retune.augment else None
            row = {"options": options, "record": name, "retune_n": len(data), "retune_n_poison": int(data.poison.sum())}
            for what, model in (("victim", rec.build_model().eval()), ("control", clean_control(rec, settings, cpu))):
                before = evaluate(model, clean, bd, device=cpu)
                after = evaluate(retuned(model, data, settings.retune, settings.seed, cpu, aug, False), clean, bd,
                                 device=cpu)
                row.update({f"{what}_acc": before.acc, f"{what}_asr": before.asr, f"{what}_p_acc": after.acc,
                            f"{what}_p_asr": after.asr})
            row["admissible"] = (row["control_acc"] - row["control_p_acc"] <= CONTROL_ACC_DROP
                                 and row["control_p_asr"] <= CONTROL_P_ASR and row["victim_p_asr"] >= VICTIM_P_ASR)
            ok = ok and row["admissible"]
            rows.append(row)
            print(json.dumps(row))
        if ok:
            chosen = options
            break
    if chosen is None:  # the amendment: drop the victims where no candidate is admissible
        unreadable = sorted({r["record"] for r in rows} - {r["record"] for r in rows if r["admissible"]})
        for options in CANDIDATES:
            mine = [r for r in rows if r["options"] == options and r["record"] not in unreadable]
            if mine and all(r["admissible"] for r in mine):
                chosen = options
                break
    else:
        unreadable = []
    out = {"rule": "\n\n".join(__doc__.split("\n\n")[1:3]), "chosen": chosen, "unreadable": unreadable, "rows": rows, "held_out": "reserved split",
           "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": describe_machine(torch_threads=True),
           "command": command_line(__file__).replace(args.bb_root, "<bb_root>")}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("chosen:", chosen)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
