"""Diffusion-RPO math: `rpo_loss` and the similarity matrix against hand computations and limits."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_pref_trainers.losses import dpo_loss, rpo_loss, rpo_process_scale, rpo_weights
from diffusion_pref_trainers.similarity import PipelineTextEmbedder, cosine_matrix, similarity_matrix
from diffusion_pref_trainers.testing import tiny_sd_pipeline


def _errors(m: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Per-sample errors of a batch of `m` pairs, with reward differences of order 1e-3."""
    g = torch.Generator().manual_seed(seed)
    ref_w, ref_l = torch.rand(m, generator=g) + 0.5, torch.rand(m, generator=g) + 0.5
    model_w = ref_w + 1e-3 * torch.randn(m, generator=g)
    model_l = ref_l + 1e-3 * torch.randn(m, generator=g)
    return model_w.double(), model_l.double(), ref_w.double(), ref_l.double()


def _hand_rpo(model_w, model_l, ref_w, ref_l, sim, beta, tau) -> float:
    """docs/rpo.md's RPO with Python floats: row-softmax weights inside the sigmoid, mean of M*M cells."""
    m = len(model_w)
    s_w = [float(ref_w[i] - model_w[i]) for i in range(m)]
    s_l = [float(ref_l[j] - model_l[j]) for j in range(m)]
    total = 0.0
    for i in range(m):
        norm = sum(math.exp(float(sim[i][k]) / tau) for k in range(m))
        for j in range(m):
            weight = math.exp(float(sim[i][j]) / tau) / norm
            total += -math.log(1.0 / (1.0 + math.exp(-beta / 2 * weight * (s_w[i] - s_l[j]))))
    return total / (m * m)


