"""Errors a user can fix: a bad flag or config value, a missing input, an unusable workdir.

Each message names the problem and the fix. `main` prints such an error as one line (absl's
usage error) instead of a traceback; library callers catch the builtin base they already know
(ValueError, FileNotFoundError, FileExistsError).
"""


class UserError(Exception):
  """A problem in what the user gave (flags, config, files), not in the code."""


class BadValue(UserError, ValueError):
  """A flag or config value that cannot work."""


class MissingInput(UserError, FileNotFoundError):
  """A file, folder, checkpoint or upstream stage output that is not there."""


class BadWorkdir(UserError, FileExistsError):
  """A --workdir that cannot hold the experiment (a file, or an old layout)."""
