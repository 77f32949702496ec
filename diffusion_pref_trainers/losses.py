"""Preference objectives as pure functions of per-sample denoising errors.

Every function takes the per-sample mean squared errors of `docs/dpo.md` (shape `[M]`): the policy's
`model_*` (with gradient) and the frozen reference's `ref_*` (without), and returns a scalar loss.
Nothing here knows about models, schedulers or batches, so each objective can be checked against a
hand computation. Metrics come from the same tensors (`reward_metrics`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusion_pref_trainers.configs import DPO_LOSS_TYPES


def implicit_rewards(model_err: torch.Tensor, ref_err: torch.Tensor) -> torch.Tensor:
    """Implicit reward `s = -(m - r)`: how much better than the reference the policy denoises a sample."""
    return ref_err - model_err


def pair_reward_scale(beta: float) -> float:
    """The factor from `s` to the logged reward of DPO/RPO: `beta/2`, the scale inside their sigmoid.

    With it `rewards/margins` is the sigmoid's argument, as TRL's is (TRL: `-log sigmoid(margin)`).
    """
    return 0.5 * beta


def preference_loss(
    logits: torch.Tensor, *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0
) -> torch.Tensor:
    """Element-wise pairwise loss on reward differences `logits` (any shape), before averaging (docs/dpo.md).

    `sigmoid` (conservative DPO when eps > 0): `-(1-eps) log s(beta/2 l) - eps log s(-beta/2 l)`;
    `robust` (TRL's robust DPO): `(-(1-eps) log s(beta/2 l) + eps log s(-beta/2 l)) / (1 - 2 eps)`;
    `hinge`: `relu(1 - beta/2 l)`; `ipo`: `(l - 1/(2 beta))^2` with `beta` as TRL's tau (no 1/2), which pulls the
    margin to `1/(2 beta)` rather than to infinity.
    """
    if loss_type in ("sigmoid", "robust"):
        scaled = 0.5 * beta * logits
        clean, flipped = -F.logsigmoid(scaled), -F.logsigmoid(-scaled)
        if loss_type == "sigmoid":
            return (1.0 - label_smoothing) * clean + label_smoothing * flipped
        # Unbiased under labels flipped with probability eps: its expectation over the flip is the clean loss.
        return ((1.0 - label_smoothing) * clean - label_smoothing * flipped) / (1.0 - 2.0 * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1.0 - 0.5 * beta * logits)
    if loss_type == "ipo":
        return (logits - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"Unknown loss_type {loss_type!r}; choose one of {', '.join(DPO_LOSS_TYPES)}.")


def dpo_loss(
    model_w: torch.Tensor,
    model_l: torch.Tensor,
    ref_w: torch.Tensor,
    ref_l: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Diffusion-DPO: mean over pairs of the preference loss on `s_w - s_l` (Wallace et al., 2023)."""
    logits = implicit_rewards(model_w, ref_w) - implicit_rewards(model_l, ref_l)
    return preference_loss(logits, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing).mean()


def rpo_weights(similarity: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row-wise softmax of `similarity / tau`: how much winner i is contrasted with each loser j."""
    return torch.softmax(similarity / temperature, dim=-1)


def rpo_loss(
    model_w: torch.Tensor,
    model_l: torch.Tensor,
    ref_w: torch.Tensor,
    ref_l: torch.Tensor,
    similarity: torch.Tensor,
    *,
    beta: float,
    temperature: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Diffusion-RPO: every winner against every loser, each contrast weighted inside the sigmoid.

    `logits[i, j] = s_w[i] - s_l[j]`, `W = softmax_j(similarity[i, j] / temperature)`, and the loss is
    the mean over all M*M cells of `preference_loss(W * logits)`. With distinct prompts and
    `temperature -> 0`, W is the identity and the loss is `dpo_loss / M + (M - 1) / M * log 2`.
    """
    _check_square(similarity, model_w.shape[0])
    logits = implicit_rewards(model_w, ref_w)[:, None] - implicit_rewards(model_l, ref_l)[None, :]
    weighted = rpo_weights(similarity, temperature) * logits
    return preference_loss(weighted, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing).mean()


def kto_loss(
    model_err: torch.Tensor,
    ref_err: torch.Tensor,
    desirable: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl: torch.Tensor | None = None,
) -> torch.Tensor:
    """Diffusion-KTO on per-image errors with a bool `desirable` label per image (Li et al., 2024).

    The reference point is `kl = clamp(mean(r - m), min=0)`, detached; pass `kl` computed over the
    global batch under data parallelism, else it is taken from this batch.
    """
    rewards = implicit_rewards(model_err, ref_err)
    if kl is None:
        kl = rewards.mean().clamp(min=0)
    kl = kl.detach()
    sign = desirable.to(rewards.dtype) * 2 - 1
    value = torch.sigmoid(beta * sign * (rewards - kl))
    weights = torch.full_like(rewards, undesirable_weight).masked_fill(desirable, desirable_weight)
    return (weights * (1 - value)).mean()


def kto_metrics(
    model_err: torch.Tensor, ref_err: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *, beta: float
) -> dict[str, torch.Tensor]:
    """KTO's logged metrics; a mean over no images (a batch without undesirable ones, say) is NaN.

    As TRL's: `rewards/*` are `beta * g` (KTO's sigmoid has no 1/2), `kl` is unscaled; `errors/*` keep `g`.
    """
    raw = implicit_rewards(model_err, ref_err).detach()
    chosen, rejected = raw[desirable].mean(), raw[~desirable].mean()
    return {
        "rewards/chosen": beta * chosen,
        "rewards/rejected": beta * rejected,
        "rewards/margins": beta * (chosen - rejected),
        "errors/chosen_diff": chosen,
        "errors/rejected_diff": rejected,
        "kl": kl.detach(),
    }


def kto_pair_accuracy(model_err: torch.Tensor, ref_err: torch.Tensor, *, paired: bool) -> torch.Tensor:
    """KTO's `rewards/accuracies`: the share of pairs whose winner's reward beats its own loser's (same noise).

    Paired errors are image-major (every winner, then every loser). A single labelled image has no partner, so
    unpaired data gives NaN, which the loop leaves out of its averages.
    """
    rewards = implicit_rewards(model_err, ref_err).detach()
    if not paired:
        return rewards.new_tensor(float("nan"))
    chosen, rejected = rewards.chunk(2)
    return (chosen > rejected).float().mean()


def mapo_loss(
    model_w: torch.Tensor,
    model_l: torch.Tensor,
    *,
    beta: float = 0.1,
    margin_temperature: float = 1000.0,
    log_odds_scale: float = 0.5,
) -> torch.Tensor:
    """MaPO (Hong et al., 2024): winner denoising loss plus a reference-free margin on `f(m) = cm/(e^{cm}-1)`.

    `loss = mean(m_w) - beta * mean(log sigmoid(T * (f(m_w) - f(m_l))))` with `T = margin_temperature`
    and `c = log_odds_scale`.
    """
    margin = mapo_log_odds(model_w, log_odds_scale) - mapo_log_odds(model_l, log_odds_scale)
    return model_w.mean() - beta * F.logsigmoid(margin_temperature * margin).mean()


def mapo_log_odds(err: torch.Tensor, c: float) -> torch.Tensor:
    """`f(m) = c*m / (exp(c*m) - 1)`, MaPO's log-odds proxy: decreasing in the error, `f(0) = 1`."""
    x = c * err
    small = x.abs() < 1e-12
    safe = torch.where(small, torch.ones_like(x), x)  # keeps 0/0 out of the graph, so gradients stay finite
    return torch.where(small, torch.ones_like(x), safe / torch.expm1(safe))


def mapo_metrics(
    model_w: torch.Tensor, model_l: torch.Tensor, *, margin_temperature: float, log_odds_scale: float
) -> dict[str, torch.Tensor]:
    """Reference-free metrics (as TRL's ORPO logs): the margin `T (f(m_w) - f(m_l))` and how often it is > 0."""
    margin = margin_temperature * (
        mapo_log_odds(model_w.detach(), log_odds_scale) - mapo_log_odds(model_l.detach(), log_odds_scale)
    )
    return {
        "rewards/margins": margin.mean(),
        "rewards/accuracies": (margin > 0).float().mean(),
        "model_loss/chosen": model_w.detach().mean(),
        "model_loss/rejected": model_l.detach().mean(),
    }


def sft_loss(model_w: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning baseline: the plain denoising loss on the preferred images."""
    return model_w.mean()


def with_sft_term(loss: torch.Tensor, model_w: torch.Tensor, sft_weight: float) -> torch.Tensor:
    """DPO/RPO's `sft_weight` option: `loss + sft_weight * mean(m_w)`; `loss` itself when the weight is 0."""
    if not sft_weight:
        return loss
    return loss + sft_weight * sft_loss(model_w)


def safeguard_scale(grad_w: torch.Tensor, grad_l: torch.Tensor, mu: float) -> torch.Tensor:
    """Diffusion-SDPO's loser scale `clip((1 - mu) |gA|^2 / <gA, gB>, 0, 1)`, or 1 when `<gA, gB> <= 0`.

    `grad_w`/`grad_l` are the output-space gradients of the winners' and losers' mean errors, aligned
    pair by pair. Scaling the losers' gradient by it keeps the winners' error from rising at first order.
    """
    grad_w, grad_l = grad_w.detach().double(), grad_l.detach().double()
    inner = (grad_w * grad_l).sum()
    bound = ((1.0 - mu) * grad_w.pow(2).sum() / inner).clamp(0.0, 1.0)
    return torch.where(inner > 0, bound, torch.ones_like(bound)).float()  # no host sync


def safeguarded_errors(errors: torch.Tensor, outputs: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-major errors `[2M]` (winners, then losers) computed from `outputs` `[2M, ...]`, with SDPO applied.

    The values are unchanged; the losers' errors become `m_l.detach() + lambda * (m_l - m_l.detach())`, so
    any loss built on them sends the losers only `lambda` times their gradient. Returns the errors and lambda.
    """
    winners, losers = errors.chunk(2)
    grad_w = torch.autograd.grad(winners.mean(), outputs, retain_graph=True)[0]
    grad_l = torch.autograd.grad(losers.mean(), outputs, retain_graph=True)[0]
    half = outputs.shape[0] // 2
    scale = safeguard_scale(grad_w[:half], grad_l[half:], mu)
    scaled = losers.detach() + scale.to(losers.dtype) * (losers - losers.detach())
    return torch.cat([winners, scaled]), scale


def reward_metrics(
    model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, *, beta: float
) -> dict[str, torch.Tensor]:
    """TRL-named metrics of a batch of pairs, as detached 0-d tensors (no host sync here).

    `rewards/*` are `beta/2 * s` (`pair_reward_scale`), so a pair's margin is its sigmoid argument;
    `errors/*_diff` are the unscaled `s = r - m`.
    """
    chosen = implicit_rewards(model_w, ref_w).detach()
    rejected = implicit_rewards(model_l, ref_l).detach()
    scale = pair_reward_scale(beta)
    return {
        "rewards/chosen": scale * chosen.mean(),
        "rewards/rejected": scale * rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": scale * (chosen - rejected).mean(),
        "errors/chosen_diff": chosen.mean(),
        "errors/rejected_diff": rejected.mean(),
        "model_loss/chosen": model_w.detach().mean(),
        "model_loss/rejected": model_l.detach().mean(),
        "ref_loss/chosen": ref_w.detach().mean(),
        "ref_loss/rejected": ref_l.detach().mean(),
    }


def rpo_process_scale(num_processes: int, *, gathered: bool) -> int:
    """The factor on each process's RPO loss that makes DDP's gradient that of the global mean loss.

    With a gathered matrix every process holds the whole loss but back-propagates only through its own rows;
    DDP averages the gradients over processes, so each process scales its loss by their number.
    """
    return num_processes if gathered else 1


def _check_square(similarity: torch.Tensor, size: int) -> None:
    """RPO needs an M x M similarity matrix matching the M pairs."""
    if similarity.shape != (size, size):
        raise ValueError(f"`similarity` must have shape ({size}, {size}), got {tuple(similarity.shape)}.")
