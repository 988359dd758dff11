"""clamsmtp for Python: a clamsmtpd-compatible SMTP proxy that scans mail with clamd."""

__version__ = "2.0.0"
