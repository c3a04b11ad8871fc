"""The command line's errors: one line on stderr with exit code 2 for what a user can fix, Prefect's failure lines
kept off the terminal."""

from __future__ import annotations

import logging
import sys

# Errors a user can fix; they print as one line instead of a traceback. Named by (module, class) and looked up only
# in modules already imported (a command that never imported a module cannot raise its errors), so that start-up
# imports none of them: `loralens --help` and `loralens sql` never import torch or Prefect.
USER_ERROR_CLASSES = (
    ("loralens.config", "ConfigError"), ("loralens.warehouse.corpus", "CorpusError"),
    ("loralens.lens.runtime.models", "ModelLoadError"),
    ("loralens.lens.runtime.adapters", "UnsupportedArchitectureError"),
    ("loralens.warehouse.artifacts", "ArtifactError"), ("loralens.warehouse.db", "WarehouseLockedError"),
    ("loralens.tasks.stages.train", "TrainingInterrupted"), ("loralens.lens.memory.training_plan", "PlanError"),
    ("loralens.lens.lenses.readout", "LensMismatchError"), ("loralens.lens.evaluation.scorers", "ScorerError"),
    ("loralens.lens.memory.stage_memory", "MemoryBudgetError"), ("loralens.lens.runtime.lean", "LeanLoadError"),
    ("loralens.api", "ApiError"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    """Return the user-error classes of the modules imported so far."""
    return tuple(getattr(sys.modules[mod], name) for mod, name in USER_ERROR_CLASSES if mod in sys.modules)


def is_user_error(err: BaseException | None) -> bool:
    """Return True when `err` is an error the user can fix (printed as one line, exit 2)."""
    return err is not None and isinstance(err, user_errors())


class UsageError(Exception):
    """A bad command line (unknown option, bad value): printed as one line, exit 2."""


# What Prefect's engines log about a failed run: the exception with its traceback, then the final state.
_FAILURE_MARKS = ("Encountered exception", "encountered an exception", "Finished in state Failed",
                  "Task run failed with exception", "Flow run failed", "Crashed")


class _DropUserErrorLines(logging.Filter):
    """Keep Prefect's lines about a run that failed on a user error off the terminal (the CLI prints one line).

    Installed on the terminal handlers only: the flow-run log (Prefect's API handler) keeps every line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and is_user_error(record.exc_info[1]):
            return False
        if not record.name.startswith("prefect") or record.levelno < logging.INFO:
            return True
        message = record.getMessage()
        if not any(mark in message for mark in _FAILURE_MARKS):
            return True
        return not any(f"{cls.__name__}:" in message or f"{cls.__name__}(" in message for cls in user_errors())


def quiet_user_error_logs() -> None:
    """Install the filter on every terminal handler of the root and Prefect loggers (not on Prefect's API ones)."""
    from prefect.logging.handlers import APILogHandler

    for name in (None, "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, APILogHandler) and not any(
                    isinstance(f, _DropUserErrorLines) for f in handler.filters):
                handler.addFilter(_DropUserErrorLines())


def prefect_servers() -> set[int]:
    """Return the ids of the temporary Prefect servers this process runs now (none before Prefect is imported)."""
    server = sys.modules.get("prefect.server.api.server")
    return set() if server is None else {id(s) for s in server.SubprocessASGIServer._instances.values()}


def stop_temporary_server(running_before: set[int]) -> None:
    """Stop the temporary Prefect server this command started (not one in `running_before`, e.g. a test harness's),
    without its "Stopping temporary server" line: it would otherwise stop at exit and print that line after the
    error, which must be the last line printed."""
    server = sys.modules.get("prefect.server.api.server")
    started = [] if server is None else [s for s in list(server.SubprocessASGIServer._instances.values())
                                         if id(s) not in running_before]
    if not started:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):  # what the run still sends goes while the server listens
        worker.drain_all(timeout=5)
    prefect_logger = logging.getLogger("prefect")
    level = prefect_logger.level
    prefect_logger.setLevel(logging.WARNING)
    try:
        for instance in started:
            instance.stop()
    finally:
        prefect_logger.setLevel(level)
