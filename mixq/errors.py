"""User-facing errors: the CLI prints these as one line, without a traceback."""


class MixqError(Exception):
    """A problem with the user's input or environment (bad file, unknown name, full disk...).

    The message must name the file/tensor concerned and say what to do.
    """
