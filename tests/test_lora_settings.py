"""A user's `peft_config` is honoured (text encoders included), base-rewriting inits are refused, and the renamed
`lora_name_or_path` field keeps its old name `init_lora_weights` working with a DeprecationWarning."""

from __future__ import annotations

import pytest
from peft import LoraConfig

from diffusion_pref_trainers import DiffusionDPOConfig, DiffusionDPOTrainer
from diffusion_pref_trainers.adapters import check_base_preserving_init
from diffusion_pref_trainers.testing import tiny_sd_pipeline

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def test_the_old_field_name_still_works_with_a_deprecation_warning(tmp_path) -> None:
    with pytest.warns(DeprecationWarning, match="use `lora_name_or_path`") as caught:
        args = DiffusionDPOConfig(output_dir=str(tmp_path), init_lora_weights="me/adapter")
    assert caught[0].filename == __file__  # points at the caller's line
    assert (args.lora_name_or_path, args.init_lora_weights) == ("me/adapter", None)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(init_lora_weights=True), "not peft's initialisation: pass `peft_config=LoraConfig"),
        (dict(init_lora_weights="me/a", lora_name_or_path="me/b"), "set only `lora_name_or_path`"),
    ],
)
def test_the_old_field_name_refuses_what_it_cannot_mean(tmp_path, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        DiffusionDPOConfig(output_dir=str(tmp_path), **overrides)


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_base_preserving_inits_are_accepted(init) -> None:
    check_base_preserving_init(LoraConfig(r=4, target_modules=UNET_TARGETS, init_lora_weights=init))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "eva", "loftq"])
def test_inits_that_rewrite_the_base_weights_are_refused(init) -> None:
    config = LoraConfig(r=4, target_modules=UNET_TARGETS)
    config.init_lora_weights = init  # set after construction: some of these need extra configs at init
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' modifies the base weights.*reference"):
        check_base_preserving_init(config)


def test_a_pissa_peft_config_is_refused_before_the_denoiser_changes(pairs, make_config) -> None:
    pipe = tiny_sd_pipeline()
    before = {name: param.clone() for name, param in pipe.unet.named_parameters()}
    config = LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="Use init_lora_weights=True, False or 'gaussian'"):
        DiffusionDPOTrainer(pipe, make_config(), pairs, peft_config=config)
    assert all(param.equal(before[name]) for name, param in pipe.unet.named_parameters())


def test_text_encoder_adapters_take_the_peft_config_rank_alpha_and_dropout(pairs, make_config) -> None:
    config = LoraConfig(r=3, lora_alpha=6, lora_dropout=0.25, target_modules=UNET_TARGETS, init_lora_weights=True)
    args = make_config(train_text_encoder=True)  # its lora_rank/alpha/dropout (8, 8, 0.0) must not be used
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs, peft_config=config)
    encoder_config = trainer.text_encoders["text_encoder"].peft_config["default"]
    assert (encoder_config.r, encoder_config.lora_alpha, encoder_config.lora_dropout) == (3, 6, 0.25)
    assert encoder_config.init_lora_weights is True
    assert set(encoder_config.target_modules) == {"q_proj", "k_proj", "v_proj", "out_proj"}  # the encoder's own
