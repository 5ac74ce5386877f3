"""The one base class of errors caused by the user's input rather than by a bug, and the one line
for a file the machine would not let a command write (`write_failure`).

The CLI prints these as one line and exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import re


class UserError(Exception):
    """Bad input: a config key, a path, a source, a contract. The message names it."""


# what each errno means for a command that writes files, and what to do
WRITE_ERRNOS = {errno.ENOSPC: "no space left on its device; free some, or write elsewhere (--run-dir, --output, "
                              "TMPDIR)",
                errno.EDQUOT: "disk quota exceeded; free some space, or write elsewhere (--run-dir, --output, TMPDIR)",
                errno.EROFS: "read-only file system; give a --run-dir (or --output) that can be written",
                errno.EFBIG: "file too large for this process's limit (ulimit -f)",
                errno.EACCES: ""}
WRITE_MESSAGES = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                  "Read-only file system": errno.EROFS, "File too large": errno.EFBIG}


def write_failure(error: BaseException) -> str | None:
    """One line for a file that could not be written (a full disk, a read-only or forbidden folder),
    found in `error` or what it was raised from or while handling: Python's OSError, h5py's (which
    names the file inside its message) or TensorFlow's (the strerror in its text). None for any other
    error. The path is the file the user knows (`model.keras`, `validation.json`), not the temporary
    name it was being written under (`model.tmp-1a2b3c4d5e6f.keras`, `validation.json.tmp-1a2b3c4d`)."""
    seen = 0
    while error is not None and seen < 8:
        text = str(error)
        code = getattr(error, "errno", None) if isinstance(error, OSError) else None
        code = code if code in WRITE_ERRNOS else next((c for m, c in WRITE_MESSAGES.items() if m in text), None)
        if code is not None:
            path = getattr(error, "filename", None) or next(iter(  # h5py's, Python's inside Beam's, TensorFlow's
                re.findall(r"name = '([^']+)'|\[Errno \d+\] [^:\n]+: '([^']+)'|RESOURCE_EXHAUSTED: ([^;\s]+);", text)),
                None)
            path = next((found for found in path if found), None) if isinstance(path, tuple) else path
            path = re.sub(r"\.tmp-[0-9a-f]{6,}", "", re.sub(r"/\.tmp-[0-9a-f]{6,}/", "/", str(path))) if path else None
            if code == errno.EACCES:  # reading or writing: the path says which
                return f"{path}: permission denied" if path else "permission denied on a file this command uses"
            return f"{'cannot write ' + path + ': ' if path else ''}{WRITE_ERRNOS[code]}"
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None
