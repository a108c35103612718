"""Parity of ``bbgic defend`` with BackdoorBench's own defense scripts (issue 25): the same genuine record (made by
their attack scripts), the same auxiliary images (one ``--index`` file given to both sides), the same schedule, a
few seeds; C-Acc, ASR, RA, DER and wall time per defense, side by side.

CI cannot fetch their code, so the script takes a checkout: a scratch *copy* of BackdoorBenchER (its defense
scripts are upstream BackdoorBench's with ``get_reserved_data``; ``--reserved_type train --index F`` draws exactly
the listed clean training images). Everything it writes goes inside that copy: ``data/<dataset>/`` (their 10-class
split layout filled with Fashion-MNIST), ``record/`` (their scripts' and ours), ``config/defense/<d>/parity_*.yaml``
(their settings for one run) and ``parity/`` (index files, logs, one JSON per finished run, our cache). A finished
run is never repeated, so the steps can be interrupted and rerun, each as its own command:

    python benchmarks/parity.py prepare --checkout /tmp/bb/er           # data layout, index files
    python benchmarks/parity.py attack --checkout /tmp/bb/er            # their attack scripts -> the records
    python benchmarks/parity.py pending --checkout /tmp/bb/er           # the runs still to do, one id a line
    python benchmarks/parity.py run --checkout /tmp/bb/er --id parity_badnet/ft/0/theirs
    python benchmarks/parity.py metric --checkout /tmp/bb/er            # their analysis/visual_metric.py on ours
    python benchmarks/parity.py compat --checkout /tmp/bb/er [--gic]    # every defense script through bb-run
    python benchmarks/parity.py noise --checkout /tmp/bb/er             # D_BN of reserved_noise vs _wrap
    python benchmarks/parity.py report --checkout /tmp/bb/er            # -> benchmarks/results/parity.{md,csv,json}

Both sides run as subprocesses (``bbgic bb-run <their script>`` and ``bbgic defend``) under the caller's
environment (run them with ``OMP_NUM_THREADS=1``); wall time is the subprocess's, start-up included. Their
final model (``defense_result.pt``) is evaluated by the same code as ours (:func:`backdoorbench_gic.evaluation.
evaluate`) on the record's test sets; their own logged last row is kept beside it as a check.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SIDES = ("theirs", "ours")
SPEC_KEYS = {"name", "flavour", "dataset", "attack", "seeds", "ratio", "runtime", "defenses", "notes",
             "compat_timeout"}
DEFENSE_KEYS = {"script", "schedule", "theirs", "ours", "inert", "their_metric", "variant_of", "bb_run"}
RECORD_KEYS = {"script", "bd_yaml_path", "flags"}


# ---------------------------------------------------------------------------------------------------------
# the spec
# ---------------------------------------------------------------------------------------------------------
def load_spec(path: Path) -> dict[str, Any]:
    spec = yaml.safe_load(path.read_text())
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise SystemExit(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(SPEC_KEYS)}")
    for name, d in spec["defenses"].items():
        bad = set(d) - DEFENSE_KEYS
        if bad:
            raise SystemExit(f"{path}: defense {name}: unknown key(s) {sorted(bad)}; known: {sorted(DEFENSE_KEYS)}")
        if d.get("their_metric", "logged") != "logged":
            raise SystemExit(f"{path}: defense {name}: their_metric can only be 'logged' (read their last logged "
                             f"row instead of evaluating their defense_result.pt), not {d['their_metric']!r}")
    for name, d in spec["defenses"].items():
        # a variant: our defense `variant_of` with other settings (`ours`), against the same runs of theirs
        base = d.get("variant_of")
        if base is None:
            continue
        if base not in spec["defenses"] or "variant_of" in spec["defenses"][base]:
            raise SystemExit(f"{path}: defense {name}: variant_of must name a defense of the spec that is not a "
                             f"variant itself, not {base!r}")
        if set(d) - {"variant_of", "ours"}:
            raise SystemExit(f"{path}: defense {name}: a variant takes only variant_of and ours (its script, "
                             f"schedule and their runs are {base}'s), not {sorted(set(d) - {'variant_of', 'ours'})}")
        b = spec["defenses"][base]
        spec["defenses"][name] = {**b, "ours": {**b.get("ours", {}), **d.get("ours", {})}, "variant_of": base}
    for name, r in spec["attack"]["records"].items():
        bad = set(r) - RECORD_KEYS
        if bad:
            raise SystemExit(f"{path}: record {name}: unknown key(s) {sorted(bad)}; known: {sorted(RECORD_KEYS)}")
    spec.setdefault("notes", {})
    return spec


@dataclasses.dataclass(frozen=True)
class RunId:
    record: str
    defense: str
    seed: int
    side: str

    @classmethod
    def parse(cls, text: str) -> "RunId":
        try:
            record, defense, seed, side = text.split("/")
            rid = cls(record, defense, int(seed), side)
        except ValueError:
            raise SystemExit(f"run id {text!r}: expected <record>/<defense>/<seed>/<theirs|ours>") from None
        if side not in SIDES:
            raise SystemExit(f"run id {text!r}: side must be theirs or ours")
        return rid

    def __str__(self) -> str:
        return f"{self.record}/{self.defense}/{self.seed}/{self.side}"

    @property
    def slug(self) -> str:
        return str(self).replace("/", "__")


def all_runs(spec: dict[str, Any], records: list[str] | None = None, defenses: list[str] | None = None,
             seeds: list[int] | None = None) -> list[RunId]:
    out = []
    for seed in seeds or spec["seeds"]:
        for record in records or list(spec["attack"]["records"]):
            for defense in defenses or list(spec["defenses"]):
                for side in SIDES:
                    if side == "theirs" and "variant_of" in spec["defenses"][defense]:
                        continue  # their side is the base defense's runs
                    out.append(RunId(record, defense, int(seed), side))
    return out


def work_dir(checkout: Path) -> Path:
    return checkout / "parity"


def index_file(checkout: Path, seed: int) -> Path:
    return work_dir(checkout) / f"index_seed{seed}.txt"


def run_json(checkout: Path, rid: RunId) -> Path:
    return work_dir(checkout) / "runs" / f"{rid.slug}.json"


def env_for(checkout: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["BBGIC_CACHE_DIR"] = str(work_dir(checkout) / "cache")  # our content caches, inside the scratch copy
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    return env


def bbgic(*args: str) -> list[str]:
    return [sys.executable, "-m", "backdoorbench_gic.cli", *args]


def flags(values: dict[str, Any]) -> list[str]:
    out = []
    for k, v in values.items():
        out += [f"--{k}", str(v)]
    return out


# ---------------------------------------------------------------------------------------------------------
# prepare: their split layout filled with Fashion-MNIST, and one index file per seed
# ---------------------------------------------------------------------------------------------------------
def cmd_prepare(spec: dict[str, Any], checkout: Path) -> None:
    from backdoorbench_gic.auxdata.layout import META_FILE, export_image_folder
    from backdoorbench_gic.data.datasets import open_dataset
    from backdoorbench_gic.patching import detect_checkout

    flavour = detect_checkout(checkout)
    if flavour != spec["flavour"]:
        raise SystemExit(f"{checkout} is a {flavour} checkout; the spec needs {spec['flavour']}")
    ds = spec["dataset"]
    layout = ds.get("layout", "split")
    if layout not in ("split", "gtsrb"):
        raise SystemExit(f"dataset.layout must be split (BackdoorBenchER's ImageFolder trees) or gtsrb (upstream's "
                         f"GTSRB tree), not {layout!r}")
    root = checkout / "data" / ds["name"]
    src = open_dataset(ds["source"])
    rng = np.random.RandomState(int(ds["seed"]))
    k = src.spec.num_classes
    picks: dict[str, list[np.ndarray]] = {"train": [], "reserved": [], "test": []}
    for c in range(k):
        pos = rng.permutation(np.flatnonzero(src.train.labels.numpy() == c))
        n_tr, n_rs = int(ds["train_per_class"]), int(ds.get("reserved_per_class", 0))
        picks["train"].append(np.sort(pos[:n_tr]))
        picks["reserved"].append(np.sort(pos[n_tr:n_tr + n_rs]))
        picks["test"].append(np.sort(rng.permutation(np.flatnonzero(src.test.labels.numpy() == c))
                                     [:int(ds["test_per_class"])]))
    if layout == "gtsrb":
        write_gtsrb(src, picks, root)
    for split, parts in picks.items() if layout == "split" else ():  # class-major: file i is ImageFolder position i
        folder = root / split
        if (folder / META_FILE).is_file():
            continue
        base = src.test if split == "test" else src.train
        subset = base.subset(np.concatenate(parts), name=f"{ds['name']}/{split}")
        export_image_folder(subset, folder, overwrite=False,
                            meta={"filled_with": ds["source"], "seed": ds["seed"], "split": split})
        print(f"wrote {folder}: {len(subset)} images of {ds['source']}")
    n_train = k * int(ds["train_per_class"])
    work_dir(checkout).mkdir(parents=True, exist_ok=True)
    warm_victims(spec, checkout)
    for seed in spec["seeds"]:
        target = index_file(checkout, seed)
        if not target.is_file():
            write_index(spec, checkout, seed, n_train, target)


def write_gtsrb(src, picks: dict[str, list[np.ndarray]], root: Path) -> None:
    """Upstream's GTSRB tree (43 classes) holding the source's classes 0..k-1; the other classes stay empty, as
    an upstream checkout without GTSRB's own images allows."""
    from backdoorbench_gic.data.datasets import GTSRB
    from backdoorbench_gic.data.transforms import nchw_to_nhwc_uint8

    if (root / "Test" / "GT-final_test.csv").is_file():
        return

    def part(base, split):
        idx = np.concatenate(picks[split])
        return nchw_to_nhwc_uint8(base.images[idx]), base.labels.numpy()[idx]

    GTSRB.write(root, part(src.train, "train"), part(src.test, "test"), ext="png")
    print(f"wrote {root}: GTSRB layout, {sum(map(len, picks['train']))} train and {sum(map(len, picks['test']))} "
          f"test images of {src.name} in {len(picks['train'])} of 43 classes")


