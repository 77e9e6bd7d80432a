"""The configuration: the frozen model (config.model) and the node reader (config.reader).
Reading a file is `mailwarden.config.build.load` (or `parse` for text): it needs the checks,
which validate their own arguments, and the checks need the model; keeping `build` out of
this package's namespace keeps that a line, not a cycle."""

from mailwarden.config.model import (
    ACTIONS,
    LOG_LEVELS,
    MODES,
    STAGES,
    TRANSPORTS,
    Condition,
    Config,
    DmarcConfig,
    DNSConfig,
    LimitsConfig,
    Outcome,
    RuleConfig,
    SigningConfig,
    default_workers,
)
from mailwarden.config.reader import ConfigError, Section, as_section
from mailwarden.verdict import Reply

__all__ = ["ACTIONS", "LOG_LEVELS", "MODES", "STAGES", "TRANSPORTS", "Condition", "Config",
           "ConfigError", "DNSConfig", "DmarcConfig", "LimitsConfig", "Outcome", "Reply",
           "RuleConfig", "Section", "SigningConfig", "as_section", "default_workers"]
