"""The error every data reader raises (pipeline.data re-exports it): a data set that cannot be read as
asked; and the one line every entry point prints for an operating-system error it did not foresee."""

import errno

# What the file system said, in words a user acts on (strerror's "[Errno 28]" and a traceback do not).
ERRNO_WORDS = {
    errno.ENOSPC: "no space left on its file system",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "a read-only file system",
    errno.ENAMETOOLONG: "a name too long for the file system (255 bytes a component)",
    errno.EACCES: "permission denied",
    errno.EPERM: "not permitted",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a file where a folder was expected",
    errno.EISDIR: "a folder where a file was expected",
    errno.EIO: "an input/output error (a failing disk or a lost mount)",
}


class DataError(ValueError):
    """A data set that cannot be read as asked; the message names the path and what was expected."""


def os_error_line(error: OSError) -> str:
    """`error` as one line naming the path (when the system named one) and the problem in words."""
    words = ERRNO_WORDS.get(error.errno) or error.strerror or str(error) or type(error).__name__
    where = error.filename if error.filename is not None else None
    if type(error).__str__ is not OSError.__str__:  # an error of the project's own with its own message
        return str(error)
    return f"{where}: {words}" if where is not None else words
