"""`dpo_loss` and `reward_metrics` against the formulas of docs/dpo.md, written out by hand with `math`."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_pref_trainers.losses import dpo_loss, reward_metrics

# Per-sample denoising errors of three pairs: policy winner/loser, reference winner/loser.
MODEL_W = [0.10, 0.30, 0.25]
MODEL_L = [0.20, 0.15, 0.40]
REF_W = [0.12, 0.28, 0.45]
REF_L = [0.18, 0.20, 0.35]
BETA = 10.0


def _tensors() -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(values, dtype=torch.float64) for values in (MODEL_W, MODEL_L, REF_W, REF_L))


def _logits() -> list[float]:
    """`(r_w - m_w) - (r_l - m_l)` per pair, by hand."""
    return [(rw - mw) - (rl - ml) for mw, ml, rw, rl in zip(MODEL_W, MODEL_L, REF_W, REF_L, strict=True)]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _expected(loss_type: str, beta: float, eps: float = 0.0) -> float:
    """The mean over pairs of the per-pair loss of docs/dpo.md ("The loss")."""
    values = []
    for logit in _logits():
        z = beta / 2 * logit
        if loss_type == "sigmoid":  # conservative DPO when eps > 0
            values.append(-(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z))
        elif loss_type == "robust":  # TRL's robust DPO
            values.append((-(1 - eps) * _log_sigmoid(z) + eps * _log_sigmoid(-z)) / (1 - 2 * eps))
        elif loss_type == "hinge":
            values.append(max(0.0, 1.0 - z))
        elif loss_type == "ipo":
            values.append((logit - 1 / (2 * beta)) ** 2)
    return sum(values) / len(values)


def test_logits_mix_signs_so_every_branch_is_exercised() -> None:
    logits = _logits()
    assert any(x > 0 for x in logits) and any(x < 0 for x in logits)
    # hinge: one pair beyond the margin (loss 0) and one inside it.
    assert any(BETA / 2 * x >= 1 for x in logits) and any(BETA / 2 * x < 1 for x in logits)


@pytest.mark.parametrize(
    "loss_type,eps",
    [("sigmoid", 0.0), ("sigmoid", 0.3), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.0), ("robust", 0.2)],
)
def test_dpo_loss_matches_the_hand_computation(loss_type, eps) -> None:
    loss = dpo_loss(*_tensors(), beta=BETA, loss_type=loss_type, label_smoothing=eps)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(_expected(loss_type, BETA, eps), rel=1e-12)


def test_robust_dpo_by_hand_for_one_pair() -> None:
    # logit 0.2, beta 10: z = 1; eps 0.25: (-(0.75) log s(1) + 0.25 log s(-1)) / 0.5.
    one = torch.tensor([0.0], dtype=torch.float64)
    loss = dpo_loss(one, one + 0.2, one, one, beta=10.0, loss_type="robust", label_smoothing=0.25)
    expected = (0.75 * math.log1p(math.exp(-1.0)) - 0.25 * math.log1p(math.exp(1.0))) / 0.5
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_robust_dpo_is_unbiased_under_label_flips_where_conservative_dpo_is_not() -> None:
    # Flipping a pair with probability eps turns its logits to -l; robust DPO's expectation is the clean loss.
    eps, model_w, model_l, ref_w, ref_l = 0.2, *_tensors()

    def flip_mean(loss_type: str) -> float:
        kept = dpo_loss(model_w, model_l, ref_w, ref_l, beta=BETA, loss_type=loss_type, label_smoothing=eps)
        flipped = dpo_loss(model_l, model_w, ref_l, ref_w, beta=BETA, loss_type=loss_type, label_smoothing=eps)
        return ((1 - eps) * kept + eps * flipped).item()

    assert flip_mean("robust") == pytest.approx(_expected("sigmoid", BETA), rel=1e-12)
    assert flip_mean("sigmoid") != pytest.approx(_expected("sigmoid", BETA), rel=1e-3)


def test_ipo_target_is_trls_with_beta_as_tau() -> None:
    # TRL: (delta - 1/(2 beta))^2, no 1/2 on beta. beta 10: target 0.05; a logit of 0.05 costs 0, of 0.25 costs 0.04.
    zero = torch.tensor([0.0, 0.0], dtype=torch.float64)
    loss = dpo_loss(zero, torch.tensor([0.05, 0.25], dtype=torch.float64), zero, zero, beta=10.0, loss_type="ipo")
    assert loss.item() == pytest.approx((0.0 + 0.04) / 2, rel=1e-12)


def test_sigmoid_loss_at_equal_rewards_is_log_2() -> None:
    errors = torch.tensor([0.5, 0.7])
    assert dpo_loss(errors, errors, errors, errors, beta=5000.0).item() == pytest.approx(math.log(2), rel=1e-6)


def test_gradient_lowers_the_winner_error_and_raises_the_loser_error() -> None:
    model_w, model_l, ref_w, ref_l = (t.clone().requires_grad_(i < 2) for i, t in enumerate(_tensors()))
    dpo_loss(model_w, model_l, ref_w, ref_l, beta=BETA).backward()
    # d/dm_w of log(1 + exp(-beta/2 * l)) with dl/dm_w = -1: (beta/2) * sigmoid(-beta/2 * l) / M.
    expected = [BETA / 2 / (1 + math.exp(BETA / 2 * x)) / len(MODEL_W) for x in _logits()]
    assert model_w.grad.tolist() == pytest.approx(expected, rel=1e-12)
    assert model_l.grad.tolist() == pytest.approx([-g for g in expected], rel=1e-12)


def test_large_beta_stays_finite() -> None:
    # With beta 5000 (the SD default) a logit of -1 is a sigmoid argument of -2500: exp() would overflow.
    model_w, model_l, ref_w, ref_l = (torch.tensor([x]) for x in (1.0, 0.0, 0.0, 0.0))
    loss = dpo_loss(model_w, model_l, ref_w, ref_l, beta=5000.0)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(2500.0, rel=1e-6)  # -log sigmoid(-z) -> z for large z


def test_unknown_loss_type_names_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo, robust"):
        dpo_loss(*_tensors(), beta=BETA, loss_type="squared")


def test_reward_metrics_match_the_hand_computation() -> None:
    metrics = reward_metrics(*_tensors(), beta=BETA)
    chosen = [rw - mw for mw, rw in zip(MODEL_W, REF_W, strict=True)]
    rejected = [rl - ml for ml, rl in zip(MODEL_L, REF_L, strict=True)]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    expected = {
        "rewards/chosen": BETA / 2 * mean(chosen),  # the beta/2 convention of the loss
        "rewards/rejected": BETA / 2 * mean(rejected),
        "rewards/accuracies": mean([float(c > r) for c, r in zip(chosen, rejected, strict=True)]),
        "rewards/margins": BETA / 2 * mean([c - r for c, r in zip(chosen, rejected, strict=True)]),
        "errors/chosen_diff": mean(chosen),
        "errors/rejected_diff": mean(rejected),
        "model_loss/chosen": mean(MODEL_W),
        "model_loss/rejected": mean(MODEL_L),
        "ref_loss/chosen": mean(REF_W),
        "ref_loss/rejected": mean(REF_L),
    }
    assert set(expected) <= set(metrics)
    for key, value in expected.items():
        assert metrics[key].shape == ()
        # accuracies go through float32 (`.float().mean()`); the rest keep the inputs' float64.
        assert metrics[key].item() == pytest.approx(value, rel=1e-7, abs=1e-15), key
    assert 0.0 < expected["rewards/accuracies"] < 1.0  # the fixture ranks some pairs right and some wrong


def test_sigmoid_loss_is_minus_log_sigmoid_of_the_logged_margin_for_one_pair() -> None:
    # TRL's reading: the sigmoid loss of a pair is -log sigmoid(rewards/margins).
    for pair in range(len(MODEL_W)):
        one = tuple(t[pair : pair + 1] for t in _tensors())
        margin = reward_metrics(*one, beta=BETA)["rewards/margins"].item()
        assert dpo_loss(*one, beta=BETA).item() == pytest.approx(-_log_sigmoid(margin), rel=1e-12)


def test_reward_metrics_are_detached() -> None:
    model_w, model_l, ref_w, ref_l = (t.clone().requires_grad_(i < 2) for i, t in enumerate(_tensors()))
    assert not any(value.requires_grad for value in reward_metrics(model_w, model_l, ref_w, ref_l, beta=BETA).values())
