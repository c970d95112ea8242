"""``python -m longnet_lightning {fit,validate,test,predict,evaluate} ...`` (also ``longnet-lightning``).

``fit``/``validate``/``test``/``predict`` run :class:`~longnet_lightning.cli.LongNetCLI`;
``evaluate`` hands the remaining arguments to :func:`longnet_lightning.evaluation.command.main`
(without importing the training CLI).
"""
from __future__ import annotations

import importlib
import sys

EVALUATE_MODULE = "longnet_lightning.evaluation.command"


def main(argv: list[str] | None = None) -> int | None:
    """Entry point; ``argv`` defaults to ``sys.argv[1:]``."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] == "evaluate":
        return importlib.import_module(EVALUATE_MODULE).main(words[1:])
    from .cli import cli_main

    cli_main(None if argv is None else words)  # None: LightningCLI reads sys.argv itself
    return 0


if __name__ == "__main__":
    sys.exit(main())
