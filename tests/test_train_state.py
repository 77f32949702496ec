"""Optimizer and random states round-trip through safetensors + JSON exactly, with nothing pickled."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from diffusion_pref_trainers import train_state


def _assert_same_tree(got, want) -> None:
    """Equal trees: same container and key types, same tensor dtypes, shapes and values."""
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want.cpu())
    elif isinstance(want, dict):
        assert list(got) == list(want) and [type(key) for key in got] == [type(key) for key in want]
        for key in want:
            _assert_same_tree(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            _assert_same_tree(a, b)
    else:
        assert got == want


def _adamw_after_steps(steps: int) -> tuple[torch.optim.AdamW, list[torch.nn.Parameter]]:
    """A two-group AdamW (different lr and betas) after `steps` updates on fixed gradients."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen))]
    optimizer = torch.optim.AdamW(
        [{"params": params[:1]}, {"params": params[1:], "lr": 1e-2, "betas": (0.8, 0.95)}], lr=1e-3
    )
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=gen)
        optimizer.step()
    return optimizer, params


def test_the_tree_keeps_container_and_key_types_and_every_tensor_dtype(tmp_path) -> None:
    dtypes = (torch.uint8, torch.int8, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.bool)
    tree = {
        "state": {0: {f"t{i}": torch.arange(6).reshape(2, 3).to(dtype) for i, dtype in enumerate(dtypes)}},
        "step": torch.tensor(7.0),  # a 0-d tensor, like AdamW's step
        "pair": (0.9, 0.999),
        "list": [1, "two", None, True, 2.5],
        "nested": {"quant": {"state1": torch.tensor([255, 0], dtype=torch.uint8)}},
    }
    skeleton, tensors = train_state.flatten(tree)
    assert set(tensors) == {*(f"state/0/t{i}" for i in range(7)), "step", "nested/quant/state1"}
    json.dumps(skeleton, allow_nan=False)  # the rest is plain JSON
    train_state.save(tree, tmp_path, "tree")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tree.json", "tree.safetensors"]
    _assert_same_tree(train_state.load(tmp_path, "tree"), tree)


def test_shared_tensors_are_stored_once_each(tmp_path) -> None:
    shared = torch.linspace(-1, 1, 256)  # bitsandbytes gives every parameter the same quantization map
    train_state.save({0: {"qmap1": shared}, 1: {"qmap1": shared, "view": shared[:4]}}, tmp_path, "shared")
    loaded = train_state.load(tmp_path, "shared")
    assert torch.equal(loaded[1]["qmap1"], shared) and torch.equal(loaded[1]["view"], shared[:4])


def test_values_that_would_need_pickle_are_refused() -> None:
    with pytest.raises(TypeError, match="Cannot store a set at 'a' without pickling it"):
        train_state.flatten({"a": {1, 2}})
    with pytest.raises(TypeError, match="only str and int keys"):
        train_state.flatten({0.5: 1})
    with pytest.raises(ValueError, match="would be stored as '0'"):
        train_state.flatten({0: torch.zeros(1), "0": torch.ones(1)})  # int and str keys name the same tensor


def _assert_same_next_step(optimizer, params, fresh, twins, grad: float) -> None:
    """One more step of the original and the restored optimizer, same gradient: identical parameters after."""
    for param, twin in zip(params, twins, strict=True):
        param.grad = torch.full(param.shape, grad)
        twin.grad = torch.full(param.shape, grad)
    optimizer.step()
    fresh.step()
    for param, twin in zip(params, twins, strict=True):
        assert torch.equal(param, twin)


def test_adamw_resumes_with_the_same_state_and_the_same_next_step(tmp_path) -> None:
    optimizer, params = _adamw_after_steps(3)
    saved = optimizer.state_dict()
    assert saved["state"][0]["step"].dtype == torch.float32 and saved["state"][0]["step"].item() == 3.0
    train_state.save(saved, tmp_path, "optimizer")

    fresh, fresh_params = _adamw_after_steps(0)
    for param, trained in zip(fresh_params, params, strict=True):
        param.data.copy_(trained.data)
    fresh.load_state_dict(train_state.load(tmp_path, "optimizer"))
    _assert_same_tree(fresh.state_dict(), saved)
    assert fresh.param_groups[1]["betas"] == (0.8, 0.95) and fresh.param_groups[1]["lr"] == 1e-2

    _assert_same_next_step(optimizer, params, fresh, fresh_params, 0.5)


def test_bitsandbytes_8bit_adamw_state_round_trips(tmp_path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(4096, generator=gen)) for _ in range(2)]  # big enough for 8 bits
    try:
        optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
        for param in params:
            param.grad = torch.randn(4096, generator=gen)
        optimizer.step()
    except Exception as error:  # noqa: BLE001 - any failure means the CPU path is unusable here
        pytest.skip(f"bitsandbytes AdamW8bit cannot step on this machine: {error}")
    saved = optimizer.state_dict()
    assert saved["state"][0]["__bnb_optimizer_quant_state__"]["state1"].dtype == torch.uint8
    train_state.save(saved, tmp_path, "optimizer")
    _assert_same_tree(train_state.load(tmp_path, "optimizer"), saved)

    twins = [torch.nn.Parameter(param.detach().clone()) for param in params]
    fresh = bnb.optim.AdamW8bit(twins, lr=1e-3)
    fresh.load_state_dict(train_state.load(tmp_path, "optimizer"))
    _assert_same_next_step(optimizer, params, fresh, twins, 0.25)


def test_restored_generators_draw_the_numbers_that_would_have_come(tmp_path) -> None:
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    np.random.standard_normal()
    train_state.save(train_state.rng_state(), tmp_path, "rng")

    def draws() -> tuple:
        return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist()

    expected = draws()
    assert draws() != expected  # the generators moved on
    train_state.set_rng_state(train_state.load(tmp_path, "rng"))
    assert draws() == expected


def test_the_fp16_loss_scaler_state_is_plain_json() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    for grad in (float("inf"), 1.0, 1.0):  # an overflow halves the scale; two good steps count towards growth
        optimizer.zero_grad()
        scaler.scale((param * grad).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    saved = json.loads(json.dumps(scaler.state_dict(), allow_nan=False))
    assert saved["scale"] == 512.0 and saved["_growth_tracker"] == 2
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == scaler.state_dict() and fresh.get_scale() == 512.0
