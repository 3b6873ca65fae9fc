"""``CertifyEval`` on a tiny trained AdvRAD through anomalib's Engine and CLI, its OpenVINO backend, and the
certification example."""

import json
from collections.abc import Callable
from pathlib import Path
from statistics import NormalDist

import pytest
import torch
from anomalib.engine import Engine
from anomalib.models import Padim
from shared_artifacts import mvtec_datamodule
from torch.utils.data import DataLoader

from anomalib_robust import AdvRAD
from anomalib_robust.attacks import DetectorScore
from anomalib_robust.callbacks import CertifyEval
from anomalib_robust.deploy import openvino_score
from anomalib_robust.evaluation.smoothing import noisy_scores
from anomalib_robust.registry import CALLBACKS

N = 40
"""Estimation draws per image: enough to certify something at small radii (12 draws with alpha = 0.1 certify nothing)."""


def test_callback_reports_table_11_shape(
    mvtec_root: Path, advrad_checkpoint: Path, tmp_path: Path, device: torch.device
) -> None:
    datamodule = mvtec_datamodule(mvtec_root)
    model = AdvRAD.load_from_checkpoint(advrad_checkpoint)
    callback = CertifyEval(
        sigmas=(0.125, 0.25), radii=(0.0, 0.05, 0.5), n0=3, n=N, alpha=0.1, batch_size=100, output_dir=tmp_path
    )
    engine = Engine(default_root_dir=tmp_path, logger=False, callbacks=[callback], enable_progress_bar=False,
                    accelerator=device.type)  # fmt: skip
    results = engine.test(model, datamodule=datamodule)

    report = callback.report
    assert report is not None and report.num_samples == 8
    assert [result.sigma for result in report.results] == [0.125, 0.25]
    for result in report.results:
        values = [result.certified_auc[radius] for radius in report.radii]
        assert values == sorted(values, reverse=True), "certified AUC cannot grow with the radius"
        assert values[0] <= result.smoothed_auroc + 1e-9, "certification only removes pairs from the smoothed AUROC"
        # n draws certify at most p = alpha ** (1 / n) (all draws on one side): radius sigma * Phi^-1(p)
        largest = result.sigma * NormalDist().inv_cdf(0.1 ** (1 / N))
        assert all(value == 0 for radius, value in zip(report.radii, values) if radius > largest)
        assert results[0][f"certify/sigma{result.sigma:g}/radius0.05/AUC"] == pytest.approx(values[1])
    assert max(result.certified_auc[0.0] for result in report.results) > 0, "something must be certified at radius 0"
    directory = tmp_path / "certify"
    saved = json.loads((directory / "report.json").read_text())
    assert saved["n"] == N and len(saved["results"]) == 2
    assert len((directory / "report.csv").read_text().splitlines()) == 1 + 2 * 3
    assert (directory / "certified_auc_vs_radius.png").stat().st_size > 0
    assert CALLBACKS["certify"] == "anomalib_robust.callbacks.CertifyEval"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"sigmas": (0.0,)}, "sigma"), ({"radii": (-0.1,)}, "radius"), ({"n0": 0}, "n0"), ({"alpha": 1.5}, "alpha")],
)
def test_callback_rejects_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CertifyEval(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"backend": "tensorrt"}, ValueError, r"backend must be one of \('torch', 'openvino'\), got 'tensorrt'"),
        ({"backend": "openvino", "precision": "fp8"}, ValueError,
         r"precision must be one of \('f32', 'bf16', 'int8'\)"),
        ({"precision": "int8"}, ValueError, "backend='torch' runs the detector in f32, got precision='int8'"),
    ],
)
def test_callback_rejects_bad_backends(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        CertifyEval(**kwargs)


def test_openvino_backend_without_openvino_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openvino_score, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="backend='openvino' needs OpenVINO, which is not installed"):
        CertifyEval(backend="openvino")


def _openvino_computes_in_bf16() -> bool:
    """Whether OpenVINO has bf16 arithmetic on this CPU. openvino (the extra) is imported here, not with the module,
    so that the module's other tests run where it is not installed (the GPU machine)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def test_bf16_runs_only_where_the_cpu_computes_in_bf16() -> None:
    """This CPU's answer decides the expectation: OpenVINO ignores a bf16 hint on a CPU without bf16 arithmetic."""
    if _openvino_computes_in_bf16():
        assert CertifyEval(backend="openvino", precision="bf16").precision == "bf16"
    else:
        with pytest.raises(ValueError, match="precision='bf16' needs a CPU with bf16 arithmetic"):
            CertifyEval(backend="openvino", precision="bf16")


