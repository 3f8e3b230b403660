"""A certificate chain C2PA accepts, made here with cryptography: a root CA and, signed by it,
an ES256 end-entity certificate for email protection (an extended key usage C2PA accepts)."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["make_keys", "pem_private_key"]


def _name(common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "scanrestore tests"),
        ]
    )


def _usage(*, sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=not sign,
        crl_sign=not sign,
        encipher_only=False,
        decipher_only=False,
    )


def _certificate(subject, issuer, public, signing_key, *, ca: bool, extra=()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(_usage(sign=not ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    for extension in extra:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_keys(folder: Path) -> dict[str, Path]:
    """chain.pem (the signing certificate, then the root), key.pem and root.pem in `folder`."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _certificate(
        _name("test root"), _name("test root"), root_key.public_key(), root_key, ca=True
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _certificate(
        _name("test signer"),
        root.subject,
        key.public_key(),
        root_key,
        ca=False,
        extra=[
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
        ],
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.pem" for name in ("chain", "key", "root")}
    paths["chain"].write_bytes(_pem(leaf) + _pem(root))
    paths["root"].write_bytes(_pem(root))
    paths["key"].write_bytes(pem_private_key(key))
    return paths
