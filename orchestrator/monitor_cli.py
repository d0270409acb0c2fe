"""Monitoring subcommands (Flower, watch, report, queue lengths): registered into the CLI by `orchestrator.cli`."""

from __future__ import annotations

COMMANDS: dict = {}


def cmd_flower(args, settings) -> int:
    from orchestrator.flower import run_flower

    return run_flower(settings, port=args.port, address=args.address, basic_auth=args.basic_auth,
                      unauthenticated_api=args.unauthenticated_api, url_prefix=args.url_prefix)


COMMANDS["flower"] = cmd_flower


def add_parsers(sub) -> None:
    """Add this module's subcommands to the `orchestrator` parser."""
    p = sub.add_parser("flower")
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--address", default="")
    p.add_argument("--basic-auth", default=None)
    p.add_argument("--unauthenticated-api", action="store_true")
    p.add_argument("--url-prefix", default=None)
