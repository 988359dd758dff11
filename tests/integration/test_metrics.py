"""The opt-in Prometheus endpoint, scraped as Prometheus would, after real traffic."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest
from helpers import EICAR, free_port, smtp_client


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


# chosen when the daemon starts, not at collection: a port free minutes earlier may not be now
@pytest.mark.appliance_config(MetricsListen=lambda hop: f"127.0.0.1:{free_port()}")
def test_metrics_count_connections_messages_and_scans(appliance, next_hop):
    metrics_port = int(appliance.directives["MetricsListen"].rsplit(":", 1)[1])
    before = scrape(metrics_port)
    with smtp_client(appliance) as client:
        client.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nclean\r\n")
        client.ehlo()
        client.mail("a@example.com")
        client.rcpt("b@example.com")
        client.data(b"Subject: v\r\n\r\n" + EICAR + b"\r\n")
    after = scrape(metrics_port)
    assert after['clamsmtpd_messages_total{status="clean"}'] == \
        before['clamsmtpd_messages_total{status="clean"}'] + 1
    assert after['clamsmtpd_messages_total{status="virus"}'] == \
        before['clamsmtpd_messages_total{status="virus"}'] + 1
    assert after["clamsmtpd_connections_total"] >= before["clamsmtpd_connections_total"] + 1
    assert after["clamsmtpd_scan_seconds_count"] == before["clamsmtpd_scan_seconds_count"] + 2
    assert 'clamsmtpd_next_hop_errors_total{stage="connect"}' in after


def test_check_config_shows_the_metrics_address(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text("OutAddress: 10025\nMetricsListen: 127.0.0.1:9330\n")
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "--check-config", "-f",
                             str(conf)], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0 and "MetricsListen: 127.0.0.1:9330" in result.stdout
    conf.write_text("OutAddress: 10025\nMetricsListen: 127.0.0.1:99999\n")
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "--check-config", "-f",
                             str(conf)], capture_output=True, text=True, timeout=20)
    assert result.returncode == 2 and f"{conf}:2: MetricsListen:" in result.stderr
