"""Exceptions of the service, under one root class."""


class LicenseReportError(Exception):
    """Root of all errors raised by license-report."""


class RejectedEvent(LicenseReportError):
    """An event that cannot be decoded or validated; it goes to the dead letters."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SchemaOutOfDate(LicenseReportError):
    """The database schema is not at the version this code expects."""


class ConfigurationError(LicenseReportError):
    """A setting or command-line option has an invalid value."""
