"""The TLS directives (issue #13): parsing, the combinations refused with file:line, and the
contexts they load (certificates made at test time by `openssl`)."""

from __future__ import annotations

import ssl

import pytest

from appliance import tls
from appliance.config import ConfigError, describe, parse_config

FILE = "tls.conf"


def parse(*lines: str):
    return parse_config("\n".join(lines) + "\n", FILE)


def error(*lines: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(*lines)
    return str(info.value)


def test_defaults_are_may_towards_the_next_hop_and_off_towards_clients():
    config = parse("OutAddress: 10026")
    assert (config.out_tls, config.client_tls) == ("may", "off")
    assert config.tls_certificate is config.tls_key is config.tls_ca_file is None


@pytest.mark.parametrize("mode", ["none", "may", "encrypt", "VERIFY"])
def test_out_tls_modes(mode):
    config = parse("OutAddress: mail.example.org", f"OutTLS: {mode}")
    assert config.out_tls == mode.lower()
    assert config.out_tls_hostname == "mail.example.org"


def test_bad_values_name_file_line_and_directive():
    assert error("OutAddress: 10026", "OutTLS: yes") == (
        "tls.conf:2: OutTLS: invalid value 'yes' (expected none, may, encrypt or verify)")
    assert error("OutAddress: 10026", "ClientTLS: maybe") == (
        "tls.conf:2: ClientTLS: invalid value 'maybe' (expected off, on or passthrough)")
    assert error("OutAddress: 10026", "OutTLSName: 192.0.2.1").startswith(
        "tls.conf:2: OutTLSName: invalid value '192.0.2.1'")


def test_verify_in_transparent_mode_needs_out_tls_name():
    message = error("TransparentProxy: on", "Listen: 10025", "OutTLS: verify")
    assert message.startswith("tls.conf:3: OutTLS: verify needs OutTLSName: in transparent mode")
    config = parse("TransparentProxy: on", "OutTLS: verify", "OutTLSName: mx.example.org")
    assert config.out_tls_hostname == "mx.example.org"


def test_verify_with_an_ip_out_address_needs_out_tls_name():
    assert "OutAddress is not a host name" in error("OutAddress: 192.0.2.1:25", "OutTLS: verify")


def test_client_tls_on_needs_a_certificate():
    assert error("OutAddress: 10026", "ClientTLS: on") == (
        "tls.conf:2: ClientTLS: on needs TLSCertificate: (and TLSKey:), the certificate shown "
        "to clients")


def test_passthrough_refuses_a_mandatory_next_hop_tls():
    assert "cannot be combined with OutTLS: encrypt" in error(
        "OutAddress: 10026", "OutTLS: encrypt", "ClientTLS: passthrough")


def test_describe_shows_the_tls_settings_and_parses_back(tls_certs):
    config = parse("OutAddress: mail.example.org", "OutTLS: verify", "TLSCAFile: /ca.pem",
                   "ClientTLS: on", f"TLSCertificate: {tls_certs.proxy.cert}",
                   f"TLSKey: {tls_certs.proxy.key}")
    text = describe(config)
    assert "OutTLS: verify\n" in text and "ClientTLS: on\n" in text
    assert "# OutTLSName: not set (next hop's name: mail.example.org)" in text
    again = parse_config(text, FILE)
    assert {k: v for k, v in vars(again).items() if k != "warnings"} == {
        k: v for k, v in vars(config).items() if k != "warnings"}


def test_contexts(tls_certs):
    config = parse("OutAddress: 10026", "ClientTLS: on",
                   f"TLSCertificate: {tls_certs.proxy.cert}", f"TLSKey: {tls_certs.proxy.key}")
    contexts = tls.load(config)
    assert isinstance(contexts.server, ssl.SSLContext)
    assert contexts.client.verify_mode == ssl.CERT_NONE  # may: encryption, no authentication
    assert contexts.warnings == ()
    assert tls.load(parse("OutAddress: 10026", "OutTLS: none")).client is None


def test_verify_context_checks_the_name(tls_certs):
    config = parse("OutAddress: mail.example.org", "OutTLS: verify",
                   f"TLSCAFile: {tls_certs.ca.cert}")
    contexts = tls.load(config)
    assert contexts.client.verify_mode == ssl.CERT_REQUIRED and contexts.client.check_hostname
    assert contexts.server_hostname == "mail.example.org"


def test_unusable_files_are_errors_naming_the_directive(tls_certs, tmp_path):
    def load_error(*lines):
        with pytest.raises(ConfigError) as info:
            tls.load(parse("OutAddress: 10026", *lines))
        return str(info.value)

    missing = tmp_path / "missing.pem"
    assert load_error("ClientTLS: on", f"TLSCertificate: {missing}") == (
        f"tls.conf:0: TLSCertificate: {missing}: no such file")
    assert "the key does not belong to the certificate" in load_error(
        "ClientTLS: on", f"TLSCertificate: {tls_certs.proxy.cert}",
        f"TLSKey: {tls_certs.hop.key}")
    assert load_error("ClientTLS: on", f"TLSCertificate: {tls_certs.proxy.cert}").startswith(
        "tls.conf:0: TLSCertificate: cannot load")  # no key in the certificate file
    assert load_error("OutAddress: mx.example.org", "OutTLS: verify",
                      f"TLSCAFile: {missing}").startswith("tls.conf:0: TLSCAFile: cannot load")


def test_a_key_readable_by_others_is_a_warning(tls_certs, tmp_path):
    key = tmp_path / "key.pem"
    key.write_bytes(tls_certs.proxy.key.read_bytes())
    key.chmod(0o644)
    contexts = tls.load(parse("OutAddress: 10026", "ClientTLS: on",
                              f"TLSCertificate: {tls_certs.proxy.cert}", f"TLSKey: {key}"))
    assert contexts.warnings == (
        f"tls.conf:0: TLSKey: {key} is readable by every user of this machine: "
        f"chmod o-rwx {key}",)
