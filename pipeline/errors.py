"""The error every data reader raises (pipeline.data re-exports it): a data set that cannot be read as
asked."""


class DataError(ValueError):
    """A data set that cannot be read as asked; the message names the path and what was expected."""
