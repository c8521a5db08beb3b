"""The ``ggspeed.gct`` section: gradient-constrained training and compressed communication."""

from .base import Section


class GCTConfig(Section):
    """Gradient-constrained training with Exp-Golomb-coded gradient exchange."""

    enabled: bool = False
