"""The ``ggspeed.act`` section: activation-constrained training settings."""

from .base import Section


class ACTConfig(Section):
    """Activation-constrained training and compressed activation checkpoints."""

    enabled: bool = False
