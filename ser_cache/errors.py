"""The project's errors for bad input or settings: each message names the fix.

Three tiers: bad input or config raises a `UserError` subclass (the command line
prints its message as one line and exits 1); a broken internal invariant is an `assert`; a
bad file in a batch is logged, skipped, counted and summarised. Anything else that escapes is
a bug and keeps its traceback. Each stage has its own subclass (CacheError, FoldsError, ...);
`OptionError` is for a command-line option or setting that cannot be used as given.
"""


class UserError(Exception):
    """Bad input or settings; the message says what is wrong and how to fix it."""


class OptionError(UserError, ValueError):
    """An option or setting that cannot be used as given (--layers, --shard, --device, ...)."""
