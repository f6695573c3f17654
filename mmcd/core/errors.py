"""The exception of a setting or input a user gave that cannot work."""


class ConfigError(ValueError):
    """A bad option, a mixed-precision rule matching no layer, fewer
    calibration images than asked for, a float checkpoint under a QAT model:
    what the user must change, said in the message. mmcd's command-line
    tools print it as one ``error:`` line; elsewhere it is a ``ValueError``.
    """
