"""``python -m anomalib_robust.leaderboard``: the ``anomalib robust_benchmark`` command without anomalib's CLI.

Example:
    $ python -m anomalib_robust.leaderboard --config configs/benchmark/robust_tiny.yaml
    $ python -m anomalib_robust.leaderboard --merge runs/a runs/b --output_dir runs/merged
"""

import sys
from collections.abc import Sequence

from anomalib_robust.leaderboard.pipeline import RobustBenchmark


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (``sys.argv[1:]`` by default), run or merge; 1 when a cell failed or the input is invalid."""
    parser = RobustBenchmark.get_parser()
    parser.prog = "python -m anomalib_robust.leaderboard"
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        results = RobustBenchmark().run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    failed = [cell for cell in (results or {}).get("cells", []) if cell["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
