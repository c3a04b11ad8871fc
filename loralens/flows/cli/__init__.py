"""The `loralens` command line: run the pipeline, inspect heads, query the warehouse, check and clean artifacts.

`main` is the console entry point (`loralens = "loralens.flows.cli:main"`); the parser is in parser.py, the commands
in run.py (run), artifacts.py (status, verify, gc, rebuild), query.py (sql, inspect) and plan.py (plan).
"""

from __future__ import annotations

import logging
import sys

from loralens.flows.cli.errors import UsageError, is_user_error, prefect_servers, stop_temporary_server
from loralens.flows.cli.parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `loralens` console command."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    servers_before = prefect_servers()
    try:
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except UsageError as err:
        print(f"loralens: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not is_user_error(err):
            raise
        stop_temporary_server(servers_before)
        print(f"loralens: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
