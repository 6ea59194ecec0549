"""Exceptions of the converter. The CLI turns them into a message and a non-zero exit code."""


class ConversionError(ValueError):
    """The input cannot be converted as given (bad key, shape, dtype, config, or file)."""


class UnsupportedFormatError(ConversionError, NotImplementedError):
    """The input is a recognised format this converter does not implement yet."""