def test_openvino_backend_rejects_models_without_a_one_shot_export(
    mvtec_root: Path, advrad_checkpoint: Path
) -> None:
    loader = _test_loader(mvtec_root)
    callback = CertifyEval(sigmas=(0.25,), n0=1, n=1, backend="openvino")
    with pytest.raises(TypeError, match="Padim has no such export: use backend='torch'"):
        callback.evaluate(Padim(backbone="resnet18", pre_trained=False, layers=["layer1"], n_features=32), loader)
    model = AdvRAD.load_from_checkpoint(advrad_checkpoint)
    model.set_reconstruction(reconstruction="full_shot")
    with pytest.raises(ValueError, match="only one-shot reconstruction"):
        callback.evaluate(model, loader)
    with pytest.raises(ValueError, match="compression_type=int8_ptq calibrates on images: pass the datamodule"):
        CertifyEval(sigmas=(0.25,), n0=1, n=1, backend="openvino", precision="int8").evaluate(
            AdvRAD.load_from_checkpoint(advrad_checkpoint), loader
        )


@pytest.fixture(scope="module")
def exported(advrad_checkpoint: Path) -> tuple[AdvRAD, openvino_score.OpenVINOScore]:
    """The shared tiny AdvRAD and its OpenVINO f32 scorer: exporting takes most of 20 s, so once per module; the tests
    compile it at other precisions (:meth:`~anomalib_robust.deploy.OpenVINOScore.at_precision`) without exporting."""
    model = AdvRAD.load_from_checkpoint(advrad_checkpoint)
    return model, openvino_score.OpenVINOScore(model, "f32", batch_size=16)


@pytest.fixture
def reuse_export(
    exported: tuple[AdvRAD, openvino_score.OpenVINOScore], monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, object]]:
    """``OpenVINOScore(model, ...)`` inside ``CertifyEval`` returns the module's export at the asked precision, after
    checking that it was asked for the same weights; returns the (precision, datamodule) of every call."""
    model, scorer = exported
    calls = []

    def build(detector: AdvRAD, precision: str, datamodule: object = None, batch_size: int | None = None) -> object:
        assert batch_size == CERTIFY_SETTINGS["batch_size"]
        weights = detector.state_dict()
        assert all(torch.equal(weights[name], value) for name, value in model.state_dict().items())
        calls.append((precision, datamodule))
        return scorer if precision == "f32" else scorer.at_precision(precision, datamodule)

    monkeypatch.setattr(openvino_score, "OpenVINOScore", build)
    return calls


def test_openvino_scores_equal_torch_scores_with_the_same_noise(
    exported: tuple[AdvRAD, openvino_score.OpenVINOScore], mvtec_root: Path
) -> None:
    """Same smoothing noise (the generator) and diffusion noise (torch's global RNG): the same raw scores to f32
    rounding. The two draws are independent: changing either one alone changes the scores."""
    model, scorer = exported
    images = torch.cat([batch.image for batch in _test_loader(mvtec_root)])
    detector = DetectorScore(model, eot_samples=1)

    def scores(function: Callable, smoothing_seed: int, diffusion_seed: int) -> torch.Tensor:
        torch.manual_seed(diffusion_seed)
        # 8 images x 5 draws in calls of 16, 16 and 8: the static-batch graph and the dynamic one
        return noisy_scores(function, images, 0.1, 5, 16, torch.Generator().manual_seed(smoothing_seed))

    with detector.prepared():
        reference = scores(lambda x: detector.single_draw(x)[0], 0, 0)
    assert scores(scorer, 0, 0) == pytest.approx(reference, rel=1e-4)
    for other in (scores(scorer, 1, 0), scores(scorer, 0, 1)):
        assert (other - reference).abs().max() > 100 * 1e-4 * reference.abs().max()


CERTIFY_SETTINGS = {"sigmas": [0.125], "radii": [0.0, 0.05], "n0": 5, "n": 12, "alpha": 0.1, "batch_size": 512}
"""Few draws (8 test images x 17 noisy scores): the parity needs the same estimator, not a precise one."""

BF16_TOLERANCE = 2 / 16
"""Two of the 4 x 4 (normal, anomalous) pairs. Measured on this model: bf16 scores within 1.3-1.7e-2 relative of f32;
over 6 (sigma, seed) settings the smoothed AUROC moved by one pair (1/16) once, the certified AUC never."""


