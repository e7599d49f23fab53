"""`python -m placement COMMAND ...`: profile, analytic, plan, simulate (each takes --help)."""

from __future__ import annotations

import sys

COMMANDS = {
    "profile": ("placement.profiler", "measure this machine's step times into a profile"),
    "analytic": ("placement.analytic", "a roofline profile for a model on a device spec"),
    "plan": ("placement.plan", "search placements, write serve_config.yaml"),
    "simulate": ("placement.simulate", "one given placement under a workload"),
}


def usage() -> str:
    lines = ["usage: python -m placement COMMAND [--help] ...", "", "commands:"]
    lines += [f"  {name:<9} {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import importlib

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] not in COMMANDS:
        raise SystemExit(f"unknown command {argv[0]!r}\n\n{usage()}")
    module, _ = COMMANDS[argv[0]]
    sys.argv[0] = f"python -m placement {argv[0]}"  # argparse names the command in its usage
    importlib.import_module(module).main(argv[1:])


if __name__ == "__main__":
    main()
