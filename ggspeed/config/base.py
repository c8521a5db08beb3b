"""Base model for every ggspeed config section: strict, so that a typo is an error, not a default."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown keys are rejected, assignments are validated, values are frozen
    into plain Python types so the section hashes and pickles the same on every rank."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)
