"""Short names of the plugin's callbacks for the ``anomalib`` command (``--callbacks robust_eval``).

The packages that define callbacks register them here when imported; :mod:`anomalib_robust.cli` reads the names. The
registry lives apart from the CLI so that the library never imports its command-line layer.

Example:
    >>> from anomalib_robust.registry import CALLBACKS, register_callback
    >>> register_callback("robust_eval", "anomalib_robust.callbacks.RobustEval")
    >>> CALLBACKS["robust_eval"]
    'anomalib_robust.callbacks.RobustEval'
"""

CALLBACKS: dict[str, str] = {}
"""Callback shorthands for ``--callbacks NAME``: name -> class path."""


def register_callback(name: str, class_path: str) -> None:
    """Make ``--callbacks <name>`` resolve to ``class_path`` in the ``anomalib`` command."""
    CALLBACKS[name] = class_path
