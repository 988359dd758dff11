"""clamsmtp-netsetup: install and remove the netfilter rules of a transparent clamsmtpd.

Imports nothing from ``appliance`` and knows no SMTP: it redirects TCP ports to a local port.
"""
