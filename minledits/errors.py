"""The package's error type: anything raised as a MinleditsError carries a one-line message meant for the
user (the CLI prints it as is, without a traceback)."""


class MinleditsError(Exception):
    """Base of every error whose message alone tells the user what is wrong and what to do."""
