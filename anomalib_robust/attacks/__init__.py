"""Score-direction adversarial attacks on anomalib detectors (AdvRAD paper, sec. 3).

Every attack maximises ``y * A(x)`` on [0, 1] images, with ``A`` the detector's raw anomaly score and ``y = +1`` for
normal, ``-1`` for anomalous samples, and leaves the model as it found it.

Example:
    >>> from anomalib_robust.attacks import PGD, build_attack
    >>> adversarial = PGD(model, eps=2 / 255, steps=10)(batch.image, batch.gt_label)  # doctest: +SKIP
    >>> attack = build_attack("square", model, eps=0.2, norm="L2", n_queries=500)  # doctest: +SKIP
"""

import inspect
from typing import Any

from torch import nn

from anomalib_robust.attacks.apgd import APGD
from anomalib_robust.attacks.autoattack import AutoAttack
from anomalib_robust.attacks.base import Attack
from anomalib_robust.attacks.bpda import BPDA
from anomalib_robust.attacks.detector import DetectorScore, NotDifferentiableError
from anomalib_robust.attacks.objective import attack_objective, score_direction
from anomalib_robust.attacks.pgd import PGD
from anomalib_robust.attacks.square import Square
from anomalib_robust.attacks.unmasking import unmasked_gradients

ATTACKS: dict[str, type[Attack]] = {"pgd": PGD, "apgd": APGD, "square": Square, "autoattack": AutoAttack}
"""Attacks by the name used in configs (``RobustEval(attacks=["pgd", "square"])``)."""


def build_attack(name: str | type[Attack], model: nn.Module, **settings: Any) -> Attack:
    """Attack ``name`` (a key of :data:`ATTACKS`, case-insensitive, or an :class:`Attack` class) on ``model``.

    Settings the attack does not take (``n_queries`` for PGD, ``steps`` for Square) are ignored, so one settings
    dict can configure several attacks.

    Raises:
        ValueError: for an unknown name.
    """
    attack_class = name if isinstance(name, type) else ATTACKS.get(name.lower().replace("-", "").replace("_", ""))
    if attack_class is None:
        msg = f"Unknown attack {name!r}: expected one of {sorted(ATTACKS)}."
        raise ValueError(msg)
    accepted = inspect.signature(attack_class).parameters
    return attack_class(model, **{key: value for key, value in settings.items() if key in accepted})


__all__ = [
    "APGD",
    "ATTACKS",
    "BPDA",
    "PGD",
    "Attack",
    "AutoAttack",
    "DetectorScore",
    "NotDifferentiableError",
    "Square",
    "attack_objective",
    "build_attack",
    "score_direction",
    "unmasked_gradients",
]
