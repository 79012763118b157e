"""Errors a user can fix.

Every layer raises these with a message that names the fix; the CLI prints the message as
one line and exits with code 2, the HTTP service answers 4xx. Anything else is a bug.
"""


class DDMError(Exception):
    """A problem in the input or the environment that the user can fix."""


class StoreError(DDMError):
    """The store cannot be reached, read or written (missing bucket, credentials...)."""


class IntegrityError(DDMError):
    """An artifact's bytes no longer match the sha256 its manifest recorded."""


class ManifestError(DDMError):
    """A manifest is missing, malformed, or written by a newer format version."""