def warm_victims(spec, checkout: Path) -> None:
    """Each record's victim metrics into our content cache, once: our runs then skip that evaluation (their scripts
    never evaluate the victim), and both sides' DER use these numbers."""
    from backdoorbench_gic.pipeline import victim_metrics
    from backdoorbench_gic.records import load_attack_record

    for r in spec["attack"]["records"]:
        if (checkout / "record" / r / "attack_result.pt").is_file():
            record = load_attack_record(r, checkout)
            m = victim_metrics(record, record.build_model(), torch_device())
            print(f"victim of {r}: C-Acc {m.acc:.3f} ASR {m.asr:.3f} RA {m.ra:.3f} (cached for our runs)")


def write_index(spec, checkout: Path, seed: int, n_train: int, target: Path) -> None:
    """BackdoorBenchER's ratio rule on the clean training set (clean originals of poisoned positions included, as
    theirs), seeded: the auxiliary images both sides train on. Every record shares that set, so one file serves
    all; it needs one record to read the set from."""
    from backdoorbench_gic.auxdata import build_aux_set
    from backdoorbench_gic.auxdata.sampling import write_index_file
    from backdoorbench_gic.records import load_attack_record

    records = [r for r in spec["attack"]["records"] if (checkout / "record" / r / "attack_result.pt").is_file()]
    if not records:
        print(f"index for seed {seed}: waiting for a record (run the attack step, then prepare again)")
        return
    record = load_attack_record(records[0], checkout)
    if len(record.clean_train) != n_train:
        raise SystemExit(f"{records[0]} has {len(record.clean_train)} training images, the spec {n_train}")
    aux = build_aux_set(record, "train", ratio=float(spec["ratio"]), seed=int(seed))
    write_index_file(target, aux.indices.tolist())
    print(f"wrote {target}: {len(aux)} training positions (seed {seed})")


