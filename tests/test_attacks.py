"""Our attacks: trigger pixels against hand computations, poisoned-set counts and labels, and short training runs
that must write BackdoorBench records our own loader reads back exactly."""
import numpy as np
import pandas as pd
import pytest
import torch

from backdoorbench_gic.attacks import (BadNet, Blended, InfeasiblePoisonRatio, Prototype, RecordExistsError,
                                       Sig, WaNet, build_attack, load_attack, run_attack)
from backdoorbench_gic.attacks import runner as attack_runner
from backdoorbench_gic.attacks.triggers import (add_signal, apply_patch, badnet_mask, blend, cross_grids,
                                                default_blend_pattern, sig_pattern, wanet_grid, wanet_noise_grid,
                                                warp, warp_uint8)
from backdoorbench_gic.config import ConfigError
from backdoorbench_gic.data.datasets import open_dataset
from backdoorbench_gic.data.imageset import ImageSet
from backdoorbench_gic.data.transforms import nhwc_to_nchw
from backdoorbench_gic.evaluation import evaluate
from backdoorbench_gic.models import build_model
from backdoorbench_gic.records import inspect_record, load_attack_record
from backdoorbench_gic.registry import ATTACKS
from backdoorbench_gic.testing import class_images, make_mnist_like, write_image_folder

FAST = dict(dataset="fashion-mnist", width=8, epochs=1, batch_size=64, device="cpu")


def tiny_set(n: int, seed: int = 0) -> ImageSet:
    x, y = class_images(n, 10, 28, 28, 1, seed)
    return ImageSet(nhwc_to_nchw(x), y)


@pytest.fixture(scope="module")
def fm_root(tmp_path_factory):
    """A BackdoorBench root whose data/fashion-mnist holds 200 train / 100 test generated images."""
    root = tmp_path_factory.mktemp("attack_root")
    make_mnist_like(root / "data" / "fashion-mnist", n_train=200, n_test=100)
    return root


@pytest.fixture(scope="module")
def badnet_run(fm_root):
    return run_attack({"attack": "badnet", "save_folder_name": "badnet_run", **FAST}, bb_root=fm_root, progress=False)


# ---------------------------------------------------------------------------------------------------------
# triggers, checked pixel by pixel
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,first", [(32, 29), (28, 25), (16, 14)])
def test_badnet_square_is_bottom_right_and_white(size, first):
    mask = badnet_mask(size, size, 3)
    expected = torch.zeros(3, size, size, dtype=torch.uint8)
    expected[:, first:, first:] = 255
    assert torch.equal(mask, expected)
    img = torch.randint(0, 200, (2, 3, size, size), dtype=torch.uint8)
    out = apply_patch(img, mask)
    assert (out[:, :, first:, first:] == 255).all()
    assert torch.equal(out[:, :, :first, :], img[:, :, :first, :])
    assert torch.equal(out[:, :, :, :first], img[:, :, :, :first])


def test_blended_alpha_arithmetic():
    x = torch.tensor([100, 0, 3, 255], dtype=torch.uint8).view(1, 1, 2, 2)
    t = torch.tensor([200, 255, 0, 0], dtype=torch.uint8).view(1, 2, 2)
    # 0.8*100 + 0.2*200 = 120; 0.2*255 = 51; 0.8*3 = 2.4 -> 2; 0.8*255 = 204
    assert blend(x, t, 0.2).flatten().tolist() == [120, 51, 2, 204]
    p = default_blend_pattern(28, 28, 1)
    assert p.shape == (1, 28, 28) and p.dtype == torch.uint8 and int(p.min()) == 0 and int(p.max()) == 255
    assert torch.equal(p, default_blend_pattern(28, 28, 1))
    assert not torch.equal(p, default_blend_pattern(28, 28, 1, seed=1))


def test_sig_formula_at_chosen_pixels():
    pattern = sig_pattern(28, 28, delta=40, f=6)
    img = torch.full((1, 1, 28, 28), 100, dtype=torch.uint8)
    img[0, 0, 5, 1] = 250
    img[0, 0, 6, 4] = 10
    out = add_signal(img, pattern)
    assert int(out[0, 0, 3, 2]) == 117  # 100 + 40 sin(2 pi 2 6 / 28) = 117.36
    assert int(out[0, 0, 9, 0]) == 100  # sin(0) = 0
    assert int(out[0, 0, 9, 7]) == 100  # sin(3 pi) = 0
    assert int(out[0, 0, 5, 1]) == 255  # 250 + 39.0, clipped
    assert int(out[0, 0, 6, 4]) == 0  # 10 - 31.3, clipped
    assert torch.equal(out[0, 0, 0], out[0, 0, 20])  # horizontal: the same on every row


