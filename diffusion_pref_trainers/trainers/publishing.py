"""Saving and publishing a trained model: diffusers-format weights, model card, sample grid, Hub pushes.

A mixin of `DiffusionPreferenceTrainer`, kept apart from the training loop because it only reads the
trainer's state (model, config, history) and never changes how training runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusion_pref_trainers import adapters, checkpoints, distributed, hub, tracking

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)
STAGING = "tmp-model"  # the folder, inside the output folder, a save is written into before it is moved into place


class PublishingMixin:
    """`save_model`, `model_card`, `push_to_hub` and the background pushes of `hub_strategy="every_save"`."""

    def save_model(self, output_dir: str | None = None) -> str:
        """Write the trained weights in diffusers format plus a model card; returns the folder.

        LoRA: `pytorch_lora_weights.safetensors`, loadable with `pipe.load_lora_weights(folder)`.
        Full fine-tuning: the denoiser in a sub-folder named like the pipeline's (e.g. `unet/`), as safetensors.
        Non-finite weights are refused (nothing is written); the files are written into `tmp-model/` inside the
        folder and renamed into place once flushed to disk, so a crash never leaves a half-written model.
        """
        folder = Path(output_dir or self.args.output_dir)
        self._check_finite_weights(f"the model to {folder}")
        denoiser = distributed.gathered(self.accelerator, self.denoiser)  # every process, when sharded
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self._write_model(folder, denoiser)
        self.accelerator.wait_for_everyone()
        return str(folder)

    def _write_model(self, folder: Path, denoiser: Any = None) -> None:
        """Weights, `training_config.json` (no token) and the local model card into `folder`; main process only.

        `denoiser` is the denoiser's full weights (`distributed.gathered`), by default the unsharded denoiser itself.
        All are written into `folder/tmp-model/` first (a leftover of a crashed save is cleared), then moved in.
        """
        denoiser = self._unwrapped if denoiser is None else denoiser
        staging = folder / STAGING
        checkpoints.clear_temporary(staging)
        staging.mkdir(parents=True)
        if self.peft_config is not None:
            modules = {self.family.denoiser_attr: denoiser, **self.text_encoders}
            self.family.save_lora_weights(str(staging), modules)
        else:
            denoiser.save_pretrained(str(staging / self.family.denoiser_attr), safe_serialization=True)
        (staging / "training_config.json").write_text(json.dumps(loggable_config(self.args.to_dict()), indent=2))
        checkpoints.write_run(staging, self._run_record())  # whose weights these are, and any resumes' changes
        card = self.model_card(folder.name, folder=folder)  # the sample grid, if any, lies in `folder`
        card.save(str(staging / "README.md"))
        checkpoints.move_into(staging, folder)

    def model_card(self, repo_id: str, *, folder: str | Path | None = None, for_hub: bool = False) -> Any:
        """The model card of this run (base model and its license, method, hyperparameters, LoRA settings, dataset,
        samples, final metrics, framework versions, the method's papers).

        `folder` is where the card goes: the sample grid and the widget images are shown when they lie there. A card
        `for_hub` keeps a local base model or dataset path out of its metadata. Its usage snippet loads the weights
        from `repo_id` when `for_hub`, else from the folder's absolute path, and prompts with the first validation
        prompt or, without one, the first training prompt.
        """
        last: dict[str, float] = {}
        for entry in self.state.log_history:
            last.update({k: v for k, v in entry.items() if isinstance(v, float) and k not in ("epoch",)})
        model_class = distributed.model_class(self._unwrapped).__name__  # not FSDP2's `FSDP<Class>`
        full = None if self.peft_config is not None else (self.family.denoiser_attr, model_class)
        samples = folder is not None and Path(folder, hub.SAMPLES_FILE).is_file()
        base_model = str(self.pipe.config.get("_name_or_path") or "unknown")
        return hub.build_model_card(
            base_model=base_model,
            method=self.method,
            family=self.family.name,
            repo_id=repo_id,
            load_from=repo_id if for_hub or folder is None else str(Path(folder).resolve()),
            prompt=next(iter(self.args.validation_prompts), None) or self._example_prompt or "a photo",
            dataset=self._dataset_name,
            config=self.args.to_dict(),
            metrics=last,
            steps=self.state.global_step,
            license=hub.base_model_license(base_model, token=self.args.hub_token),
            lora=self._lora_settings(),
            full_weights=full,
            samples=hub.SAMPLES_FILE if samples else None,
            widget=hub.widget(folder, self.args.validation_prompts) if folder is not None else None,
            for_hub=for_hub,
        )

    def _lora_settings(self) -> dict[str, Any] | None:
        """The adapter's settings as trained, from the `peft_config` in force (a given one or the `lora_*` fields)."""
        config = self.peft_config
        if config is None:
            return None
        targets = config.target_modules
        return {
            "r": config.r,
            "lora_alpha": config.lora_alpha,
            "lora_dropout": config.lora_dropout,
            "target_modules": ", ".join([targets] if isinstance(targets, str) else sorted(targets or [])),
            "init_lora_weights": config.init_lora_weights,
            "text encoders": ", ".join(sorted(self.text_encoders)) or "not trained",
        }

    def _save_samples(self) -> None:
        """Render `validation_prompts` with the base and the aligned weights into `output_dir/samples/`, and log the
        grid to the trackers (main process).

        Samples are a report, not the result: a failure is logged and the run goes on to its push.
        """
        folder = self.args.output_dir
        seeds, call = self._validation_call()
        try:
            with self._rendering():
                grid = hub.render_samples(
                    self.pipe, self.args.validation_prompts, seeds, folder, self._base_weights(), **call
                )
            self._log_validation_image(grid)
            self.model_card(Path(folder).name, folder=folder).save(str(Path(folder, "README.md")))
            logger.info("Saved validation samples to %s", Path(folder, hub.SAMPLES_FILE))
        except Exception:
            logger.exception("Could not render the validation samples; the model is saved without them.")

    def _log_validation(self) -> None:
        """`validation_steps`: render the base-vs-current grid and log it to the trackers, on the main process (the
        others wait), with the idle encoders back on the device for the while. Each image has its own seeded
        generator, so training's random streams are untouched. A failure is logged and training goes on."""
        if self.accelerator.is_main_process:
            seeds, call = self._validation_call()
            try:
                with self.encoder_offload.on_device(), self._rendering():
                    grid, _ = hub.render_comparison(
                        self.pipe, self.args.validation_prompts, seeds, self._base_weights(), **call
                    )
                self._log_validation_image(grid)
            except Exception:
                logger.exception("Could not render the validation images of step %d.", self.state.global_step)
        self.accelerator.wait_for_everyone()

    def _validation_call(self) -> tuple[list[int], dict[str, Any]]:
        """The validation images' seeds and pipeline-call settings (size, sampling steps)."""
        args = self.args
        first = args.seed if args.validation_seed is None else args.validation_seed
        call = {"height": args.resolution, "width": args.resolution}
        if args.validation_inference_steps is not None:
            call["num_inference_steps"] = args.validation_inference_steps
        return [first + index for index in range(args.num_validation_images)], call

    @contextlib.contextmanager
    def _rendering(self) -> Iterator[None]:
        """The trained modules in eval mode (no dropout) under the run's autocast; their modes restored after."""
        modules = [self._unwrapped, *self.text_encoders.values()]
        modes = [module.training for module in modules]
        for module in modules:
            module.eval()
        try:
            with self.accelerator.autocast():
                yield
        finally:
            for module, mode in zip(modules, modes, strict=True):
                module.train(mode)

    def _log_validation_image(self, grid: Image.Image) -> None:
        """The grid to every active tracker that takes images, as `validation` at the current step."""
        skipped = tracking.log_image(self.accelerator.trackers, "validation", grid, self.state.global_step)
        if skipped:
            logger.warning("Validation images are not logged to %s: it takes no images here.", ", ".join(skipped))

    def _base_weights(self) -> Callable[[], contextlib.AbstractContextManager] | None:
        """A context in which the pipeline generates as the base model, or None if no base weights were kept."""
        if self.peft_config is not None:
            return lambda: adapters.adapters_disabled(self._unwrapped, *self.text_encoders.values())
        if self.reference is None:
            return None

        @contextlib.contextmanager
        def reference_weights() -> Iterator[None]:
            attr = self.family.denoiser_attr
            trained = getattr(self.pipe, attr)
            setattr(self.pipe, attr, self.reference)
            try:
                yield
            finally:
                setattr(self.pipe, attr, trained)

        return reference_weights

    def _repo_id(self) -> str:
        """The Hub repo of this run, created on first use (`hub_model_id`, or the name of `output_dir`)."""
        if self._hub_repo_id is None:
            name = self.args.hub_model_id or Path(self.args.output_dir).name
            self._hub_repo_id = hub.create_repo(name, private=self.args.hub_private_repo, token=self.args.hub_token)
        return self._hub_repo_id

    def push_to_hub(self, commit_message: str = "Upload aligned model", **_: Any) -> str | None:
        """Save, then upload `output_dir` to `hub_model_id` in one commit: weights, card, samples, training config;
        never checkpoints, pickles or the token (see `hub.upload_plan`). Returns the commit URL (main process)."""
        hub.ensure_hub_reachable(self.args.hub_token)
        self._wait_for_push()
        folder = self.save_model()
        if not self.accelerator.is_main_process:
            return None
        repo_id = self._repo_id()
        card = self.model_card(repo_id, folder=folder, for_hub=True)
        return hub.push_folder(folder, repo_id, card=card, token=self.args.hub_token, commit_message=commit_message)

    def _push_in_background(self, commit_message: str) -> None:
        """`hub_strategy='every_save'`: write the current model and upload it on a worker thread (main process).

        Training goes on meanwhile; while an upload runs, later saves are not pushed (as transformers does).
        """
        if self._push_future is not None and not self._push_future.done():
            logger.info("The previous push is still uploading: %r is not pushed.", commit_message)
            return
        self._wait_for_push()
        repo_id, folder = self._repo_id(), Path(self.args.output_dir)
        self._write_model(folder)
        card = self.model_card(repo_id, folder=folder, for_hub=True)
        if self._push_executor is None:
            self._push_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-push")
        self._push_future = self._push_executor.submit(
            hub.push_folder, folder, repo_id, card=card, token=self.args.hub_token, commit_message=commit_message
        )

    def _wait_for_push(self) -> None:
        """Let a background upload finish before the folder changes again; its failure is logged, not raised (the
        final push uploads everything anyway)."""
        future, self._push_future = self._push_future, None
        if future is None:
            return
        try:
            future.result()
        except Exception as error:
            logger.warning("A background push to the Hub failed: %s", error)


def loggable_config(config: dict[str, Any]) -> dict[str, Any]:
    """Config values trackers accept (lists and None become strings)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
