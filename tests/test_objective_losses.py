"""KTO, MaPO, SFT, the SDPO safeguard and RPO's loss types against hand computations with Python floats."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_pref_trainers.losses import (
    dpo_loss,
    kto_loss,
    kto_metrics,
    kto_pair_accuracy,
    mapo_log_odds,
    mapo_loss,
    mapo_metrics,
    rpo_loss,
    safeguard_scale,
    safeguarded_errors,
    sft_loss,
    with_sft_term,
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _rand(n: int, seed: int, low: float = 0.5) -> torch.Tensor:
    return (torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + low).double()


# ------------------------------------------------------------------------------------------------ KTO
def _hand_kto(model, ref, desirable, beta, w_d, w_u, kl=None) -> float:
    """docs/objectives.md, KTO: g = r - m, kl = max(mean g, 0), h = sigmoid(+-beta (g - kl)), loss = mean w (1 - h)."""
    g = [r - m for m, r in zip(model, ref, strict=True)]
    if kl is None:
        kl = max(sum(g) / len(g), 0.0)
    total = 0.0
    for g_k, good in zip(g, desirable, strict=True):
        sign, weight = (1.0, w_d) if good else (-1.0, w_u)
        total += weight * (1.0 - _sigmoid(beta * sign * (g_k - kl)))
    return total / len(g)


@pytest.mark.parametrize("shift", [-2e-3, 2e-3], ids=["kl-clamped-to-0", "kl-positive"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_kto_loss_matches_hand_computation(shift, weights) -> None:
    ref = _rand(6, 0)
    model = ref - shift + 1e-3 * torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    desirable = torch.tensor([True, False, True, True, False, False])
    got = kto_loss(model, ref, desirable, beta=1000.0, desirable_weight=weights[0], undesirable_weight=weights[1])
    expected = _hand_kto(model.tolist(), ref.tolist(), desirable.tolist(), 1000.0, *weights)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    kl = max(float((ref - model).mean()), 0.0)
    assert (kl == 0.0) == (shift < 0)  # both branches of the clamp are exercised


def test_kto_loss_with_a_given_reference_point() -> None:
    ref, model = _rand(4, 2), _rand(4, 3)
    desirable = torch.tensor([True, True, False, False])
    got = kto_loss(model, ref, desirable, beta=5.0, kl=torch.tensor(0.01, dtype=torch.float64))
    assert got.item() == pytest.approx(_hand_kto(model.tolist(), ref.tolist(), desirable.tolist(), 5.0, 1, 1, 0.01))


def test_kto_reference_point_carries_no_gradient() -> None:
    beta, ref = 300.0, _rand(5, 4)
    model = (
        ref + 1e-3 * torch.randn(5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ).requires_grad_()
    desirable = torch.tensor([True, False, True, False, True])
    kto_loss(model, ref, desirable, beta=beta).backward()
    g = (ref - model.detach()).tolist()
    kl = max(sum(g) / 5, 0.0)
    for k, good in enumerate(desirable.tolist()):
        sign = 1.0 if good else -1.0
        z = beta * sign * (g[k] - kl)
        # d/dm_k [1 - sigmoid(beta * sign * (r_k - m_k - kl))] / K, with kl held constant.
        expected = _sigmoid(z) * (1 - _sigmoid(z)) * beta * sign / 5
        assert model.grad[k].item() == pytest.approx(expected, rel=1e-9)


def test_kto_metrics_split_by_label_and_mark_missing_labels_nan() -> None:
    model, ref = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.5, 2.0, 2.0])
    metrics = kto_metrics(model, ref, torch.tensor([True, True, False]), torch.tensor(0.1), beta=4.0)
    assert metrics["errors/chosen_diff"].item() == pytest.approx(0.25)  # mean of r - m over 0.5 and 0.0
    assert metrics["errors/rejected_diff"].item() == pytest.approx(-1.0)
    assert metrics["rewards/chosen"].item() == pytest.approx(4.0 * 0.25)  # beta * g, as in KTO's sigmoid
    assert metrics["rewards/rejected"].item() == pytest.approx(4.0 * -1.0)
    assert metrics["rewards/margins"].item() == pytest.approx(4.0 * 1.25)
    assert metrics["kl"].item() == pytest.approx(0.1)  # unscaled, as TRL logs it
    only_desirable = kto_metrics(model, ref, torch.tensor([True, True, True]), torch.tensor(0.0), beta=4.0)
    assert math.isnan(only_desirable["rewards/rejected"].item())


def test_kto_pair_accuracy_compares_each_winner_with_its_own_loser() -> None:
    # image-major: winners (m 1, 2, 3) then losers (m 2, 1, 3), references all 2.
    # g = r - m: winners 1, 0, -1; losers 0, 1, -1. Pair 0: 1 > 0 yes; pair 1: 0 > 1 no; pair 2: -1 > -1 no.
    model, ref = torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0, 3.0]), torch.full((6,), 2.0)
    assert kto_pair_accuracy(model, ref, paired=True).item() == pytest.approx(1 / 3)
    assert math.isnan(kto_pair_accuracy(model, ref, paired=False).item())  # single images have no partner


# ----------------------------------------------------------------------------------------------- MaPO
def _hand_f(m: float, c: float) -> float:
    return c * m / (math.exp(c * m) - 1.0)


@pytest.mark.parametrize("beta,temperature,c", [(0.1, 1000.0, 0.5), (0.5, 10.0, 1.0)])
def test_mapo_loss_matches_hand_computation(beta, temperature, c) -> None:
    model_w, model_l = _rand(5, 6, low=0.1), _rand(5, 7, low=0.1)
    got = mapo_loss(model_w, model_l, beta=beta, margin_temperature=temperature, log_odds_scale=c)
    w, lose = model_w.tolist(), model_l.tolist()
    margin = [math.log(_sigmoid(temperature * (_hand_f(a, c) - _hand_f(b, c)))) for a, b in zip(w, lose, strict=True)]
    assert got.item() == pytest.approx(sum(w) / 5 - beta * sum(margin) / 5, rel=1e-10)


def test_mapo_defaults_are_the_papers() -> None:
    model_w, model_l = _rand(3, 8), _rand(3, 9)
    explicit = mapo_loss(model_w, model_l, beta=0.1, margin_temperature=1000.0, log_odds_scale=0.5)
    assert mapo_loss(model_w, model_l).item() == explicit.item()


def test_mapo_log_odds_is_one_at_zero_with_finite_gradient() -> None:
    err = torch.tensor([0.0, 1e-3, 2.0], dtype=torch.float64, requires_grad=True)
    values = mapo_log_odds(err, 0.5)
    assert values[0].item() == 1.0
    assert values[1].item() == pytest.approx(_hand_f(1e-3, 0.5), rel=1e-12)
    assert values[2].item() == pytest.approx(_hand_f(2.0, 0.5), rel=1e-12)
    values.sum().backward()
    assert torch.isfinite(err.grad).all()
    assert (err.grad[1:] < 0).all()  # decreasing: a lower error means larger log-odds


def test_mapo_metrics_are_reference_free_margins() -> None:
    model_w, model_l = torch.tensor([0.1, 0.4], dtype=torch.float64), torch.tensor([0.3, 0.2], dtype=torch.float64)
    metrics = mapo_metrics(model_w, model_l, margin_temperature=1000.0, log_odds_scale=0.5)
    margins = [1000.0 * (_hand_f(a, 0.5) - _hand_f(b, 0.5)) for a, b in ((0.1, 0.3), (0.4, 0.2))]
    assert metrics["rewards/margins"].item() == pytest.approx(sum(margins) / 2, rel=1e-9)
    assert metrics["rewards/accuracies"].item() == 0.5  # the first pair's winner is denoised better, not the second's
    assert metrics["model_loss/chosen"].item() == pytest.approx(0.25)


# ------------------------------------------------------------------------------------------------ SFT
def test_sft_loss_is_the_mean_winner_error() -> None:
    model_w = torch.tensor([0.2, 0.4, 0.9])
    assert sft_loss(model_w).item() == pytest.approx(0.5)


def test_with_sft_term_adds_the_weighted_winner_error() -> None:
    loss, model_w = torch.tensor(0.7), torch.tensor([0.2, 0.4, 0.9], requires_grad=True)
    assert with_sft_term(loss, model_w, 0.5).item() == pytest.approx(0.7 + 0.5 * 0.5)  # mean(m_w) = 0.5
    assert with_sft_term(loss, model_w, 0.0) is loss  # off: the loss itself, no extra graph


# ------------------------------------------------------------------------------------ SDPO safeguard
@pytest.mark.parametrize(
    "grad_w,grad_l,mu,expected",
    [
        ([1.0, 0.0], [3.0, 0.0], 0.9, (1 - 0.9) * 1.0 / 3.0),  # aligned, loser larger: scaled down
        ([1.0, 0.0], [0.1, 0.0], 0.5, 1.0),  # aligned but small: the cap (5.0) is clipped to 1
        ([1.0, 0.0], [-2.0, 1.0], 0.9, 1.0),  # opposed: the loser's push cannot hurt the winner
        ([1.0, 0.0], [0.0, 1.0], 0.9, 1.0),  # orthogonal
    ],
)
def test_safeguard_scale_matches_hand_values(grad_w, grad_l, mu, expected) -> None:
    got = safeguard_scale(torch.tensor(grad_w), torch.tensor(grad_l), mu)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_safeguarded_errors_keep_values_and_scale_only_the_losers_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    target[2:] = target[:2] + 0.1  # losers' residuals aligned with the winners': lambda < 1
    errors = (outputs - target).pow(2).flatten(1).mean(1)
    guarded, scale = safeguarded_errors(errors, outputs, mu=0.9)
    assert torch.equal(guarded.detach(), errors.detach())
    residual = (outputs - target).detach()
    inner = (residual[:2] * residual[2:]).sum().item()
    assert inner > 0
    assert scale.item() == pytest.approx(min(1.0, 0.1 * residual[:2].pow(2).sum().item() / inner), rel=1e-6)
    assert scale.item() < 1
    plain = torch.autograd.grad(errors.sum(), outputs, retain_graph=True)[0]
    shaped = torch.autograd.grad(guarded.sum(), outputs)[0]
    assert torch.allclose(shaped[:2], plain[:2])
    assert torch.allclose(shaped[2:], scale.double() * plain[2:])


def _toy_step(safeguard: bool, mu: float = 0.9, lr: float = 1e-3) -> tuple[float, float, float]:
    """One DPO step on a toy whose outputs ARE the parameters, shared by a pair's two images (SDPO's setting).

    Returns the first-order and the actual change of the winners' mean error, and the winner-only reference
    `<grad mean(m_w), grad L>` with the losers' gradient removed (lambda = 0).
    """
    g = torch.Generator().manual_seed(3)
    theta = torch.zeros(3, 4, 4, dtype=torch.float64, requires_grad=True)
    target_w = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    target_l = 3.0 * target_w + 0.1 * torch.randn(3, 4, 4, generator=g, dtype=torch.float64)  # aligned, larger

    def errors(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = torch.cat([params, params])
        return outputs, (outputs - torch.cat([target_w, target_l])).pow(2).flatten(1).mean(1)

    outputs, err = errors(theta)
    if safeguard:
        err, _ = safeguarded_errors(err, outputs, mu)
    model_w, model_l = err.chunk(2)
    ref_w, ref_l = model_w.detach(), model_l.detach()  # the first step: policy == reference
    loss_grad = torch.autograd.grad(dpo_loss(model_w, model_l, ref_w, ref_l, beta=50.0), theta, retain_graph=True)[0]
    winner_grad = torch.autograd.grad(model_w.mean(), theta, retain_graph=True)[0]
    winner_only = torch.autograd.grad(dpo_loss(model_w, model_l.detach(), ref_w, ref_l, beta=50.0), theta)[0]
    first_order = -lr * (winner_grad * loss_grad).sum().item()
    after = errors(theta.detach() - lr * loss_grad)[1].chunk(2)[0].mean().item()
    return first_order, after - model_w.mean().item(), -lr * (winner_grad * winner_only).sum().item()


def test_one_safeguarded_step_does_not_raise_the_winners_error_while_plain_dpo_does() -> None:
    plain_first, plain_actual, _ = _toy_step(safeguard=False)
    safe_first, safe_actual, winner_only = _toy_step(safeguard=True, mu=0.9)
    assert plain_first > 0 and plain_actual > 0  # plain DPO hurts the winners on this batch
    assert safe_first < 0 and safe_actual < 0
    # With lambda strictly inside (0, 1), the winners keep exactly a fraction mu of their own descent.
    assert safe_first == pytest.approx(0.9 * winner_only, rel=1e-9)


# -------------------------------------------------------------------------------- RPO loss types
def _hand_rpo_cells(model_w, model_l, ref_w, ref_l, sim, beta, tau, cell) -> float:
    m = len(model_w)
    total = 0.0
    for i in range(m):
        norm = sum(math.exp(sim[i][k] / tau) for k in range(m))
        for j in range(m):
            weight = math.exp(sim[i][j] / tau) / norm
            total += cell(weight * ((ref_w[i] - model_w[i]) - (ref_l[j] - model_l[j])), beta)
    return total / (m * m)


CELLS = {
    "hinge": lambda x, beta: max(0.0, 1.0 - beta / 2 * x),
    "ipo": lambda x, beta: (x - 1.0 / (2 * beta)) ** 2,
    "robust": lambda x, beta: (-0.8 * math.log(_sigmoid(beta / 2 * x)) + 0.2 * math.log(_sigmoid(-beta / 2 * x))) / 0.6,
}


@pytest.mark.parametrize("loss_type", sorted(CELLS))
def test_rpo_loss_types_match_hand_computation(loss_type) -> None:
    m, beta, tau = 3, 2000.0, 0.5
    ref_w, ref_l = _rand(m, 10), _rand(m, 11)
    noise = torch.randn(2, m, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    model_w, model_l = ref_w + 1e-3 * noise[0], ref_l + 1e-3 * noise[1]
    sim = torch.tensor([[1.0, 0.2, -0.3], [0.4, 0.9, 0.1], [0.0, 0.5, 1.0]], dtype=torch.float64)
    smoothing = 0.2 if loss_type == "robust" else 0.0
    got = rpo_loss(
        model_w, model_l, ref_w, ref_l, sim, beta=beta, temperature=tau, loss_type=loss_type,
        label_smoothing=smoothing,
    )  # fmt: skip
    expected = _hand_rpo_cells(
        model_w.tolist(), model_l.tolist(), ref_w.tolist(), ref_l.tolist(), sim.tolist(), beta, tau, CELLS[loss_type]
    )
    assert got.item() == pytest.approx(expected, rel=1e-9)