def test_wanet_warp_grid():
    g = torch.Generator().manual_seed(0)
    noise = wanet_noise_grid(28, 28, 4, g)
    assert noise.shape == (1, 28, 28, 2)
    x = torch.rand(3, 1, 28, 28)
    identity = wanet_grid(noise, s=0.0)  # s = 0: the identity, up to float rounding of the grid
    assert torch.allclose(warp(x, identity), x, atol=1e-5)
    imgs = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(warp_uint8(imgs, identity), imgs)
    grid = wanet_grid(noise, s=0.5)
    assert not torch.allclose(warp(x, grid), x, atol=1e-3)
    cross = cross_grids(grid, 5, g)
    assert cross.shape == (5, 28, 28, 2) and (cross - grid).abs().max() <= 1 / 28 + 1e-6
    assert warp_uint8(imgs, grid).dtype == torch.uint8 and not torch.equal(warp_uint8(imgs, grid), imgs)


# ---------------------------------------------------------------------------------------------------------
# poisoned sets: counts, classes and labels
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,pratio", [(BadNet, 0.1), (Blended, 0.25)])
def test_badnet_family_poisons_round_pratio_n_from_all_classes(cls, pratio):
    train, test = tiny_set(100), tiny_set(50, seed=1)
    attack = cls(dataset="fashion-mnist", pratio=pratio, attack_target=3)
    attack.setup()
    view, split = attack.poison_train(train)
    idx = np.flatnonzero(view.poison.numpy())
    assert len(idx) == len(split.images) == round(pratio * 100)
    assert sorted(split.images) == idx.tolist()
    assert (view.labels[idx] == 3).all() and all(b == 3 for b, _ in split.labels.values())
    assert len(set(train.labels[idx].tolist())) > 2  # drawn from all classes, not just one
    assert all(o == int(train.labels[i]) for i, (_, o) in split.labels.items())
    clean = np.flatnonzero(view.poison.numpy() == 0)
    assert torch.equal(view.images[clean], train.images[clean]) and torch.equal(view.labels[clean], train.labels[clean])
    assert not torch.equal(view.images[idx], train.images[idx])
    bd_view, bd_split = attack.poison_test(test)
    assert bd_split.original_index_array.tolist() == np.flatnonzero(test.labels.numpy() != 3).tolist()
    assert (bd_view.labels == 3).all() and (bd_view.original_labels != 3).all() and (bd_view.poison == 1).all()


def test_sig_is_clean_label_from_the_target_class_only():
    train = tiny_set(100)  # 10 images per class
    attack = Sig(dataset="fashion-mnist", pratio=0.1, attack_target=2)  # setup() runs on first use
    view, split = attack.poison_train(train)
    idx = np.flatnonzero(view.poison.numpy())
    assert len(idx) == 10 and (train.labels[idx] == 2).all()
    assert torch.equal(view.labels, train.labels)  # clean-label: no label changes
    assert all(b == o == 2 for b, o in split.labels.values())
    diff = view.images[idx].int() - train.images[idx].int()
    assert diff.abs().max() > 0


def test_sig_impossible_ratio_says_by_how_much():
    attack = Sig(dataset="fashion-mnist", pratio=0.15, attack_target=2)
    with pytest.raises(InfeasiblePoisonRatio) as err:
        attack.poison_train(tiny_set(100))
    msg = str(err.value)
    assert "15" in msg and "only 10" in msg and "5 too many" in msg and "largest feasible pratio is 0.1" in msg


def test_wanet_bd_train_has_three_pratio_entries_and_cross_keep_labels():
    train = tiny_set(100)
    attack = WaNet(dataset="fashion-mnist", pratio=0.1, attack_target=0)
    attack.setup()
    split = attack.materialize_bd_train(train)
    assert len(split.images) == 30 and split.split_size == 100
    flipped = {i for i, (b, o) in split.labels.items() if b != o}
    kept = {i for i, (b, o) in split.labels.items() if b == o}
    bd = set(attack.select_train_indices(train.labels).tolist())
    assert all(split.labels[i][0] == 0 for i in bd)  # the backdoor part is relabelled to the target
    assert flipped <= bd and len(kept - bd) == 20  # 2 x pratio cross samples, labels kept
    assert all(int(train.labels[i]) == o for i, (_, o) in split.labels.items())
    batch = next(iter(train.batches(20)))
    out = attack.batch_hook(torch.Generator().manual_seed(0))(batch)
    assert out.x.shape == batch.x.shape and out.poison.tolist() == [1] * 6 + [0] * 14
    assert (out.y[:2] == 0).all() and torch.equal(out.y[2:], batch.y[2:])


