"""One exception tree for facemend. Every message names the file and the problem.

Each error class carries the CLI exit code that reports it (documented in the README and in
``cli.py --help``).
"""
from __future__ import annotations

import errno


# The CLI's exit codes, one line each: the CLI's --help prints this table (``exit_codes_text``),
# the README's table lists the same codes (a test checks both against the error classes).
EXIT_CODES: dict[int, str] = {
    0: "done",
    1: "unexpected failure (a bug: please report it with the log), or a model that cannot be loaded",
    2: "input not found; a usage error or a bad FACEMEND_* setting",
    3: "bad input: not a video/image, not a regular file (FIFO, device), corrupt or truncated, "
       "no video stream, a spliced stream whose timestamps restart, empty folder",
    4: "output problem: exists (use --overwrite), equals the input, is a folder, a format not "
       "written, cannot be written (no permission, read-only, a file in its path, disk full)",
    5: "cancelled",
    6: "folder job finished but some files failed (listed on stderr)",
    7: "broker or job store unreachable (refused, wrong password, TLS)",
    8: "no such job id (never submitted, or its record expired)",
    9: "wait --timeout expired while the job was still running",
    75: "worker: it stopped taking its queues' messages and could not restart in place "
        "(start it again)",
    130: "interrupted (Ctrl-C); no partial file is left at the output path",
    143: "terminated (SIGTERM); the same clean-up as Ctrl-C",
}


def exit_codes_text(width: int = 96) -> str:
    """``EXIT_CODES`` as the CLI's epilog: one entry a code, wrapped under its text."""
    import textwrap

    lines = ["exit codes:"]
    for code, text in EXIT_CODES.items():
        head = f"  {code:<3} "
        lines += textwrap.wrap(text, width, initial_indent=head, subsequent_indent=" " * len(head))
    lines.append("  wait, submit --wait: the job's outcome (0 done, 3/4 its error, 5 cancelled, "
                 "6 some files failed)")
    return "\n".join(lines) + "\n"


class FacemendError(Exception):
    """Raised for any failure facemend reports to its user. ``exit_code`` is the CLI's status."""

    exit_code = 1


class InputError(FacemendError, ValueError):
    """Raised when an input file or folder cannot be processed as asked."""

    exit_code = 3


class InputNotFound(InputError, FileNotFoundError):
    """Raised when the input path does not exist."""

    exit_code = 2


class UnsupportedInput(InputError):
    """Raised when a file is not a video or image facemend can read (or has no video stream)."""


class CorruptInput(InputError):
    """Raised when a media file is truncated or its data cannot be decoded."""


class OutputError(FacemendError):
    """Raised when the output path is unusable: equal to the input, existing, not writable."""

    exit_code = 4


class OutputExists(OutputError, FileExistsError):
    """Raised when the output exists and ``--overwrite`` was not given."""


class OutputUnwritable(OutputError):
    """Raised when the output cannot be written at all (no permission, a read-only or full
    disk, a file where a folder should be): a folder job stops at once instead of failing
    every file the same way. ``reason``: the words after the path."""

    reason = ""


# errno -> the words an output error says (anything else: the system's own text)
_OUTPUT_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a parent of the path is a file, not a folder",
    errno.EISDIR: "it is a folder",
    errno.EFBIG: "file too large for the file system",
    errno.ENAMETOOLONG: "file name too long",
}


def output_error(path, e: OSError) -> OutputUnwritable:
    """The one-line OutputError for an OSError met while writing ``path``."""
    reason = _OUTPUT_ERRNOS.get(e.errno) or e.strerror or str(e) or type(e).__name__
    error = OutputUnwritable(f"{path}: cannot write the output ({reason})")
    error.reason = reason
    return error


def is_output_oserror(e: BaseException) -> bool:
    """True for an OSError that says the output's storage refuses the write (full, read-only,
    no permission), as opposed to bad data or a bug."""
    return isinstance(e, OSError) and e.errno in _OUTPUT_ERRNOS


class ModelError(FacemendError):
    """Raised when a task's model cannot be loaded (weights missing or unreadable)."""


class Cancelled(FacemendError):
    """Raised inside a job when its cancel flag is seen between batches."""

    exit_code = 5


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process is sent SIGTERM: the job unwinds as on Ctrl-C
    (temporary files and folders removed, nothing at the output path) and the CLI exits 143."""

    exit_code = 143