def test_openvino_backend_certifies_as_the_torch_backend(
    exported: tuple[AdvRAD, openvino_score.OpenVINOScore], reuse_export: list, mvtec_root: Path
) -> None:
    """f32: the same noisy scores as the PyTorch backend, hence the same smoothed and certified AUC (1e-3); bf16
    within :data:`BF16_TOLERANCE`, on a CPU that computes in bf16."""
    model, _ = exported
    loader = _test_loader(mvtec_root)
    reference = CertifyEval(**CERTIFY_SETTINGS, plots=False).evaluate(model, loader)
    assert reference.backend == "torch"
    (expected,) = reference.results
    assert 0 < expected.smoothed_auroc < 1
    precisions = [("f32", 1e-3)]
    if _openvino_computes_in_bf16():  # elsewhere bf16 is an error (above)
        precisions.append(("bf16", BF16_TOLERANCE))
    for precision, tolerance in precisions:
        callback = CertifyEval(**CERTIFY_SETTINGS, plots=False, backend="openvino", precision=precision)
        report = callback.evaluate(model, loader)
        assert report.backend == f"openvino {precision}"
        (result,) = report.results
        assert result.smoothed_auroc == pytest.approx(expected.smoothed_auroc, abs=tolerance), precision
        assert result.certified_auc == pytest.approx(expected.certified_auc, abs=tolerance), precision
    assert reuse_export == [(precision, None) for precision, _ in precisions]


def test_cli_certifies_on_the_exported_model(
    exported: tuple[AdvRAD, openvino_score.OpenVINOScore],
    reuse_export: list,
    mvtec_root: Path,
    advrad_checkpoint: Path,
    tmp_path: Path,
    anomalib_cli: Callable[..., str],
) -> None:
    """``anomalib test ... --callbacks certify --callbacks.init_args.backend openvino``: the CLI's callback exports
    the checkpoint's weights, names the backend in its report and certifies as the PyTorch backend does on the
    same test images (those of the CLI's datamodule, which the CLI passes for INT8 calibration)."""
    settings = [f"--callbacks.init_args.{key}={json.dumps(value)}" for key, value in CERTIFY_SETTINGS.items()]
    anomalib_cli("test", "--model", "AdvRAD", "--ckpt_path", advrad_checkpoint, *MVTEC_ARGS(mvtec_root),
                 "--callbacks", "certify", *settings, "--callbacks.init_args.backend", "openvino",
                 "--callbacks.init_args.output_dir", tmp_path, "--default_root_dir", tmp_path / "runs",
                 cwd=tmp_path)  # fmt: skip
    saved = json.loads((tmp_path / "certify" / "report.json").read_text())
    assert saved["backend"] == "openvino f32"
    ((precision, datamodule),) = reuse_export
    assert precision == "f32" and datamodule is not None
    model, _ = exported
    (expected,) = CertifyEval(**CERTIFY_SETTINGS, plots=False).evaluate(model, datamodule.test_dataloader()).results
    (result,) = saved["results"]
    assert result["smoothed_auroc"] == pytest.approx(expected.smoothed_auroc, abs=1e-3)
    certified = {float(radius): value for radius, value in result["certified_auc"].items()}
    assert certified == pytest.approx(expected.certified_auc, abs=1e-3)


@pytest.mark.parametrize(
    ("option", "message"),
    [("backend=tensorrt", "backend must be one of"), ("precision=fp8", "precision must be one of")],
)
def test_cli_rejects_a_bad_backend_naming_the_argument(
    option: str, message: str, mvtec_root: Path, advrad_checkpoint: Path, tmp_path: Path,
    anomalib_cli: Callable[..., str],
) -> None:  # fmt: skip
    with pytest.raises((SystemExit, ValueError)) as error:
        anomalib_cli("test", "--model", "AdvRAD", "--ckpt_path", advrad_checkpoint, *MVTEC_ARGS(mvtec_root),
                     "--callbacks", "certify", "--callbacks.init_args.backend=openvino",
                     f"--callbacks.init_args.{option}", cwd=tmp_path)  # fmt: skip
    assert message in anomalib_cli.last_output() + str(error.value)


def MVTEC_ARGS(root: Path) -> list[str]:  # noqa: N802
    return ["--data", "anomalib.data.MVTecAD", "--data.root", str(root), "--data.category", "disc",
            "--data.eval_batch_size", "4", "--data.num_workers", "0"]  # fmt: skip


def _test_loader(mvtec_root: Path) -> DataLoader:
    datamodule = mvtec_datamodule(mvtec_root)
    datamodule.setup()
    return datamodule.test_dataloader()


def test_example_runs_with_tiny_settings(run_example: Callable[..., str], tmp_path: Path) -> None:
    output = run_example("certify_adv_rad.py", "--tiny", "--output", tmp_path, cwd=tmp_path)
    assert "Certified AUC" in output
    assert (tmp_path / "certify" / "certified_auc_vs_radius.png").is_file()