@pytest.mark.parametrize("cls", [BadNet, WaNet])
def test_all2all_labels(cls):
    train, test = tiny_set(100), tiny_set(50, seed=1)
    attack = cls(dataset="fashion-mnist", attack_label_trans="all2all", attack_label_shift_amount=3)
    attack.setup()
    split = attack.poison_train(train)[1] or attack.materialize_bd_train(train)
    flipped = [(b, o) for b, o in split.labels.values() if b != o]
    assert len(flipped) == 10 and all(b == (o + 3) % 10 for b, o in flipped)
    bd_view, bd_split = attack.poison_test(test)
    assert bd_split.original_index_array.tolist() == list(range(50))
    assert torch.equal(bd_view.labels, (test.labels + 3) % 10)


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="attack_target"):
        BadNet(dataset="fashion-mnist", attack_target=10)
    with pytest.raises(ConfigError, match="attack_label_shift_amount"):
        BadNet(dataset="fashion-mnist", attack_label_trans="all2all", attack_label_shift_amount=10)
    with pytest.raises(ConfigError, match="attack_label_trans"):
        Sig(dataset="fashion-mnist", attack_label_trans="all2all")
    with pytest.raises(ConfigError, match="pratio"):
        WaNet(dataset="fashion-mnist", pratio=0.4)
    with pytest.raises(ConfigError, match="model"):
        BadNet(dataset="fashion-mnist", model="no_such_net")
    with pytest.raises(ConfigError, match="save_folder_name"):
        BadNet(dataset="fashion-mnist", save_folder_name="../escape")
    assert set(ATTACKS.names()) >= {"badnet", "blended", "sig", "wanet", "prototype"}
    assert isinstance(build_attack("clean", dataset="digits"), Prototype)


# ---------------------------------------------------------------------------------------------------------
# training runs and the records they write
# ---------------------------------------------------------------------------------------------------------
def test_record_round_trip_and_exact_metrics(fm_root, badnet_run):
    d = badnet_run
    names = {p.name for p in d.iterdir()}
    assert {"attack_result.pt", "info.pickle", "train_poison_index_list.pickle", "attack_df.csv",
            "attack_df_summary.csv", "acc_like_metric_plots.png", "loss_metric_plots.png",
            "bd_train_dataset", "bd_test_dataset"} <= names
    assert any(n.endswith(".log") and len(n) == len("2025_01_01_00_00_00.log") for n in names)
    files = [p for p in d.iterdir() if p.is_file() and p.suffix != ".log"]  # the log gets a last line after it
    assert max(p.stat().st_mtime_ns for p in files) == (d / "attack_result.pt").stat().st_mtime_ns  # written last

    info = torch.load(d / "info.pickle", weights_only=True)
    assert info["attack"] == "badnet" and info["pratio"] == 0.1 and info["num_classes"] == 10
    assert info["data_path"] == "./data/fashion-mnist" and "reserved_type" not in info  # no defense-only keys
    indicator = torch.load(d / "train_poison_index_list.pickle", weights_only=False)
    assert indicator.dtype == np.float64 and indicator.shape == (200,) and indicator.sum() == 20

    rec = load_attack_record("badnet_run", fm_root)
    assert rec.clean_data == "fashion-mnist" and rec.data_path == "./data/fashion-mnist" and rec.img_size == (28, 28, 1)
    assert np.array_equal(rec.bd_train_state.poison_indicator, indicator)
    attack = BadNet(dataset="fashion-mnist")
    assert rec.bd_train_state.poisoned_indices.tolist() == attack.select_train_indices(rec.clean_train.labels).tolist()
    assert all(b == 0 and o == int(rec.clean_train.labels[i]) for i, (_, b, o) in rec.bd_train_state.entries.items())
    assert (rec.bd_train.labels[rec.bd_train.poison == 1] == 0).all()
    assert (rec.bd_test.labels == 0).all() and len(rec.bd_test) == int((rec.clean_test.labels != 0).sum())

    df = pd.read_csv(d / "attack_df.csv", index_col=0)
    assert list(df.columns) == list(attack_runner.ATTACK_COLUMNS) and len(df) == 1
    report = inspect_record(d, fm_root, evaluate=True)
    assert report.valid, report.render()
    summary = pd.read_csv(d / "attack_df_summary.csv", index_col=0)
    assert list(summary.index) == ["last", "valid_max", "exist_nan_value"]
    m = evaluate(rec.build_model(), rec.clean_test, rec.bd_test, batch_size=512)  # bit-exact, not just close
    assert (m.acc, m.asr, m.ra) == tuple(summary.loc["last", ["test_acc", "test_asr", "test_ra"]])