# ---------------------------------------------------------------------------------------------------------
# attack: their attack scripts through bb-run (unmodified; torch.load through the allow-list)
# ---------------------------------------------------------------------------------------------------------
def cmd_attack(spec: dict[str, Any], checkout: Path, only: list[str] | None) -> None:
    common = dict(spec["attack"]["common"])
    (checkout / "record").mkdir(exist_ok=True)  # their sh/init_folders.sh makes it; their prepare() needs it
    for name, cfg in spec["attack"]["records"].items():
        if only and name not in only:
            continue
        folder = checkout / "record" / name
        if (folder / "attack_result.pt").is_file():
            print(f"{name}: done")
            continue
        if folder.exists():  # an interrupted attack (their prepare() refuses an existing folder)
            shutil.rmtree(folder)
        argv = flags({**common, **cfg.get("flags", {}), "dataset": spec["dataset"]["name"], "dataset_path": "./data",
                      "save_folder_name": name, "bd_yaml_path": cfg["bd_yaml_path"]})
        log = work_dir(checkout) / "logs" / f"attack_{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(log, "w") as fh:
            rc = subprocess.call(bbgic("bb-run", cfg["script"], "--bb_root", str(checkout), *argv), cwd=checkout,
                                 stdout=fh, stderr=subprocess.STDOUT, env=env_for(checkout))
        print(f"{name}: exit {rc} after {time.perf_counter() - t0:.0f} s (log {log})")
        if rc != 0:
            raise SystemExit(rc)


# ---------------------------------------------------------------------------------------------------------
# one run: their script through bb-run, or bbgic defend, on the same record, index file and schedule
# ---------------------------------------------------------------------------------------------------------
def their_yaml(spec: dict[str, Any], checkout: Path, rid: RunId) -> tuple[Path, dict[str, Any]]:
    """config/defense/<d>/parity_<d>_seed<s>.yaml in the checkout: their cifar10.yaml with the runtime, the
    schedule, their-only keys, the seed, the dataset and the index file (BackdoorBenchER names the output folder
    after the yaml: record/<r>/defense/<d>/parity_<d>_seed<s>/)."""
    d = spec["defenses"][rid.defense]
    folder = checkout / "config" / "defense" / Path(d["script"]).stem
    base = yaml.safe_load((folder / "cifar10.yaml").read_text()) or {}
    values = {**base, **spec["runtime"], **d.get("schedule", {}), **d.get("theirs", {}),
              "random_seed": rid.seed, "dataset": spec["dataset"]["name"], "ratio": spec["ratio"],
              "index": str(index_file(checkout, rid.seed)), "reserved_type": "train"}
    path = folder / f"parity_{rid.defense}_seed{rid.seed}.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path, values


def our_overrides(spec: dict[str, Any], checkout: Path, rid: RunId) -> dict[str, Any]:
    d = spec["defenses"][rid.defense]
    return {**spec["runtime"], **d.get("schedule", {}), **d.get("ours", {}), "random_seed": rid.seed,
            "ratio": spec["ratio"], "index": str(index_file(checkout, rid.seed)), "reserved_type": "train"}


def their_name(spec: dict[str, Any], defense: str) -> str:
    """The defense whose runs of theirs this one compares with: itself, or the base of a variant."""
    return spec["defenses"][defense].get("variant_of", defense)


def our_output(checkout: Path, rid: RunId) -> Path:
    return checkout / "record" / rid.record / "defense" / rid.defense / f"ours_seed{rid.seed}"


def find_their_output(checkout: Path, rid: RunId) -> Path | None:
    hits = sorted((checkout / "record" / rid.record / "defense").glob(f"*/parity_{rid.defense}_seed{rid.seed}"))
    return hits[0] if hits else None


def their_logged_last(folder: Path) -> dict[str, float] | None:
    """Their own final numbers, where their script logs them: the ``last`` row of a ``*_df_summary.csv``
    (BackdoorBench's trainers), else the last row of a ``*_df.csv``."""
    import pandas as pd

    from backdoorbench_gic.results import read_summary_last

    def fractions(values: dict[str, float], name: str) -> dict[str, Any]:
        # some of their scripts (npd.py) log percent: a C-Acc above 1 can only be one
        scale = 100.0 if values.get("test_acc", 0.0) > 1.0 else 1.0
        return {k: values[k] / scale for k in ("test_acc", "test_asr", "test_ra") if k in values} | {"file": name}

    for path in sorted(folder.glob("*_df_summary.csv")):
        got = read_summary_last(path)
        if "test_acc" in got:
            return fractions(got, path.name)
    for path in sorted(folder.glob("*_df.csv")):
        df = pd.read_csv(path, index_col=0)
        if "test_acc" in df and len(df):
            return fractions({k: float(v) for k, v in df.iloc[-1].items() if k.startswith("test_")}, path.name)
    return None


