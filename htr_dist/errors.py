"""The one base class of htr-dist's errors about the user's input."""


class InputError(Exception):
    """A config, data file, model file or installed resource cannot be used; the message names the key, file or
    value at fault and, where there is one, what to do about it. Commands print it as one line, without a traceback:
    it is not a bug in htr-dist."""
