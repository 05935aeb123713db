"""ancre-lightning: research on how the layers of deep networks are wired.

``ancre_lightning.rewire(model, connectivity)`` wires the residual blocks of a model you already
have (timm, diffusers, any stack of blocks); see :mod:`ancre_lightning.rewiring`.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # imported on first use: `import ancre_lightning` stays light for the CLI's start-up
    if name == "rewire":
        from .rewiring import rewire

        globals()["rewire"] = rewire
        return rewire
    raise AttributeError(f"module 'ancre_lightning' has no attribute {name!r}")
