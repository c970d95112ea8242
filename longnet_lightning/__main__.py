"""``python -m longnet_lightning {fit,validate,test,predict,evaluate} ...`` (also ``longnet-lightning``).

``fit``/``validate``/``test``/``predict`` run :class:`~longnet_lightning.cli.LongNetCLI`;
``evaluate`` hands the remaining arguments to ``longnet_lightning.evaluate:main(argv)``.
"""
from __future__ import annotations

import importlib
import sys


def _evaluate(argv: list[str]) -> int | None:
    try:
        module = importlib.import_module("longnet_lightning.evaluate")
    except ModuleNotFoundError as e:
        if e.name != "longnet_lightning.evaluate":
            raise
        print(
            "error: the 'evaluate' subcommand is not available in this installation "
            "(module longnet_lightning.evaluate is missing); use "
            "`python -m longnet_lightning test --config ... --ckpt_path ...` for test-set metrics",
            file=sys.stderr,
        )
        return 2
    return module.main(argv)


def main(argv: list[str] | None = None) -> int | None:
    """Entry point; ``argv`` defaults to ``sys.argv[1:]``."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] == "evaluate":
        return _evaluate(words[1:])
    from .cli import cli_main

    cli_main(None if argv is None else words)  # None: LightningCLI reads sys.argv itself
    return 0


if __name__ == "__main__":
    sys.exit(main())
