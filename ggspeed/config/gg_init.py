"""The ``ggspeed.gg_init`` section: GG Init settings (filled in by the GG Init feature)."""

from .base import Section


class GGInitConfig(Section):
    """Generalized-Gaussian weight initialization."""

    enabled: bool = False
