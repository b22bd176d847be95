"""The two error types every layer may raise, kept here so no plane imports another for a type.
Must not: import anything from udpbackend.  str() of each is one line for the user.
"""


class ConfigError(ValueError):
    """A flag, file or datastore value is malformed; str() names what and why."""


class StartupError(RuntimeError):
    """The node could not start; str() is a one-line message for the user."""
