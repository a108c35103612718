import pytest
import torch

from backdoorbench_gic.data.imageset import ImageSet
from backdoorbench_gic.evaluation import compare, der, evaluate, purification_success, rir


class LookupModel(torch.nn.Module):
    """Predicts the class stored in pixel (0, 0, 0) * 10: lets tests fix every prediction by hand."""

    def forward(self, x):
        cls = (x[:, 0, 0, 0] * 10).round().long()
        return torch.nn.functional.one_hot(cls, 10).float() * 5


def _set(preds, labels, originals=None):
    imgs = torch.zeros(len(preds), 1, 2, 2)
    imgs[:, 0, 0, 0] = torch.tensor(preds, dtype=torch.float32) / 10
    return ImageSet(imgs, labels, originals)


def test_metrics_against_hand_computation():
    clean = _set([1, 2, 3, 4, 0], [1, 2, 0, 4, 0])  # 4 of 5 correct
    # bd_test: poisoned label 0; originals 1..4; predictions: 0, 0, 0, 2 -> ASR 3/4, RA 0/4 ... and one RA hit
    bd = _set([0, 0, 0, 4], [0, 0, 0, 0], [1, 2, 3, 4])
    m = evaluate(LookupModel(), clean, bd, batch_size=2)
    assert m.acc == pytest.approx(0.8) and m.asr == pytest.approx(0.75) and m.ra == pytest.approx(0.25)
    assert m.n_clean == 5 and m.n_bd == 4


def test_asr_excludes_samples_whose_poisoned_label_equals_the_true_one():
    bd = _set([0, 0, 3], [0, 0, 0], [0, 1, 2])  # the first is a target-class sample: not counted
    m = evaluate(LookupModel(), _set([0], [0]), bd)
    assert m.n_bd == 2 and m.asr == pytest.approx(0.5) and m.ra == pytest.approx(0.0)


def test_der_and_rir_signs():
    # ASR 0.95 -> 0.05, ACC 0.90 -> 0.88: DER = (0.90 - 0.02 + 1) / 2 = 0.94
    assert der(0.90, 0.95, 0.88, 0.05) == pytest.approx(0.94)
    # accuracy *gain* is not rewarded, ASR *rise* is not penalised beyond 0.5
    assert der(0.90, 0.50, 0.95, 0.60) == pytest.approx(0.5)
    # RA 0.04 -> 0.80 with ACC drop 0.10: RIR = (0.76 - 0.10 + 1) / 2 = 0.83
    assert rir(0.90, 0.04, 0.80, 0.80) == pytest.approx(0.83)
    assert rir(0.90, 0.50, 0.90, 0.40) == pytest.approx(0.5)


def test_success_definition_and_compare():
    assert purification_success(0.90, 0.86, 0.10)
    assert not purification_success(0.90, 0.84, 0.01)
    assert not purification_success(0.90, 0.90, 0.11)
    from backdoorbench_gic.evaluation import Metrics

    row = compare(Metrics(0.9, 1.0, 0.0), Metrics(0.88, 0.02, 0.85))
    assert row["der"] == pytest.approx((0.98 - 0.02 + 1) / 2) and row["success"] == 1.0


def test_evaluate_restores_training_mode():
    model = LookupModel().train()
    evaluate(model, _set([1], [1]), None)
    assert model.training
