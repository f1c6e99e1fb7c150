"""The exceptions the CLI turns into a single line on stderr, and the exit status of each.

exit 0  success
exit 1  an unexpected error (a bug: `onnx-neq --debug ...` shows the traceback)
exit 2  bad input or a problem of the environment (missing file, disk full, read-only, locked run)
exit 3  training diverged (non-finite or exploding loss, non-finite weights)
exit 130 interrupted (Ctrl-C); a run continues with `--resume`
"""

from __future__ import annotations

EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


class NeqError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""

    exit_code = EXIT_BAD_INPUT


class DivergedError(NeqError):
    """Training diverged; the run keeps its last good epoch."""

    exit_code = EXIT_DIVERGED


class InterruptedRun(NeqError):
    """The user interrupted a run (Ctrl-C); the message says how to continue it."""

    exit_code = EXIT_INTERRUPTED


def environment_error(exc: OSError, action: str = "write", hint: str = "") -> NeqError:
    """An OSError (disk full, read-only, permission) as one line naming the path and the fix."""
    path = exc.filename or "a file"
    reason = exc.strerror or str(exc)
    message = f"cannot {action} {path}: {reason}"
    return NeqError(message + (f"; {hint}" if hint else ""))


def user_error_in_chain(exc: BaseException) -> NeqError | None:
    """The NeqError behind `exc`, if any (onnx_ir wraps errors raised inside a pass in PassError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, NeqError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def is_runtime_error(exc: BaseException) -> bool:
    """True for the exceptions ONNX Runtime raises on a model or checkpoint it cannot load or run."""
    return type(exc).__module__.startswith("onnxruntime") or isinstance(exc, RuntimeError | UnicodeError)  # a damaged name: not UTF-8


def first_line(exc: BaseException) -> str:
    """The last non-empty line of an exception's text (native errors put the reason last), shortened."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else exc.__class__.__name__)[:160]