def test_same_seed_same_poison_and_weights(fm_root, badnet_run):
    again = run_attack({"attack": "badnet", "save_folder_name": "badnet_again", **FAST}, bb_root=fm_root,
                       progress=False)
    a = torch.load(badnet_run / "attack_result.pt", weights_only=False)
    b = torch.load(again / "attack_result.pt", weights_only=False)
    assert np.array_equal(a["bd_train"]["poison_indicator"], b["bd_train"]["poison_indicator"])
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    other = BadNet(dataset="fashion-mnist", random_seed=1).select_train_indices(torch.zeros(200, dtype=torch.long))
    assert other.tolist() != np.flatnonzero(a["bd_train"]["poison_indicator"]).tolist()


def test_refuses_to_overwrite_and_a_failed_run_never_looks_complete(fm_root, badnet_run, monkeypatch):
    with pytest.raises(RecordExistsError, match="--overwrite"):
        run_attack({"attack": "badnet", "save_folder_name": "badnet_run", **FAST}, bb_root=fm_root)
    stale = fm_root / "record" / "stale_run"
    (stale / "bd_train_dataset" / "0").mkdir(parents=True)
    (stale / "bd_train_dataset" / "0" / "7.png").write_bytes(b"old")
    (stale / "attack_result.pt").write_bytes(b"a finished run of before")

    def killed(*args, **kwargs):
        raise RuntimeError("killed mid-epoch")

    monkeypatch.setattr(attack_runner, "train_epoch", killed)
    with pytest.raises(RuntimeError, match="killed"):
        run_attack({"attack": "badnet", "save_folder_name": "stale_run", **FAST}, bb_root=fm_root, overwrite=True)
    # the old result went first, so the interrupted folder does not look finished, and holds no stale images
    assert not (stale / "attack_result.pt").exists() and not (stale / "bd_train_dataset").exists()
    assert any(p.suffix == ".log" for p in stale.iterdir())


def test_prototype_writes_a_loadable_clean_model(fm_root):
    d = run_attack({"attack": "clean", "save_folder_name": "proto", **FAST}, bb_root=fm_root, progress=False)
    assert not (d / "attack_result.pt").exists()
    state = torch.load(d / "clean_model.pth", weights_only=True)
    build_model("preactresnet18", 10, width=8, in_channels=1).load_state_dict(state, strict=True)
    df = pd.read_csv(d / "attack_df.csv", index_col=0)
    assert list(df.columns) == list(attack_runner.CLEAN_COLUMNS)
    with pytest.raises(RecordExistsError, match="clean_model.pth"):
        run_attack({"attack": "clean", "save_folder_name": "proto", **FAST}, bb_root=fm_root)


def test_wanet_run_writes_materialised_bd_train_and_cross_test(fm_root):
    d = run_attack({"attack": "wanet", "save_folder_name": "wanet_run", **FAST}, bb_root=fm_root, progress=False)
    rec = load_attack_record(d, fm_root)
    entries = rec.bd_train_state.entries
    assert len(entries) == 60 and rec.bd_train_state.poison_indicator.sum() == 60  # 3 x pratio x N
    bd = set(WaNet(dataset="fashion-mnist").select_train_indices(rec.clean_train.labels).tolist())
    assert all(entries[i][1] == 0 for i in bd)  # the 20 backdoor samples carry the target
    cross = [(b, o) for i, (_, b, o) in entries.items() if i not in bd]
    assert len(cross) == 40 and all(b == o for b, o in cross)  # the cross samples keep their label
    assert sum(1 for _ in (d / "cross_test_dataset").rglob("*.png")) == 100
    assert not (d / "train_poison_index_list.pickle").exists()
    assert inspect_record(d, fm_root, evaluate=True).valid


def test_split_dataset_records_the_split(fm_root):
    split = fm_root / "data" / "fashion-mnist_split_5_seed_0"
    for part, n, seed in (("train", 60, 0), ("reserved", 10, 5), ("test", 30, 1)):
        x, y = class_images(n, 10, 28, 28, 1, seed)
        write_image_folder(split / part, x, y)
    d = run_attack({"attack": "blended", "save_folder_name": "split_run", **FAST,
                    "dataset": "fashion-mnist_split_5_seed_0"}, bb_root=fm_root, progress=False)
    raw = torch.load(d / "attack_result.pt", weights_only=False)
    assert raw["clean_data"] == "fashion-mnist_split_5_seed_0"
    assert raw["data_path"] == "./data/fashion-mnist_split_5_seed_0"
    assert len(raw["bd_train"]["poison_indicator"]) == 60  # trained on train/ only; reserved/ stays unseen
    assert inspect_record(d, fm_root, evaluate=True).valid