def cmd_run(spec: dict[str, Any], checkout: Path, rid: RunId) -> dict[str, Any]:
    from backdoorbench_gic.evaluation import compare, evaluate
    from backdoorbench_gic.pipeline import victim_metrics
    from backdoorbench_gic.records import load_attack_record
    from backdoorbench_gic.results import load_defense_model
    from backdoorbench_gic.utils.io import atomic_write_json

    target = run_json(checkout, rid)
    if target.is_file():
        print(f"{rid}: done")
        return json.loads(target.read_text())
    if not index_file(checkout, rid.seed).is_file():
        raise SystemExit(f"{rid}: no index file; run the prepare step after the attacks")
    d = spec["defenses"][rid.defense]
    if rid.side == "theirs" and "variant_of" in d:
        raise SystemExit(f"{rid}: {rid.defense} is a variant of ours; their side is {d['variant_of']}'s runs")
    log = work_dir(checkout) / "logs" / f"{rid.slug}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if rid.side == "theirs":
        yaml_path, _ = their_yaml(spec, checkout, rid)
        stale = find_their_output(checkout, rid)
        if stale is not None:
            shutil.rmtree(stale)  # an interrupted run of theirs (the JSON is written last)
        cmd = bbgic("bb-run", d["script"], *d.get("bb_run", []), "--bb_root", str(checkout), "--result_file",
                    rid.record, "--yaml_path", os.path.relpath(yaml_path, checkout))
    else:
        out = our_output(checkout, rid)
        if out.exists():
            shutil.rmtree(out)
        cmd = bbgic("defend", "--result_file", rid.record, "--bb_root", str(checkout),
                    "--defense", their_name(spec, rid.defense),
                    "--output_dir", str(out), "--no_progress", *flags(our_overrides(spec, checkout, rid)))
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, cwd=checkout, stdout=fh, stderr=subprocess.STDOUT, env=env_for(checkout))
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {"id": str(rid), "record": rid.record, "defense": rid.defense, "seed": rid.seed,
                           "side": rid.side, "exit_code": rc, "wall_seconds": round(wall, 2), "command": " ".join(cmd),
                           "log": os.path.relpath(log, checkout)}
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        row["error"] = " | ".join(tail)
        print(f"{rid}: exit {rc} after {wall:.0f} s: {row['error']}")
    else:
        record = load_attack_record(rid.record, checkout)
        victim = record.build_model()
        before = victim_metrics(record, victim, torch_device())
        if rid.side == "theirs":
            folder = find_their_output(checkout, rid)
            row["output"] = os.path.relpath(folder, checkout)
            row["logged"] = their_logged_last(folder)
            from backdoorbench_gic.evaluation import Metrics

            logged, after = row["logged"], None
            if d.get("their_metric") == "logged":  # their defense_result.pt is not the defended model
                why, missing = "as the spec says (their_metric)", "the spec reads their logged numbers"
            else:
                try:
                    model = load_defense_model(folder / "defense_result.pt", record)
                    after = evaluate(model, record.clean_test, record.bd_test)
                    row["metric_source"] = "defense_result.pt, evaluated here"
                except Exception as exc:  # a network their code extends, which our allow-list cannot rebuild
                    row["load_error"] = str(exc).splitlines()[0][:300]
                    why = "the model does not load here"
                    missing = f"their model does not load ({row['load_error']})"
            if after is None:
                if logged is None:
                    raise SystemExit(f"{rid}: {missing}, and they log no final test numbers")
                after = Metrics(logged["test_acc"], logged["test_asr"], logged["test_ra"])
                row["metric_source"] = f"their {logged['file']} (last row): {why}"
            row.update(compare(before, after))
        else:
            tidy = json.loads((our_output(checkout, rid) / "result.json").read_text())
            row.update({k: tidy[k] for k in ("acc_before", "asr_before", "ra_before", "acc_after", "asr_after",
                                             "ra_after", "der", "rir", "success", "aux_size")})
            row["metric_source"] = "result.json"
            row["output"] = os.path.relpath(our_output(checkout, rid), checkout)
        print(f"{rid}: {wall:.0f} s, C-Acc {row['acc_after']:.3f} ASR {row['asr_after']:.3f} RA {row['ra_after']:.3f}")
    atomic_write_json(target, row)
    return row


def torch_device():
    import torch

    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------
# their analysis/visual_metric.py on our defense_result.pt
# ---------------------------------------------------------------------------------------------------------
def cmd_metric(spec: dict[str, Any], checkout: Path) -> list[dict[str, Any]]:
    """For every record, our first finished run of each defense: their analysis/visual_metric.py (through bb-run:
    it loads our defense_result.pt into their network) recomputes C-Acc, ASR, RA, DER and RIR, compared with what
    our run logged. Results in parity/metric.json."""
    import pandas as pd

    from backdoorbench_gic.utils.io import atomic_write_json

    script = checkout / "analysis" / "visual_metric.py"
    if not script.is_file():
        raise SystemExit(f"{script} does not exist: this checkout has no analysis/ folder")
    checks = []
    for record in spec["attack"]["records"]:
        for defense in spec["defenses"]:
            rids = [RunId(record, defense, int(seed), "ours") for seed in spec["seeds"]]
            done = [r for r in rids if run_json(checkout, r).is_file()
                    and json.loads(run_json(checkout, r).read_text()).get("exit_code") == 0]
            if not done:
                continue
            rid = done[0]
            ours = json.loads(run_json(checkout, rid).read_text())
            rel = f"{rid.record}/defense/{rid.defense}/ours_seed{rid.seed}"
            visual = checkout / "record" / rel / "visual"
            cmd = bbgic("bb-run", "analysis/visual_metric.py", "--bb_root", str(checkout), "--result_file_attack",
                        rid.record, "--result_file_defense", rel, "--yaml_path",
                        "./config/visualization/default.yaml", "--dataset", "cifar10", "--device", "cpu",
                        "--num_workers", "0")
            log = work_dir(checkout) / "logs" / f"metric__{rid.slug}.log"
            with open(log, "w") as fh:
                rc = subprocess.call(cmd, cwd=checkout, stdout=fh, stderr=subprocess.STDOUT, env=env_for(checkout))
            row: dict[str, Any] = {"id": str(rid), "exit_code": rc, "log": os.path.relpath(log, checkout)}
            if rc == 0 and (visual / "metric_summary.csv").is_file():
                theirs = pd.read_csv(visual / "metric_summary.csv").iloc[0].to_dict()
                pairs = {"clean_accuracy_attack": "acc_before", "asr_attack": "asr_before", "ra_attack": "ra_before",
                         "clean_accuracy_defense": "acc_after", "asr_defense": "asr_after",
                         "ra_defense": "ra_after", "der": "der", "rir": "rir"}
                row["theirs"] = {k: float(theirs[k]) for k in pairs if k in theirs}
                row["ours"] = {k: float(ours[v]) for k, v in pairs.items() if k in theirs}
                row["max_abs_diff"] = max(abs(row["theirs"][k] - row["ours"][k]) for k in row["theirs"])
                row["agree"] = row["max_abs_diff"] < 1e-6
            else:
                row["error"] = " | ".join(log.read_text().strip().splitlines()[-3:])
            print(f"visual_metric on {rel}: {row.get('agree', row.get('error'))}")
            checks.append(row)
    atomic_write_json(work_dir(checkout) / "metric.json", checks)
    return checks


