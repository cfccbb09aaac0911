"""The error a config that cannot run raises, before any compute."""


class ConfigError(ValueError):
    """A config that cannot run, found before any training compute; the message names the key and the value."""