def test_heldout_sets_poison_the_reserved_part_with_the_records_own_trigger(fm_root):
    from backdoorbench_gic.attacks.runner import attack_of_record
    from backdoorbench_gic.evaluation import heldout_sets

    split = fm_root / "data" / "fashion-mnist_split_5_seed_0"
    if not split.is_dir():
        for part, n, seed in (("train", 60, 0), ("reserved", 10, 5), ("test", 30, 1)):
            x, y = class_images(n, 10, 28, 28, 1, seed)
            write_image_folder(split / part, x, y)
    d = run_attack({"attack": "blended", "save_folder_name": "heldout_run", **FAST,
                    "dataset": "fashion-mnist_split_5_seed_0", "blend_pattern_seed": 7}, bb_root=fm_root,
                   progress=False)
    record = load_attack_record(d, fm_root)
    attack = attack_of_record(record)
    assert attack.name == "blended" and attack.config.blend_pattern_seed == 7
    # the rebuilt attack poisons the test images exactly as the record's stored bd_test
    remade, _ = attack.poison_test(record.clean_test)
    assert torch.equal(remade.images, record.bd_test.images) and torch.equal(remade.labels, record.bd_test.labels)
    clean, bd = heldout_sets(record, exclude=[0, 3])
    reserved = record.dataset().split("reserved")
    assert len(clean) == len(reserved) - 2 and torch.equal(clean.images[0], reserved.images[1])
    assert len(bd) == int((clean.labels != 0).sum()) and bool((bd.labels == 0).all())
    with pytest.raises(ValueError, match="no reserved part"):
        heldout_sets(load_attack_record(run_attack({"attack": "badnet", "save_folder_name": "plain_run", **FAST},
                                                   bb_root=fm_root, progress=False), fm_root))


# ---------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------
def test_cli_precedence_and_unknown_yaml_key(tmp_path):
    from backdoorbench_gic.cli import build_parser
    from backdoorbench_gic.commands.attack import cli_values

    proto = tmp_path / "proto.yaml"
    proto.write_text("epochs: 7\npratio: 0.2\nlr: 0.05\nnum_workers: 4\n")
    bd = tmp_path / "bd.yaml"
    bd.write_text("attack: sig\npratio: 0.05\nsig_delta: 20\n")
    args = build_parser("attack").parse_args(["attack", "--yaml_path", str(proto), "--bd_yaml_path", str(bd),
                                      "--dataset", "fashion-mnist", "--lr", "0.1"])
    attack = load_attack(args.attack, args.yaml_path, args.bd_yaml_path, cli_values(args))
    cfg = attack.config
    assert isinstance(attack, Sig) and cfg.epochs == 7 and cfg.pratio == 0.05 and cfg.sig_delta == 20 and cfg.lr == 0.1
    assert cfg.batch_size == 128 and cfg.bd_yaml_path == str(bd)  # untouched default; the yaml path is recorded
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 1\nsig_delta: 20\n")
    with pytest.raises(ConfigError, match=r"unknown key 'sig_delta' in .*bad\.yaml"):
        load_attack("badnet", bad, None, {"dataset": "fashion-mnist"})
    with pytest.raises(ConfigError, match="no attack named"):
        load_attack(None, None, None, {"dataset": "fashion-mnist"})


def test_cli_runs_an_attack_on_digits(tmp_path, capsys):
    from backdoorbench_gic.cli import main

    code = main(["attack", "--attack", "badnet", "--dataset", "digits", "--model", "smallcnn", "--width", "8",
                 "--epochs", "1", "--save_folder_name", "digits_badnet", "--bb_root", str(tmp_path), "--device", "cpu",
                 "--pratio", "0.1", "--attack_target", "1"])
    assert code == 0
    d = tmp_path / "record" / "digits_badnet"
    assert capsys.readouterr().out.strip() == str(d)
    rec = load_attack_record(d, tmp_path)
    assert rec.img_size == (16, 16, 1) and rec.targets == [1] and rec.model_name == "smallcnn"
    assert len(rec.bd_train_state.entries) == round(0.1 * len(open_dataset("digits").train))
    # a second run without --overwrite is refused with exit code 2
    assert main(["attack", "--attack", "badnet", "--dataset", "digits", "--save_folder_name", "digits_badnet",
                 "--bb_root", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