# ---------------------------------------------------------------------------------------------------------
# compat: does each of their defense scripts run through bb-run (README's compatibility table)
# ---------------------------------------------------------------------------------------------------------
NOT_DEFENSES = {"__init__", "base", "dataset_load_mode"}


def last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ("Error" in ln or "Exception" in ln) and not ln.startswith(("File ", "warnings.warn")):
            return ln[:240]
    return lines[-1][:240] if lines else ""


def cmd_compat(spec: dict[str, Any], checkout: Path, record: str, scripts: list[str] | None, gic: bool) -> None:
    """Every defense script of the checkout through bb-run on ``record`` (their ``<dataset>.yaml``, else
    cifar10.yaml, else config.yaml,
    plus the runtime, the seed-0 index file and the spec's short schedule where it has one), each cut at the
    spec's ``compat_timeout`` seconds: exit code, wall time, the error's last line. parity/compat*.json."""
    from backdoorbench_gic.utils.io import atomic_write_json

    timeout = int(spec.get("compat_timeout", 240))
    by_script = {Path(d["script"]).stem: d for d in spec["defenses"].values() if "variant_of" not in d}
    names = scripts or sorted(p.stem for p in (checkout / "defense").glob("*.py") if p.stem not in NOT_DEFENSES)
    target = work_dir(checkout) / f"compat{'_gic' if gic else ''}.json"
    results = json.loads(target.read_text()) if target.is_file() else {}
    for name in names:
        if name in results:
            continue
        folder = checkout / "config" / "defense" / name
        candidates = (f"{spec['dataset']['name']}.yaml", "cifar10.yaml", "config.yaml")
        base_yaml = next((folder / f for f in candidates if (folder / f).is_file()), None)
        values = yaml.safe_load(base_yaml.read_text()) if base_yaml else {}
        d = by_script.get(name, {})
        values.update({**spec["runtime"], **d.get("schedule", {}), **d.get("theirs", {}), "random_seed": 0,
                       "dataset": spec["dataset"]["name"], "ratio": spec["ratio"], "reserved_type": "train",
                       "index": str(index_file(checkout, 0))})
        yaml_path = folder / f"parity_compat{'_gic' if gic else ''}.yaml"
        folder.mkdir(parents=True, exist_ok=True)
        yaml_path.write_text(yaml.safe_dump(values, sort_keys=False))
        cmd = bbgic("bb-run", f"defense/{name}.py", *d.get("bb_run", []), "--bb_root", str(checkout), "--result_file", record,
                    "--yaml_path", os.path.relpath(yaml_path, checkout),
                    *(["--gic", "--gic_steps", "20"] if gic else []))
        log = work_dir(checkout) / "logs" / f"compat{'_gic' if gic else ''}__{name}.log"
        t0 = time.perf_counter()
        with open(log, "w") as fh:
            try:
                rc = subprocess.call(cmd, cwd=checkout, stdout=fh, stderr=subprocess.STDOUT, env=env_for(checkout),
                                     timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
        row = {"script": name, "exit_code": rc, "wall_seconds": round(time.perf_counter() - t0, 1),
               "yaml": base_yaml.name if base_yaml else None, "log": os.path.relpath(log, checkout)}
        row["result"] = ("finished" if rc == 0 else f"still running at {timeout} s (no error)" if rc is None
                         else last_error(log))
        if gic:  # bb-run's fit line: which images g was fitted on
            fit = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if "GIC: g fitted" in ln]
            row["fit"] = fit[0][fit[0].index("GIC:"):][:300] if fit else "no fit line (g never fitted)"
        results[name] = row
        atomic_write_json(target, results)
        print(f"{name}: {row['result']} ({row['wall_seconds']} s)")


# ---------------------------------------------------------------------------------------------------------
# noise: BackdoorBenchER's wrapped reserved_noise against our clipped one, by the victim's D_BN
# ---------------------------------------------------------------------------------------------------------
NOISE_SETS = ("reserved", "reserved_noise", "reserved_noise_wrap")


