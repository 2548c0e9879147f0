"""Every error the package raises on purpose. Each carries a one-line message meant for the user (the CLI
prints it as is, without a traceback) saying what is wrong and what to do.

    MinleditsError                 the base: catch this to catch them all
    |- LoadError                   a model that cannot be found, fetched or read             (load.py)
    |  `- SingleFileError          a file that is not a usable original-format checkpoint  (convert.py)
    `- InversionError              an inversion that does not fit the model or the method  (inversion.py)
       `- InversionFileError       an inversion file that cannot be used                     (store.py)
All but the base are also ValueErrors (bad input, in Python's terms).
"""


class MinleditsError(Exception):
    """Base of every error whose message alone tells the user what is wrong and what to do."""


class LoadError(MinleditsError, ValueError):
    """A model that cannot be found, fetched or read."""


class SingleFileError(LoadError):
    """A file that cannot be read as an original Stable Diffusion checkpoint."""


class InversionError(MinleditsError, ValueError):
    """An inversion that does not fit the model or the method it is given to."""


class InversionFileError(InversionError):
    """An inversion file that cannot be used."""


def shorten(value, limit: int = 60) -> str:
    """A value as an error or warning quotes it: its repr (a string in quotes, a number as itself), a string cut to
    its first `limit` characters and "…", so that a message stays a line or two whatever the user typed."""
    if not isinstance(value, str):
        text = repr(value)
        return text if len(text) <= limit else text[:limit] + "…"
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "…"
