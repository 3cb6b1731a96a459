"""When Prefect may retry a failed task: only if running it again can help (dapt_core.faults.worth_retrying).

Store failures were already retried within DAPT_STORE_RETRY_SECONDS, and bad input, a changed input, missing
credentials or a corrupted artifact fail the same way every time: retrying them only delays the one clear error.
"""

from __future__ import annotations

from dapt_core.faults import worth_retrying


def retry_if_worthwhile(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry unexpected errors, never the expected ones dapt classifies."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, BaseException) or worth_retrying(exc)
