"""ancre-lightning: research on how the layers of deep networks are wired."""

__version__ = "0.1.0"