@pytest.mark.parametrize("m,tau", [(2, 0.5), (3, 0.25), (4, 1.0)])
def test_rpo_loss_matches_hand_computation(m: int, tau: float) -> None:
    model_w, model_l, ref_w, ref_l = _errors(m, seed=m)
    sim = torch.rand(m, m, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    got = rpo_loss(model_w, model_l, ref_w, ref_l, sim, beta=5000.0, temperature=tau)
    assert got.item() == pytest.approx(_hand_rpo(model_w, model_l, ref_w, ref_l, sim.tolist(), 5000.0, tau), rel=1e-9)


def test_rpo_weights_are_row_softmax() -> None:
    sim = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    weights = rpo_weights(sim, 0.5)
    expected_first = math.exp(2) / (math.exp(2) + 1)
    assert weights[0, 0].item() == pytest.approx(expected_first)
    assert weights[1].tolist() == pytest.approx([0.5, 0.5])
    assert weights.sum(-1).tolist() == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("m", [2, 4, 8])
def test_rpo_tends_to_rescaled_dpo_as_temperature_vanishes(m: int) -> None:
    model_w, model_l, ref_w, ref_l = _errors(m, seed=3)
    # Distinct prompts: the diagonal (same prompt) is strictly the most similar cell of each row.
    sim = torch.full((m, m), 0.6, dtype=torch.float64) + 0.4 * torch.eye(m, dtype=torch.float64)
    rpo = rpo_loss(model_w, model_l, ref_w, ref_l, sim, beta=5000.0, temperature=1e-3)
    dpo = dpo_loss(model_w, model_l, ref_w, ref_l, beta=5000.0)
    assert rpo.item() == pytest.approx(dpo.item() / m + (m - 1) / m * math.log(2), rel=1e-9)


def test_rpo_is_invariant_to_the_order_of_pairs() -> None:
    model_w, model_l, ref_w, ref_l = _errors(5, seed=7)
    sim = cosine_matrix(torch.randn(5, 16, generator=torch.Generator().manual_seed(2)), torch.randn(5, 16)).double()
    perm = torch.tensor([3, 0, 4, 1, 2])
    before = rpo_loss(model_w, model_l, ref_w, ref_l, sim, beta=5000.0, temperature=0.5)
    after = rpo_loss(
        model_w[perm], model_l[perm], ref_w[perm], ref_l[perm], sim[perm][:, perm], beta=5000.0, temperature=0.5
    )
    assert after.item() == pytest.approx(before.item(), rel=1e-12)


def test_gradients_reach_every_off_diagonal_cell() -> None:
    m, beta, tau = 3, 5000.0, 0.5
    model_w, model_l, ref_w, ref_l = _errors(m, seed=11)
    model_w.requires_grad_(True)
    model_l.requires_grad_(True)
    sim = torch.tensor([[1.0, 0.3, -0.2], [0.1, 1.0, 0.4], [0.5, 0.2, 1.0]], dtype=torch.float64)
    rpo_loss(model_w, model_l, ref_w, ref_l, sim, beta=beta, temperature=tau).backward()
    weights = rpo_weights(sim, tau)
    logits = (ref_w - model_w.detach())[:, None] - (ref_l - model_l.detach())[None, :]
    # d cell(i,j) / d logit = -beta/2 W_ij sigmoid(-beta/2 W_ij l_ij); d logit / d m_w[i] = -1, / d m_l[j] = +1.
    cell = -(beta / 2) * weights * torch.sigmoid(-(beta / 2) * weights * logits) / m**2
    assert torch.allclose(model_w.grad, -cell.sum(1), rtol=1e-9)
    assert torch.allclose(model_l.grad, cell.sum(0), rtol=1e-9)
    off_diagonal = cell - torch.diag(cell.diagonal())
    assert (off_diagonal.abs() + torch.eye(m, dtype=torch.float64) > 0).all()
    assert not torch.allclose(model_l.grad, cell.diagonal())


def test_rpo_loss_rejects_a_matrix_of_the_wrong_shape() -> None:
    model_w, model_l, ref_w, ref_l = _errors(3)
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        rpo_loss(model_w, model_l, ref_w, ref_l, torch.eye(2), beta=1.0, temperature=0.5)


def test_rpo_process_scale_undoes_ddp_averaging_only_for_a_gathered_matrix() -> None:
    assert rpo_process_scale(4, gathered=True) == 4  # DDP divides the summed gradients by 4 again
    assert rpo_process_scale(4, gathered=False) == 1  # each process's own matrix: DDP's mean is the right one
    assert rpo_process_scale(1, gathered=False) == 1


def test_similarity_modes_shapes_ranges_and_mean() -> None:
    g = torch.Generator().manual_seed(0)
    text, chosen, rejected = (torch.randn(4, 8, generator=g) for _ in range(3))
    text_sim = similarity_matrix("text", text=text)
    image_sim = similarity_matrix("image", chosen_images=chosen, rejected_images=rejected)
    multi = similarity_matrix("multimodal", text=text, chosen_images=chosen, rejected_images=rejected)
    for sim in (text_sim, image_sim, multi):
        assert sim.shape == (4, 4)
        assert sim.min() >= -1 - 1e-6 and sim.max() <= 1 + 1e-6
    assert torch.allclose(text_sim.diagonal(), torch.ones(4), atol=1e-6)
    assert torch.allclose(multi, (text_sim + image_sim) / 2)
    assert image_sim[1, 2].item() == pytest.approx(
        (chosen[1] @ rejected[2] / (chosen[1].norm() * rejected[2].norm())).item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="needs winner and loser image embeddings"):
        similarity_matrix("multimodal", text=text)
    with pytest.raises(ValueError, match="not supported"):
        similarity_matrix("audio", text=text)


def test_pipeline_text_similarity_puts_the_largest_weight_on_the_diagonal() -> None:
    pipe = tiny_sd_pipeline()
    embedder = PipelineTextEmbedder(pipe.tokenizer, pipe.text_encoder)
    prompts = ["a red cat", "a blue house on a hill", "two dogs", "a red cat sitting"]
    sim = similarity_matrix("text", text=embedder.embed_text(prompts))
    weights = rpo_weights(sim, 0.5)
    assert (weights.argmax(-1) == torch.arange(4)).all()
    # The same prompt twice: those two rows are maximally similar to each other as well.
    twice = similarity_matrix("text", text=embedder.embed_text(["a red cat", "a red cat", "two dogs"]))
    assert twice[0, 1].item() == pytest.approx(1.0, abs=1e-5)