def cmd_noise(spec: dict[str, Any], checkout: Path, record: str) -> None:
    """``bbgic aux-quality`` on ``record``'s victim for the in-distribution set, our clipped ``reserved_noise`` and
    BackdoorBenchER's wrapped one, at the spec's ratio: D_BN and the other signals per set, in parity/noise.json."""
    import pandas as pd

    from backdoorbench_gic.utils.io import atomic_write_json

    csv = work_dir(checkout) / "noise.csv"
    log = work_dir(checkout) / "logs" / "noise.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = bbgic("aux-quality", "--result_file", record, "--bb_root", str(checkout), "--reserved_type", *NOISE_SETS,
                "--ratio", str(spec["ratio"]), "--device", "cpu", "--csv", str(csv))
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, cwd=checkout, stdout=fh, stderr=subprocess.STDOUT, env=env_for(checkout))
    if rc != 0:
        raise SystemExit(f"aux-quality failed (exit {rc}); see {log}")
    keep = ["reserved_type", "n", "bn_div", "risk", "verdict", "accuracy", "top_class", "top_share"]
    rows = pd.read_csv(csv)[keep].to_dict("records")
    atomic_write_json(work_dir(checkout) / "noise.json", {"record": record, "ratio": spec["ratio"], "sets": rows})
    for r in rows:
        print(f"{r['reserved_type']}: D_BN {r['bn_div']:.4f}, victim accuracy {r['accuracy']:.3f}, "
              f"top class {r['top_class']} ({r['top_share']:.0%})")


# ---------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------
METRICS = (("acc_after", "C-Acc"), ("asr_after", "ASR"), ("ra_after", "RA"), ("der", "DER"))


def config_differences(spec: dict[str, Any], checkout: Path, defense: str) -> list[str]:
    """Keys both sides configure that end up with different values (their yaml for seed 0 vs our resolved
    config for the same flags), runtime and path keys left out."""
    from backdoorbench_gic.registry import DEFENSES

    seed = int(spec["seeds"][0])
    rid = RunId(next(iter(spec["attack"]["records"])), defense, seed, "ours")
    base = their_name(spec, defense)
    path = checkout / "config" / "defense" / Path(spec["defenses"][defense]["script"]).stem / \
        f"parity_{base}_seed{seed}.yaml"
    if not path.is_file():
        return []
    theirs = yaml.safe_load(path.read_text())
    cfg = DEFENSES.get(base).from_sources(spec["dataset"]["name"], None, our_overrides(spec, checkout, rid)).config
    ours = dataclasses.asdict(cfg)
    skip = {"device", "amp", "pin_memory", "num_workers", "prefetch", "non_blocking", "dataset_path", "index", "log",
            "checkpoint_load", "checkpoint_save", "yaml_path", "result_file", "frequency_save", "dataset", "model"}
    out = []
    skip |= set(spec["defenses"][defense].get("inert", []))  # keys their script reads but never acts on
    for k in sorted(set(theirs) & set(ours) - skip):
        a, b = theirs[k], ours[k]
        same = a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b))
        if not same and not (a in (None, "") and b in (None, "", "none")):
            out.append(f"{k}: theirs {a!r}, ours {b!r}")
    return out


def cmd_report(spec: dict[str, Any], checkout: Path, out_dir: Path, stem: str = "parity") -> None:
    import pandas as pd

    from backdoorbench_gic.analysis import machine_info
    from backdoorbench_gic.utils.io import atomic_write_json, atomic_write_text

    rows = [json.loads(p.read_text()) for p in sorted((work_dir(checkout) / "runs").glob("*.json"))]
    here = str(Path(checkout).resolve())  # the published files name the checkout <checkout>, never this path

    def publish(payload: dict[str, Any], markdown) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        payload = json.loads(json.dumps(payload, default=str).replace(here, "<checkout>"))
        atomic_write_json(out_dir / f"{stem}.json", payload)
        atomic_write_text(out_dir / f"{stem}.md", markdown(payload))

    if not rows:
        compat = compat_rows(checkout)
        if not compat:
            raise SystemExit("no finished runs and no compat results")
        publish({"name": spec["name"], "date": dt.date.today().isoformat(), "machine": machine_info(), "spec": spec,
                 "compat": compat}, lambda payload: render_compat_only(spec, payload, stem))
        print(f"wrote {out_dir / (stem + '.md')} and {stem}.json (compat only: no parity runs)")
        return
    df = pd.DataFrame(rows)
    ok = df[df.exit_code == 0]
    summary = []
    for record, defense in df[["record", "defense"]].drop_duplicates().itertuples(index=False):
        entry: dict[str, Any] = {"record": record, "defense": defense}
        for side in SIDES:
            name = their_name(spec, defense) if side == "theirs" else defense
            s = ok[(ok.record == record) & (ok.defense == name) & (ok.side == side)]
            failed = df[(df.record == record) & (df.defense == name) & (df.side == side) & (df.exit_code != 0)]
            entry[f"{side}_n"] = len(s)
            entry[f"{side}_failed"] = len(failed)
            if len(failed):
                entry[f"{side}_error"] = str(failed.iloc[0].get("error", ""))[:300]
            for key, _ in METRICS + (("wall_seconds", "wall"),):
                entry[f"{side}_{key}"] = float(s[key].mean()) if len(s) else float("nan")
                entry[f"{side}_{key}_sd"] = float(s[key].std(ddof=1)) if len(s) > 1 else float("nan")
        for key, _ in METRICS:
            entry[f"d_{key}"] = entry[f"ours_{key}"] - entry[f"theirs_{key}"]
            sds = [entry[f"{side}_{key}_sd"] for side in SIDES if not math.isnan(entry[f"{side}_{key}_sd"])]
            entry[f"spread_{key}"] = max(sds) if sds else float("nan")
        both = entry["ours_n"] and entry["theirs_n"]
        entry["wall_ratio"] = entry["ours_wall_seconds"] / entry["theirs_wall_seconds"] if both else float("nan")
        beyond = []
        for key in ("acc_after", "asr_after"):
            spread = entry[f"spread_{key}"]
            tol = max(0.02, 2 * spread) if not math.isnan(spread) else 0.02
            if both and abs(entry[f"d_{key}"]) > tol:
                beyond.append(dict(METRICS)[key])
        if both and entry["wall_ratio"] > 1.0:
            beyond.append("wall")  # the speed target (ours no slower than theirs) missed
        entry["beyond_tolerance"] = ", ".join(beyond)
        entry["cause"] = spec["notes"].get(defense, spec["notes"].get(their_name(spec, defense), "")) if beyond else ""
        entry["config_differences"] = "; ".join(config_differences(spec, checkout, defense))
        summary.append(entry)
    sm = pd.DataFrame(summary)
    metric = work_dir(checkout) / "metric.json"
    noise = work_dir(checkout) / "noise.json"
    publish({"name": spec["name"], "date": dt.date.today().isoformat(), "machine": machine_info(),
             "spec": spec, "summary": summary, "runs": rows,
             "visual_metric": json.loads(metric.read_text()) if metric.is_file() else None,
             "compat": compat_rows(checkout),
             "noise": json.loads(noise.read_text()) if noise.is_file() else None},
            lambda payload: render(spec, sm, df, payload))
    atomic_write_text(out_dir / f"{stem}.csv", df.to_csv(index=False).replace(here, "<checkout>"))
    print(f"wrote {out_dir / (stem + '.md')}, {stem}.csv, {stem}.json")


