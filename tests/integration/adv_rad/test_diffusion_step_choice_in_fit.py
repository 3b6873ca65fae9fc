"""``SelectDiffusionStep`` in a real fit of the tiny AdvRAD: it reads training images only, and its choice of k and s
survives a checkpoint, ``anomalib test`` (which builds the default model) and an export."""

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from shared_artifacts import mvtec_datamodule

from anomalib_robust import AdvRAD
from anomalib_robust.callbacks import SelectDiffusionStep

CONFIGS = Path(__file__).resolve().parents[3] / "configs"

CANDIDATES = {"diffusion_steps": (3, 7), "mean_filter_sizes": (1, 5)}
"""None of them is the tiny model's own k = 10 and s = 3, so a restored choice cannot pass for the init args."""


def _paths(batches: object) -> list[str]:
    return [path for batch in batches for path in batch.image_path]


@pytest.fixture(scope="module")
def selected(mvtec_root: Path, tiny_advrad: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One fit with the callback (one epoch on the 12 ``disc`` training images, half held out), recording what the
    choice read: the held-out loader it attacked, the images of every normal map, and calls to the test and
    validation dataloaders made while it ran."""
    datamodule = mvtec_datamodule(mvtec_root)
    callback = SelectDiffusionStep(**CANDIDATES, holdout=0.5, steps=2, eot_samples=2, eval_repeats=1)
    model = AdvRAD(**tiny_advrad)
    record = {"evaluated": [], "normal_maps": [], "test_or_val_calls": [], "selecting": False}

    def spy(function: Callable, log: list | None = None, images: Callable | None = None) -> Callable:
        def wrapper(*args: object, **kwargs: object) -> object:
            if log is not None and record["selecting"]:
                log.append(images(*args, **kwargs) if images else function.__name__)
            return function(*args, **kwargs)

        return wrapper

    select, evaluate, fit_statistics = callback.select, callback.evaluator.evaluate, model.fit_normal_statistics

    def selecting(*args: object) -> object:
        record["selecting"] = True
        try:
            return select(*args)
        finally:
            record["selecting"] = False

    callback.select = selecting
    callback.evaluator.evaluate = spy(evaluate, record["evaluated"], lambda _, loaders, *a: _paths(loaders[0]))
    model.fit_normal_statistics = spy(fit_statistics, record["normal_maps"], lambda loader=None: _paths(loader))
    datamodule.test_dataloader = spy(datamodule.test_dataloader, record["test_or_val_calls"])
    datamodule.val_dataloader = spy(datamodule.val_dataloader, record["test_or_val_calls"])
    root = tmp_path_factory.mktemp("selected")
    engine = Engine(max_epochs=1, default_root_dir=root, logger=False, enable_progress_bar=False, callbacks=[callback])
    engine.fit(model, datamodule=datamodule)
    return {
        **record,
        "model": model,
        "datamodule": datamodule,
        "callback": callback,
        "trained_on": _paths(engine.trainer.train_dataloader),
        "checkpoint": Path(engine.trainer.checkpoint_callback.best_model_path),
    }


def test_choice_reads_held_out_training_images_only(selected: dict, mvtec_root: Path) -> None:
    datamodule, callback = selected["datamodule"], selected["callback"]
    held_out = set(callback._held_out.samples.image_path)
    training = set(datamodule.train_data.samples.image_path)
    assert len(held_out) == 6 and len(training) == 6
    assert held_out | training == {str(path) for path in (mvtec_root / "disc" / "train" / "good").glob("*.png")}
    assert set(selected["trained_on"]) == training  # the held-out images were not trained on
    assert selected["test_or_val_calls"] == []
    assert len(selected["evaluated"]) == 4  # one evaluation per candidate, each held-out image clean and with 2 defects
    assert all(set(paths) == held_out and len(paths) == 3 * len(held_out) for paths in selected["evaluated"])
    assert selected["normal_maps"]  # every normal map of the choice comes from the remaining training images
    assert all(sorted(paths) == sorted(training) for paths in selected["normal_maps"])


def test_choice_survives_a_checkpoint_round_trip(selected: dict) -> None:
    choice = selected["model"].diffusion_step_choice
    assert (choice.num_normal, choice.num_defective) == (6, 12)
    assert (choice.diffusion_step, choice.mean_filter_size) in {(k, s) for k in (3, 7) for s in (1, 5)}
    loaded = AdvRAD.load_from_checkpoint(selected["checkpoint"])
    assert loaded.diffusion_step_choice == choice
    assert (loaded.model.diffusion_step, loaded.model.mean_filter_size) == (choice.diffusion_step,
                                                                           choice.mean_filter_size)  # fmt: skip
    torch.testing.assert_close(loaded.model.normal_error_map, selected["model"].model.normal_error_map)


def test_anomalib_test_with_the_default_model_uses_and_shows_the_choice(
    selected: dict, mvtec_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``anomalib test --model AdvRAD --ckpt_path ...`` builds ``AdvRAD()`` (k = 100, s = 3), then restores."""
    choice = selected["model"].diffusion_step_choice
    model = AdvRAD()
    caplog.set_level(logging.INFO)
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    engine.test(model, datamodule=mvtec_datamodule(mvtec_root), ckpt_path=selected["checkpoint"])
    assert (model.model.diffusion_step, model.model.mean_filter_size) == (choice.diffusion_step,
                                                                         choice.mean_filter_size)  # fmt: skip
    assert f"automatic choice, k = {choice.diffusion_step}, mean filter {choice.mean_filter_size}" in caplog.text


def test_export_uses_the_chosen_k(selected: dict, tmp_path: Path) -> None:
    """``anomalib export`` loads the checkpoint with ``AdvRAD.load_from_checkpoint``, as ``Engine.export`` here; the
    ONNX and OpenVINO graphs are traced from that model, so they read the same k (tests/integration/adv_rad/
    test_export.py checks their parity with PyTorch)."""
    choice, trained = selected["model"].diffusion_step_choice, selected["model"].eval()
    torch_path = Engine(default_root_dir=tmp_path).export(
        AdvRAD(), ExportType.TORCH, export_root=tmp_path, ckpt_path=selected["checkpoint"]
    )
    exported = torch.load(torch_path, weights_only=False)["model"].eval()
    assert (exported.model.diffusion_step, exported.model.mean_filter_size) == (choice.diffusion_step,
                                                                               choice.mean_filter_size)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    images, noise = torch.rand(4, 3, 32, 32, generator=generator), torch.randn(1, 4, 3, 32, 32, generator=generator)
    with torch.no_grad():
        scores = exported.model(images, noise=noise).pred_score
        torch.testing.assert_close(scores, trained.model(images, noise=noise).pred_score)
        exported.model.set_reconstruction(10)  # the tiny model's own k
        assert not torch.allclose(exported.model(images, noise=noise).pred_score, scores, rtol=1e-3)


def test_cli_shorthand_adds_the_callback(mvtec_root: Path, tmp_path: Path, anomalib_cli: Callable[..., str]) -> None:
    with pytest.raises(SystemExit) as exit_info:  # --print_config prints, then exits like the console script
        anomalib_cli("train", "--model", "AdvRAD", "--data", "MVTecAD", f"--data.root={mvtec_root}",
                     "--data.category=disc", "--callbacks", "select_diffusion_step",
                     "--callbacks.init_args.diffusion_steps", "[50, 100]", "--print_config", cwd=tmp_path)  # fmt: skip
    assert not exit_info.value.code
    output = anomalib_cli.last_output()
    assert "class_path: anomalib_robust.callbacks.SelectDiffusionStep" in output
    assert "diffusion_steps:\n      - 50\n      - 100" in output


def test_cpu_recipe_chooses_k_unless_the_callbacks_are_cleared(tmp_path: Path, anomalib_cli: Callable[..., str]) -> None:
    recipe = ["train", "--config", str(CONFIGS / "model" / "adv_rad_cpu.yaml"),
              "--data", str(CONFIGS / "data" / "fashion_mnist.yaml")]  # fmt: skip
    for extra, chooses in (([], True), (["--trainer.callbacks=[]"], False)):
        with pytest.raises(SystemExit) as exit_info:
            anomalib_cli(*recipe, *extra, "--print_config", cwd=tmp_path)
        assert not exit_info.value.code
        output = anomalib_cli.last_output()
        assert ("class_path: anomalib_robust.callbacks.SelectDiffusionStep" in output) is chooses
        assert "mean_filter_size: 5" in output


def test_default_candidates_keep_the_models_mean_filter(tiny_advrad: dict) -> None:
    model = AdvRAD(**{**tiny_advrad, "mean_filter_size": 5})
    assert SelectDiffusionStep()._filter_sizes(model) == (5,)
    assert SelectDiffusionStep(mean_filter_sizes=[3, 7])._filter_sizes(model) == (3, 7)


def test_an_arbitrary_shot_schedule_is_respaced_to_start_at_the_chosen_k(
    selected: dict, tiny_advrad: dict, caplog: pytest.LogCaptureFixture
) -> None:
    chosen = selected["model"].diffusion_step_choice.diffusion_step
    other = 10 if chosen != 10 else 9
    model = AdvRAD(**{**tiny_advrad, "reconstruction": "arbitrary_shot", "step_schedule": [other, other // 2]})
    with caplog.at_level(logging.WARNING):
        model.load_state_dict(torch.load(selected["checkpoint"], weights_only=False)["state_dict"])
        model.on_load_checkpoint(torch.load(selected["checkpoint"], weights_only=False))
    assert model.model.diffusion_step == chosen and model.model.reconstruction == "arbitrary_shot"
    assert model.model.step_schedule[0] == chosen and len(model.model.step_schedule) == min(2, chosen)
    assert "using" in caplog.text
