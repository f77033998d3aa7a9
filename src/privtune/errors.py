"""Errors that name the offending field and the fix, so a user can act on them.

Messages never include record text: a bad record is identified by its file and line number.
"""


class PrivtuneError(Exception):
    """Base class: a user-facing error with a field name and a suggested fix."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}. Fix: {fix}")

    def __reduce__(self) -> tuple:
        # rebuilt from its own arguments: a Ray task's failure travels pickled to the flow
        return type(self), (self.field, self.problem, self.fix)


class ConfigError(PrivtuneError):
    """A parameter in params.yaml is missing, malformed or impossible."""


class DataError(PrivtuneError):
    """An input dataset cannot be used (format, missing column, empty)."""


class ModelError(PrivtuneError):
    """A model directory is missing or cannot be loaded."""


class ServerError(PrivtuneError):
    """A service privtune talks to (the MLflow tracking server, PostgreSQL, a server we start)
    does not answer. Unlike the others it may pass on a retry: the CLI exits 6, not 2."""


class BudgetExhausted(RuntimeError):
    """The budget guard refused a step: spending it would exceed the target epsilon."""


class AuditViolation(RuntimeError):
    """The empirical privacy audit found more leakage than the claimed epsilon allows.

    Under a correct implementation this happens with probability at most 1 - confidence;
    treat it as a bug in the privacy code until shown otherwise.
    """
