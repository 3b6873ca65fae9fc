"""The YAML configs build the models they describe, and the CPU preset YAML matches ``AdvRAD.cpu_preset``."""

from pathlib import Path

import pytest
import yaml

from anomalib_robust import AdvRAD
from anomalib_robust.models.adv_rad.lightning_model import CPU_PRESET

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "model"


def test_cpu_preset_yaml_matches_python_preset() -> None:
    init_args = yaml.safe_load((CONFIGS / "adv_rad_cpu.yaml").read_text())["model"]["init_args"]
    assert {name: tuple(v) if isinstance(v, list) else v for name, v in init_args.items()} == CPU_PRESET


@pytest.mark.parametrize("name", ["adv_rad.yaml", "adv_rad_cpu.yaml"])
def test_model_configs_instantiate(name: str) -> None:
    config = yaml.safe_load((CONFIGS / name).read_text())["model"]
    assert config["class_path"] == "anomalib_robust.models.AdvRAD"
    model = AdvRAD(**config["init_args"])
    expected = (256, 256) if name == "adv_rad.yaml" else CPU_PRESET["image_size"]
    assert model.model.image_size == expected


def test_certify_callback_config_instantiates() -> None:
    from anomalib_robust.callbacks import CertifyEval

    (config,) = yaml.safe_load((CONFIGS.parent / "callbacks" / "certify.yaml").read_text())
    assert config["class_path"] == "anomalib_robust.callbacks.CertifyEval"
    callback = CertifyEval(**config["init_args"])
    assert callback.sigmas == [0.0625, 0.125, 0.25]
