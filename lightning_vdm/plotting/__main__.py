"""``lightning-vdm plot``: write figures as PNG files from the command line.

Subcommands: ``derivatives`` (δ' of deformations in paper notation), ``traces`` (a run's logged δ', losses and
effective learning rates from its CSV log) and ``loss-curves`` (curves written by ``FlatnessMonitor``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_USAGE = """usage: lightning-vdm plot {derivatives,traces,loss-curves} ...

Write a figure as a PNG file.

subcommands:
  derivatives   δ'(ℓ) of deformations in paper notation, e.g. "AP(18/pi,1,2,1)" "LE(1,0.99)"
  traces        logged δ'(ℓ), losses and learning rates from a run's metrics.csv
  loss-curves   filter-normalised loss curves (NAME=CURVE.csv pairs written by FlatnessMonitor)

Run `lightning-vdm plot SUBCOMMAND --help` for the options of one."""


def _loss_curves_main(argv: list[str]) -> int:
    from lightning_vdm.plotting.landscape import plot_loss_curves_from_csv

    parser = argparse.ArgumentParser(
        prog="lightning-vdm plot loss-curves",
        description="Draw loss curves around trained weights, one line per run, on one figure.",
    )
    parser.add_argument("curves", nargs="+", metavar="NAME=CSV", help="Run name and curve CSV, e.g. baseline=run/flatness_curve.csv.")
    parser.add_argument("--title", default=None, help="Figure title.")
    parser.add_argument("--out", type=Path, required=True, help="Output image file, e.g. loss_curves.png.")
    args = parser.parse_args(argv)

    paths = {}
    for item in args.curves:
        name, separator, path = item.partition("=")
        if not separator or not name or not path:
            parser.error(f"expected NAME=CSV, got {item!r}")
        paths[name] = path
    try:
        plot_loss_curves_from_csv(paths, args.out, title=args.title)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``lightning-vdm plot SUBCOMMAND ...``; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "derivatives":
        from lightning_vdm.plotting.deformations import main as derivatives_main

        return derivatives_main(rest)
    if command == "traces":
        from lightning_vdm.plotting.traces import main as traces_main

        return traces_main(rest)
    if command == "loss-curves":
        return _loss_curves_main(rest)
    print(f"lightning-vdm plot: unknown subcommand {command!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
