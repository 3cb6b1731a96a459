"""dapt: domain-adaptive continual pretraining without forgetting.

`dapt_core` is the plain-Python library; `tasks/` and `flows/` wrap it for Prefect.
"""

__version__ = "0.1.0"
