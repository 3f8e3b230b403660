"""C2PA content credentials: a signed manifest in the output file saying it was opened from the
scan (its parent ingredient) and what each stage then did, with the stage's digital source type
and the model that acted, signed with c2pa-python as the last write of the encoded file."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.sourcetype import ALGORITHMICALLY_ENHANCED, COMPOSITE_WITH_TRAINED, models_used

__all__ = [
    "CredentialsError",
    "SigningKey",
    "UnsignableError",
    "manifest_actions",
    "read_manifest",
    "sign",
    "unsignable_reason",
]

MIME_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "tiff": "image/tiff", "webp": "image/webp"}

# What each stage does, in C2PA's action vocabulary.
_ACTIONS = {
    "denoise": "c2pa.filtered",
    "restore": "c2pa.color_adjustments",
    "face": "c2pa.edited",
    "upscale": "c2pa.resized",
}
# Thumbnails would decode and re-encode every output (16-bit TIFFs included) for a preview.
_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}}


class CredentialsError(PipelineError):
    """The certificate or key cannot sign: unreadable, malformed, or refused by C2PA."""


class UnsignableError(PipelineError):
    """C2PA cannot sign this output (its format, or this file of that format)."""


@dataclass(frozen=True)
class SigningKey:
    """A PEM certificate chain (signing certificate first) and its PEM private key, with the
    algorithm the key signs with."""

    certificates: bytes
    private_key: bytes
    algorithm: str
    cert_path: str
    key_path: str

    @classmethod
    def load(cls, cert: Path | str, key: Path | str) -> SigningKey:
        """Read and check a chain and key: a CredentialsError names the file and the reason,
        so a bad pair stops a start rather than every output."""
        try:
            certificates, private_key = Path(cert).read_bytes(), Path(key).read_bytes()
        except OSError as exc:
            raise CredentialsError(f"{exc.filename}: cannot be read: {exc.strerror}") from exc
        algorithm = _algorithm(private_key, key)
        _check_pair(certificates, private_key, cert, key)
        signing = cls(certificates, private_key, algorithm, str(cert), str(key))
        signing.signer().close()  # c2pa reads the chain as it will when signing
        return signing

    def signer(self) -> Any:
        import c2pa

        info = c2pa.C2paSignerInfo(self.algorithm, self.certificates, self.private_key, None)
        try:
            return c2pa.Signer.from_info(info)
        except c2pa.C2paError as exc:
            raise CredentialsError(f"{self.cert_path}, {self.key_path}: {exc}") from exc


def _check_pair(chain: bytes, key: bytes, cert_path: Path | str, key_path: Path | str) -> None:
    """The chain's first certificate must be the key's: c2pa would sign with a key no reader
    can verify against it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        certificates = x509.load_pem_x509_certificates(chain)
    except ValueError as exc:
        raise CredentialsError(f"{cert_path}: not a PEM certificate chain ({exc})") from exc
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    public = load_pem_private_key(key, password=None).public_key().public_bytes(*spki)
    if certificates[0].public_key().public_bytes(*spki) != public:
        raise CredentialsError(
            f"{key_path} is not the private key of the first certificate in {cert_path}"
        )


def _algorithm(pem: bytes, path: Path | str) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialsError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
    if isinstance(key, ec.EllipticCurvePrivateKey):
        curves = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        if key.curve.name in curves:
            return curves[key.curve.name]
        raise CredentialsError(f"{path}: elliptic curve {key.curve.name} is not one C2PA signs")
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise CredentialsError(f"{path}: a {type(key).__name__} cannot sign C2PA manifests")


def unsignable_reason(fmt: str) -> str | None:
    """Why C2PA cannot sign an output of this format, or None when it can."""
    import c2pa

    mime = MIME_TYPES.get(fmt)
    if mime is None or mime not in c2pa.Builder.get_supported_mime_types():
        return f"C2PA cannot sign {fmt} files"
    return None


def manifest_actions(stages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """c2pa.opened (the scan, as the parent ingredient), then one action per stage that ran,
    with its digital source type and the model that acted as software agent."""
    actions: list[dict[str, Any]] = [
        {"action": "c2pa.opened", "parameters": {"ingredientIds": ["scan"]}}
    ]
    for record in stages:
        if record.get("skipped"):
            continue
        makers = [use for use in models_used([record]) if use.made_pixels]
        action: dict[str, Any] = {
            "action": _ACTIONS.get(record["stage"], "c2pa.edited"),
            "digitalSourceType": COMPOSITE_WITH_TRAINED if makers else ALGORITHMICALLY_ENHANCED,
            "softwareAgent": (
                {"name": makers[0].id, "version": f"sha256:{makers[0].sha256}"}
                if makers
                else {"name": f"scanrestore {record['stage']}"}
            ),
            "parameters": {
                "description": f"{record['stage']} v{record['version']}",
                "scanrestore.stage": record["stage"],
                "scanrestore.models": [
                    {"id": use.id, "sha256": use.sha256, "licence": use.licence} for use in makers
                ],
            },
        }
        actions.append(action)
    return actions


def sign(
    unsigned: Path,
    dest: Path,
    fmt: str,
    *,
    key: SigningKey,
    source: Path,
    source_format: str,
    stages: Sequence[Mapping[str, Any]],
    title: str,
    software: str,
) -> None:
    """Write `unsigned` (an encoded `fmt` file) to `dest` with a signed manifest whose parent
    ingredient is `source`. UnsignableError when C2PA cannot sign this file."""
    import c2pa

    reason = unsignable_reason(fmt)
    if reason is not None:
        raise UnsignableError(reason)
    name, _, version = software.partition(" ")
    manifest = {
        "claim_generator_info": [{"name": name, "version": version or "unknown"}],
        "title": title,
        "format": MIME_TYPES[fmt],
        "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": manifest_actions(stages)}}],
    }
    context = c2pa.Context(c2pa.Settings.from_dict(_SETTINGS))
    builder = c2pa.Builder(manifest, context=context)
    ingredient = {"title": source.name, "relationship": "parentOf", "label": "scan"}
    try:
        with open(source, "rb") as scan:
            builder.add_ingredient(ingredient, MIME_TYPES.get(source_format, ""), scan)
        with open(unsigned, "rb") as data, open(dest, "wb") as out:
            builder.sign(key.signer(), MIME_TYPES[fmt], data, out)
    except c2pa.C2paError.NotSupported as exc:
        raise UnsignableError(f"C2PA cannot sign this {fmt} file: {exc}") from exc
    except c2pa.C2paError as exc:
        raise CredentialsError(f"{title}: C2PA signing failed: {exc}") from exc
    finally:
        builder.close()
        context.close()


def read_manifest(path: Path, fmt: str, *, trust_anchors: bytes | None = None) -> Any:
    """A c2pa Reader over `path` (trusting `trust_anchors`, PEM, besides the default list)."""
    import c2pa

    settings = dict(_SETTINGS)
    if trust_anchors is not None:
        settings["trust"] = {"trust_anchors": trust_anchors.decode()}
    context = c2pa.Context(c2pa.Settings.from_dict(settings))
    return c2pa.Reader(MIME_TYPES[fmt], io.BytesIO(path.read_bytes()), context=context)
