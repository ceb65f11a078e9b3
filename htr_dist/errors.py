"""The one base class of htr-dist's errors about the user's input."""

import re

# How torch.utils.data re-raises an error of a DataLoader worker process in the main process: the error's class
# called with the worker's whole formatted traceback as its message (torch._utils.ExceptionWrapper.reraise).
_WORKER_ERROR = re.compile(r"Caught (\w+) (in DataLoader worker process \d+)\.\nOriginal Traceback")


class InputError(Exception):
    """A config, data file, model file or installed resource cannot be used; the message names the key, file or
    value at fault and, where there is one, what to do about it. Commands print it as one line, without a traceback:
    it is not a bug in htr-dist.

    Raised in a DataLoader worker, it reaches the main process rebuilt from the worker's traceback text; the message
    is then the original one again, followed by the worker it came from.
    """

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (_message_from_worker(type(self), args[0]),)
        super().__init__(*args)


def _message_from_worker(cls: type, text: str) -> str:
    """The original message inside a re-raised worker error's text (``text`` itself when it is not one)."""
    found = _WORKER_ERROR.match(text)
    last_line = f"\n{cls.__module__}.{cls.__qualname__}: "  # how a traceback ends: module.Class: message
    at = text.rfind(last_line)
    if not found or found.group(1) != cls.__name__ or at < 0:
        return text
    return f"{text[at + len(last_line):].rstrip()} ({found.group(2)})"


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an error's message (its class name if it has none), cut to ``limit`` characters: what a
    one-line report keeps of a library's multi-line message."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]


class TrainingDiverged(InputError):
    """Training cannot go on: the loss, gradients or weights stopped being finite. The message says at which step and
    what was kept; it is the settings (learning rate, data), not a bug in htr-dist."""


class DataFormatError(InputError, ValueError):
    """A data file to import (IAM's XML or lists, a PAGE-XML page, a gt.txt, a split list) does not have the expected
    format, or names an id twice; the message names the file (and line or id)."""
