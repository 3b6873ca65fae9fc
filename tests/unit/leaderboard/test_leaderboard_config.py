"""The leaderboard YAML: the shipped grids parse, and bad input is an error that names the key."""

import copy
from pathlib import Path

import pytest
import yaml

from anomalib_robust.leaderboard.config import LeaderboardConfigError, load_config, model_label, parse_config

REPO = Path(__file__).resolve().parents[3]
TINY = yaml.safe_load((REPO / "configs/benchmark/robust_tiny.yaml").read_text())


def _tiny(**changes: object) -> dict:
    config = copy.deepcopy(TINY)
    config["robust_benchmark"].update(changes)
    return config


def test_the_default_grid_is_the_issues_grid() -> None:
    config = load_config(REPO / "configs/benchmark/robust_fashion_mnist.yaml")
    labels = list(dict.fromkeys(model_label(group.model) for group in config.groups))
    purified = "Purified(Padim, DiffPure p=25)"
    assert labels == ["AdvRAD", "PatchGuard", "Padim", "Patchcore", "Stfpm", "Fastflow", purified]
    assert len(config.groups) == 7 * 10
    assert {group.data["init_args"]["category"] for group in config.groups} == {
        "t_shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
    }  # fmt: skip
    assert {group.data["init_args"]["protocol"] for group in config.groups} == {"defect"}
    assert [(t.norm, t.eps) for t in config.threat_models] == [("Linf", (2 / 255,)), ("L2", (0.2,))]
    assert config.evaluator["attacks"] == ["pgd"] and config.evaluator["sanity_checks"] is True
    assert config.random_init_backbones
    for group in config.groups:  # no download: every backbone that can be pretrained is asked not to be
        args = group.model["init_args"]
        assert args.get("pre_trained", False) is False
    defended = config.groups[-1].model
    assert defended["defense"]["class_path"] == "anomalib_robust.defenses.purifiers.DiffPure"
    assert defended["defense"]["init_args"] == {"level": 25}


def test_tiny_grid_expands_models_then_categories() -> None:
    config = parse_config(TINY, base_dir=Path("/base"))
    assert [(group.key, group.data["init_args"]["category"]) for group in config.groups] == [
        ("robust_benchmark.model.grid[0]", "trouser"), ("robust_benchmark.model.grid[0]", "bag"),
        ("robust_benchmark.model.grid[1]", "trouser"), ("robust_benchmark.model.grid[1]", "bag"),
    ]  # fmt: skip
    assert config.groups[0].model["class_path"] == "anomalib.models.image.padim.lightning_model.Padim"
    assert config.output_dir == Path("/base/runs/robust_benchmark/tiny")
    assert config.accelerator == ["cpu"]


def test_default_threat_models_are_the_advrad_papers() -> None:
    config = copy.deepcopy(TINY)
    del config["robust_benchmark"]["robust_eval"]["threat_models"]
    assert [(t.norm, t.eps) for t in parse_config(config).threat_models] == [("Linf", (2 / 255,)), ("L2", (0.2,))]


def _with_model(index: int, **changes: object) -> dict:
    config = copy.deepcopy(TINY)
    config["robust_benchmark"]["model"]["grid"][index].update(changes)
    return config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_with_model(1, class_path="AdvRed"), r"robust_benchmark\.model\.grid\[1\]\.class_path: unknown AnomalibModule 'AdvRed'"),
        (_with_model(0, class_path="no.such.Model"), r"robust_benchmark\.model\.grid\[0\]\.class_path: cannot import"),
        (_with_model(0, init_args={"backbon": "resnet18"}), r"grid\[0\]\.init_args: unknown Padim argument\(s\) \['backbon'\]"),
        (_with_model(0, image_size=[32]), r"grid\[0\]\.image_size: expected a positive int or \[height, width\]"),
        (_with_model(0, epochs=3), r"grid\[0\]: unknown key\(s\) \['epochs'\]"),
        (_with_model(0, defense={"class_path": "DiffPure", "init_args": {"level": 25}}), r"grid\[0\]\.defense\.denoiser: missing"),
        (_with_model(0, defense={"class_path": "Padim"}), r"grid\[0\]\.defense\.class_path: unknown DiffusionPurifier 'Padim'"),
        (_tiny(seed="zero"), r"robust_benchmark\.seed: expected an integer"),
        (_tiny(modle={}), r"robust_benchmark: unknown key\(s\) \['modle'\]"),
        ({"benchmark": {}}, r"robust_benchmark: missing"),
        ({**TINY, "accelerator": "tpu"}, r"accelerator\[0\]: expected 'cpu' or 'cuda'"),
    ],
)  # fmt: skip
def test_bad_model_entries_name_their_key(config: dict, message: str) -> None:
    with pytest.raises(LeaderboardConfigError, match=message):
        parse_config(config)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"class_path": "FashionMnistt"}, r"robust_benchmark\.data\.class_path: unknown AnomalibDataModule 'FashionMnistt'"),
        ({"class_path": "Padim"}, r"robust_benchmark\.data\.class_path: unknown AnomalibDataModule 'Padim'"),
        ({"class_path": "FashionMNIST", "init_args": {"categroy": "bag"}}, r"data\.init_args: unknown FashionMNIST argument"),
        ({"class_path": "FashionMNIST", "options": {}}, r"robust_benchmark\.data: unknown key\(s\) \['options'\]"),
    ],
)  # fmt: skip
def test_bad_datamodules_name_their_key(data: dict, message: str) -> None:
    with pytest.raises(LeaderboardConfigError, match=message):
        parse_config(_tiny(data=data))


@pytest.mark.parametrize(
    ("robust_eval", "message"),
    [
        ({"threat_models": [{"norm": "Linf", "eps": -1}]}, r"threat_models\[0\]\.eps: expected a positive radius"),
        ({"threat_models": [{"norm": "L1", "eps": 0.1}]}, r"robust_eval\.threat_models\[0\] or robust_benchmark\.robust_eval"),
        ({"threat_models": []}, r"robust_eval\.threat_models: expected a non-empty list"),
        ({"eps": [0.1]}, r"robust_eval\.eps: not allowed here"),
        ({"stepz": 3}, r"robust_eval: not a RobustEvaluator argument"),
        ({"attacks": ["fgsm"]}, r"Unknown attack 'fgsm'"),
    ],
)  # fmt: skip
def test_bad_evaluator_settings_name_their_key(robust_eval: dict, message: str) -> None:
    with pytest.raises(LeaderboardConfigError, match=message):
        parse_config(_tiny(robust_eval=robust_eval))


def test_unknown_class_names_are_listed() -> None:
    with pytest.raises(LeaderboardConfigError, match=r"expected one of \[.*'AdvRAD'.*'Padim'.*'PatchGuard'"):
        parse_config(_with_model(0, class_path="Padimm"))


def test_missing_config_file_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--config: no such file"):
        load_config(tmp_path / "missing.yaml")
