"""Exceptions the product raises on purpose, each with a message a radiologist can act on."""


class LiverLesionAIError(Exception):
    """Base of every error LiverLesionAI raises deliberately."""


class InputError(LiverLesionAIError, ValueError):
    """An input file or folder is missing, unreadable, or not an image we can use."""


class ModelFileError(LiverLesionAIError):
    """A model weights file is missing, corrupt or does not match the code."""


class OutputError(LiverLesionAIError):
    """A result could not be written (folder missing, file exists, disk full...)."""