def _pm(mean: float, sd: float, pct: bool = True) -> str:
    if math.isnan(mean):
        return "-"
    f = 100 if pct else 1
    fmt = "{:.1f}" if pct else "{:.0f}"
    return fmt.format(mean * f) + ("" if math.isnan(sd) else " ± " + fmt.format(sd * f))


def attack_overrides(spec: dict[str, Any]) -> str:
    """`` (parity_badnet: epochs 20)``: the records whose flags override the common ones, else empty."""
    over = [f"{name}: " + ", ".join(f"{k} {v}" for k, v in cfg["flags"].items())
            for name, cfg in spec["attack"]["records"].items() if cfg.get("flags")]
    return f" ({'; '.join(over)})" if over else ""


def compat_rows(checkout: Path) -> dict[str, dict[str, Any]]:
    """``{script: {"plain": row, "gic": row}}`` from the compat step's files (parity/compat.json, compat_gic.json)."""
    out: dict[str, dict[str, Any]] = {}
    for mode, name in (("plain", "compat.json"), ("gic", "compat_gic.json")):
        path = work_dir(checkout) / name
        if path.is_file():
            for script, row in json.loads(path.read_text()).items():
                out.setdefault(script, {})[mode] = row
    return dict(sorted(out.items()))


def compat_lines(spec: dict[str, Any], payload: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    compat = payload.get("compat")
    if compat:
        timeout = spec.get("compat_timeout", 240)
        lines += ["", f"## Every defense script of the checkout through bb-run (compat step, cut at {timeout} s)", "",
                  "| script | without --gic | with --gic |", "|---|---|---|"]
        compared = {Path(v["script"]).stem for v in spec["defenses"].values()}
        for script, modes in compat.items():
            cells = [f"{m['result']} ({m['wall_seconds']:.0f} s)" if m else
                     "compared above (parity runs)" if mode == "plain" and script in compared else "not run"
                     for mode, m in (("plain", modes.get("plain")), ("gic", modes.get("gic")))]
            lines.append(f"| {script} | {cells[0]} | {cells[1]} |")
    return lines


def render_compat_only(spec: dict[str, Any], payload: dict[str, Any], stem: str) -> str:
    m, ds = payload["machine"], spec["dataset"]
    lines = [f"# Their defense scripts through bb-run: {spec['flavour']} ({payload['date']})", "",
             f"Machine: {m.get('cpu', '?')}, torch {m.get('torch', '?')}, one thread per run. Spec "
             f"`benchmarks/{stem}.yaml`; commands `python benchmarks/parity.py prepare|attack|compat [--gic]|"
             f"report --spec benchmarks/{stem}.yaml --checkout <copy of {spec['flavour']}>`.", "",
             f"Record: their {', '.join(v['script'] for v in spec['attack']['records'].values())} on `{ds['name']}` "
             f"({ds.get('layout', 'split')} layout) filled with {ds['source']} ({10 * ds['train_per_class']} train, "
             f"{10 * ds['test_per_class']} test), {spec['attack']['common']['model']}, "
             f"{spec['attack']['common']['epochs']} epochs: a record to run the scripts on, not a victim to compare."]
    return "\n".join(lines + compat_lines(spec, payload)) + "\n"


def render(spec: dict[str, Any], sm, df, payload: dict[str, Any]) -> str:
    m = payload["machine"]
    ds = spec["dataset"]
    lines = [f"# Parity with BackdoorBench's own defense scripts ({payload['date']})", "",
             f"Machine: {m.get('cpu', '?')}, torch {m.get('torch', '?')}, one thread per run. Spec "
             f"`benchmarks/parity.yaml`; command `python benchmarks/parity.py report --checkout <copy of "
             f"BackdoorBenchER>` after the prepare, attack and run steps (module docstring).", "",
             f"Records: their own attack scripts ({', '.join(v['script'] for v in spec['attack']['records'].values())}) "
             f"on their 10-class split layout `{ds['name']}` filled with Fashion-MNIST (3 x 32 x 32; "
             f"{10 * ds['train_per_class']} train, {10 * ds['test_per_class']} test), PreActResNet-18, "
             f"{spec['attack']['common']['epochs']} epochs{attack_overrides(spec)}. Auxiliary set: one `--index` file per seed "
             f"(ratio {spec['ratio']} of the clean training set, poisoned positions excluded) given to both sides. "
             f"Seeds {spec['seeds']}. Numbers in %: mean ± standard deviation over the seeds that finished (n); "
             f"d = ours - theirs; tolerance = max(2 points, 2 x the larger side's spread).", ""]
    for record, g in sm.groupby("record", sort=False):
        first = df[(df.record == record) & (df.exit_code == 0)]
        if len(first):
            r0 = first.iloc[0]
            lines += [f"## {record}: victim C-Acc {100 * r0.acc_before:.1f}, ASR {100 * r0.asr_before:.1f}, "
                      f"RA {100 * r0.ra_before:.1f}", ""]
        lines += ["| defense | n | theirs C-Acc / ASR / RA / DER | ours C-Acc / ASR / RA / DER | d C-Acc | d ASR | "
                  "wall theirs / ours (s) | ratio | beyond tolerance (C-Acc, ASR) or slower (wall): cause |", "|---|---|---|---|---|---|---|---|---|"]
        for _, e in g.iterrows():
            def side(s):
                if not e[f"{s}_n"]:
                    return f"failed: {e.get(f'{s}_error', '')}"[:160] if e[f"{s}_failed"] else "not run yet"
                return " / ".join(_pm(e[f"{s}_{k}"], e[f"{s}_{k}_sd"]) for k, _ in METRICS)
            n = f"{e['theirs_n']}/{e['ours_n']}"
            ratio = "-" if math.isnan(e["wall_ratio"]) else f"{e['wall_ratio']:.2f}"
            cause = f"{e['beyond_tolerance']}: {e['cause'] or 'UNEXPLAINED'}" if e["beyond_tolerance"] else "within"
            lines.append(f"| {e['defense']} | {n} | {side('theirs')} | {side('ours')} | "
                         f"{_pm(e['d_acc_after'], e['spread_acc_after'])} | {_pm(e['d_asr_after'], e['spread_asr_after'])} | "
                         f"{_pm(e['theirs_wall_seconds'], float('nan'), False)} / "
                         f"{_pm(e['ours_wall_seconds'], float('nan'), False)} | "
                         f"{ratio} | {cause} |")
        lines.append("")
    lines += ["## Schedules (the same flags on both sides)", "",
              "| defense | schedule | their-only | ours-only | config keys that still differ |", "|---|---|---|---|---|"]
    for d, v in spec["defenses"].items():
        diffs = sm[sm.defense == d]["config_differences"]
        lines.append(f"| {d} | {v.get('schedule') or '-'} | {v.get('theirs') or '-'} | {v.get('ours') or '-'} | "
                     f"{(diffs.iloc[0] if len(diffs) else '') or 'none'} |")
    vm = payload.get("visual_metric")
    if vm:
        lines += ["", "## Their analysis/visual_metric.py on our defense_result.pt", "",
                  "| our run | recomputed = logged | largest difference |", "|---|---|---|"]
        for c in vm:
            lines.append(f"| {c['id']} | {c.get('agree', 'failed: ' + str(c.get('error', ''))[:120])} | "
                         f"{c.get('max_abs_diff', '-')} |")
    noise = payload.get("noise")
    if noise:
        lines += ["", f"## `reserved_noise` (clipped, ours) against `reserved_noise_wrap` (BackdoorBenchER's wrapped "
                  f"pixels) on {noise['record']}'s victim, ratio {noise['ratio']}", "",
                  "| set | images | D_BN | victim accuracy | top predicted class (share) |", "|---|---|---|---|---|"]
        for r in noise["sets"]:
            lines.append(f"| {r['reserved_type']} | {r['n']} | {r['bn_div']:.4f} | {100 * r['accuracy']:.1f} | "
                         f"{r['top_class']} ({100 * r['top_share']:.0f} %) |")
    lines += compat_lines(spec, payload)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["prepare", "attack", "pending", "run", "metric", "compat", "noise", "report"])
    p.add_argument("--checkout", required=True, type=Path, help="a scratch copy of a BackdoorBenchER checkout")
    p.add_argument("--spec", type=Path, default=HERE / "parity.yaml")
    p.add_argument("--id", action="append", default=[], help="run id(s) for `run` (<record>/<defense>/<seed>/<side>)")
    p.add_argument("--record", action="append", default=None, help="restrict to these records")
    p.add_argument("--defense", action="append", default=None, help="restrict to these defenses")
    p.add_argument("--seed", action="append", type=int, default=None, help="restrict to these seeds")
    p.add_argument("--out", type=Path, default=RESULTS, help="report folder (default benchmarks/results)")
    p.add_argument("--script", action="append", default=None, help="compat: only these scripts (stems)")
    p.add_argument("--gic", action="store_true", help="compat: with --gic")
    args = p.parse_args(argv)
    spec = load_spec(args.spec)
    checkout = args.checkout.resolve()
    if not (checkout / "defense").is_dir():
        raise SystemExit(f"--checkout {args.checkout}: not a BackdoorBench(ER) checkout (no defense/ folder there); "
                         "give a scratch copy of one")
    first_record = (args.record or list(spec["attack"]["records"]))[0]  # noise and compat run on one record
    os.environ["BBGIC_CACHE_DIR"] = str(work_dir(checkout) / "cache")  # the cache our subprocess runs use
    if args.step == "prepare":
        cmd_prepare(spec, checkout)
    elif args.step == "attack":
        cmd_attack(spec, checkout, args.record)
    elif args.step == "pending":
        for rid in all_runs(spec, args.record, args.defense, args.seed):
            if not run_json(checkout, rid).is_file():
                print(rid)
    elif args.step == "run":
        if not args.id:
            raise SystemExit("run needs --id <record>/<defense>/<seed>/<side> (see the pending step)")
        for text in args.id:
            cmd_run(spec, checkout, RunId.parse(text))
    elif args.step == "metric":
        cmd_metric(spec, checkout)
    elif args.step == "noise":
        cmd_noise(spec, checkout, first_record)
    elif args.step == "compat":
        cmd_compat(spec, checkout, first_record, args.script, args.gic)
    else:
        cmd_report(spec, checkout, args.out, args.spec.stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
