"""clamsmtp for Python: a clamsmtpd-compatible SMTP proxy that scans mail with clamd."""

__version__ = "0.1.0"
