"""Prefect flows chaining the cached `tasks/`.

Every flow is declared with `persist_result=False`: what it returns is a manifest it also writes to the store itself,
and a Prefect result record names its own serializer (pickle included), so dapt keeps none of its own records in a
worker's default result storage (a retry re-enters a finished subflow through its cached tasks instead). The stages'
results live in the store through dapt's own storage, set on each task (tasks/caching.py)."""

import os

# The project runs offline by default: keep the embedded Prefect server from phoning home.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Third-party progress bars and advice (lm-eval, datasets, transformers, the Hub) would bury the few lines a user
# reads, in a terminal and in a flow run's logs alike; these settings are read when those libraries are imported, so
# they are set before anything here imports them. A user's own setting wins. dapt's own progress is unaffected.
for _name, _value in {
    "TQDM_DISABLE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}.items():
    os.environ.setdefault(_name, _value)


def _library_logs_to_flow_runs() -> None:
    """dapt_core logs to the `dapt.*` loggers (a resume, a rollback, a checkpoint's decision, warnings). Prefect sends
    only its own loggers to the flow-run logs, and PREFECT_LOGGING_EXTRA_LOGGERS is read once, when Prefect sets up
    logging, which in a worker happens before this package is imported: attach its API handler here instead. Outside a
    flow or task run the records stay local (no warning per line)."""
    import logging
    import sys

    from prefect.exceptions import MissingContextError
    from prefect.logging.handlers import APILogHandler

    class LibraryLogsToRun(APILogHandler):
        def handleError(self, record: logging.LogRecord) -> None:
            if not isinstance(sys.exc_info()[1], MissingContextError):
                super().handleError(record)

    logger = logging.getLogger("dapt")
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(LibraryLogsToRun(level=logging.INFO))
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


_library_logs_to_flow_runs()
