"""The coordinator's certificates pass Python 3.13's default TLS verification (X.509 strict) on every Python.

Python 3.13 sets ``ssl.VERIFY_X509_STRICT`` in ``ssl.create_default_context()``: a certificate without an
Authority Key Identifier is refused ("Missing Authority Key Identifier"). This test sets the flag itself, so it
shows the same thing on the Python CI runs (3.11): certificates from ``make_tls`` without key identifiers fail it.
"""

from __future__ import annotations

import socket
import ssl
import threading

from pixcell_fed.federation.deployment import make_tls


def handshake(tls, *, strict: bool) -> str:
    """One TLS handshake on loopback, client verifying against the CA; returns the server's certificate subject."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls.server_cert, tls.server_key)
    client_ctx = ssl.create_default_context(cafile=str(tls.ca_cert))
    if strict:
        client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    else:  # Python 3.13's default sets it: clear it to verify as Python 3.11 and 3.12 do by default
        client_ctx.verify_flags &= ~ssl.VERIFY_X509_STRICT
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
                    tls_conn.recv(1)
            except (OSError, ssl.SSLError):
                pass  # the client refused the certificate: the client side reports it

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
                with client_ctx.wrap_socket(raw, server_hostname="localhost") as conn:
                    subject = dict(x[0] for x in conn.getpeercert()["subject"])["commonName"]
                    conn.sendall(b"x")
                    return subject
        finally:
            thread.join(timeout=30)


def test_certificates_pass_strict_verification(tmp_path):
    from cryptography import x509

    tls = make_tls(tmp_path, hosts=["coordinator.example.org"])
    assert handshake(tls, strict=True) == "coordinator.example.org"
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski


def test_strict_verification_refuses_a_server_certificate_without_key_identifiers(tmp_path):
    """The control: the same chain with the server certificate re-signed without key identifiers is refused."""
    import datetime as dt

    import pytest
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    tls = make_tls(tmp_path)
    ca_key = serialization.load_pem_private_key((tmp_path / "ca.key").read_bytes(), password=None)
    old = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    builder = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(old.issuer).public_key(old.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(old.not_valid_before_utc)
               .not_valid_after(old.not_valid_after_utc + dt.timedelta(seconds=1)))
    for ext in old.extensions:
        if not isinstance(ext.value, (x509.SubjectKeyIdentifier, x509.AuthorityKeyIdentifier)):
            builder = builder.add_extension(ext.value, ext.critical)
    tls.server_cert.write_bytes(builder.sign(ca_key, hashes.SHA384()).public_bytes(serialization.Encoding.PEM))
    assert handshake(tls, strict=False) == "localhost"  # accepted without the strict flag (Python <= 3.12's default)
    with pytest.raises(ssl.SSLCertVerificationError, match="Authority Key Identifier"):
        handshake(tls, strict=True)
