"""Errors that mean "the input is wrong": the CLI prints their message alone, without a traceback."""


class UserInputError(ValueError):
    """A configuration, data path or checkpoint that cannot work; the message says how to fix it.

    ``ancre`` prints ``error: <message>`` and exits with status 2; set ``ANCRE_DEBUG=1`` to see
    the traceback as well.
    """
