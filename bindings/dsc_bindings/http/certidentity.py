"""The R10 identity of a verified TLS client certificate (issue 14 §4 "Identity").

Rule, in this order:

1. the subject's commonName, when the subject has exactly one;
2. without a commonName, the first subjectAltName e-mail address (rfc822Name);
3. else the first subjectAltName User Principal Name (otherName 1.3.6.1.4.1.311.20.2.3, what
   Windows puts into user certificates).

A certificate that has none of these, or a subject with two or more commonNames (which one
names the user is a guess, and a CA that lets a requester add one would let them pick), has no
usable identity: :class:`UnusableCertificate`.  The bindings then refuse every request on that
connection (HTTP 403); without the refusal the job's user would be whatever SID the request
claims.  DNS names are not user identities.  The identity is used as written (no case folding):
``scan_admins`` compares it exactly and the directory compares it by its own rules.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

__all__ = ["UPN_OID", "UnusableCertificate", "certificate_identity", "connection_identity"]

#: szOID_NT_PRINCIPAL_NAME: the UPN of a Windows user certificate's subjectAltName otherName.
UPN_OID = ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")


class UnusableCertificate(Exception):
    """A verified client certificate that names no user (message: what is wrong, for the log
    and the 403 answer)."""


def certificate_identity(der: bytes | None) -> str | None:
    """The identity of a verified client certificate in DER form; None without a certificate.
    Raises :class:`UnusableCertificate` (module doc)."""
    if not der:
        return None
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise UnusableCertificate(f"the client certificate cannot be read: {exc}") from exc
    common_names = [
        str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    if len(common_names) > 1:
        raise UnusableCertificate(
            f"the client certificate's subject has {len(common_names)} commonNames "
            f"({', '.join(map(repr, common_names))}): which one is the user is ambiguous"
        )
    if common_names and common_names[0]:
        return common_names[0]
    try:
        alt_names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        alt_names = x509.SubjectAlternativeName([])
    for email in alt_names.get_values_for_type(x509.RFC822Name):
        if email:
            return email
    for other in alt_names.get_values_for_type(x509.OtherName):
        if other.type_id == UPN_OID:
            upn = _der_utf8_string(other.value)
            if upn:
                return upn
    raise UnusableCertificate(
        "the client certificate names no user: it needs a subject commonName, an e-mail "
        "subjectAltName or a UPN subjectAltName"
    )


def connection_identity(der: bytes | None) -> tuple[str | None, str | None]:
    """For a binding: (identity, None), or (None, why the certificate is refused)."""
    try:
        return certificate_identity(der), None
    except UnusableCertificate as exc:
        return None, str(exc)


def _der_utf8_string(value: bytes) -> str | None:
    """The text of a DER UTF8String (tag 12), the encoding of a UPN; None if it is not one."""
    if len(value) < 2 or value[0] != 0x0C:
        return None
    length, offset = value[1], 2
    if length & 0x80:  # long form: the next (length & 0x7F) bytes hold the length
        count = length & 0x7F
        if count == 0 or count > 4 or len(value) < 2 + count:
            return None
        length, offset = int.from_bytes(value[2 : 2 + count], "big"), 2 + count
    if offset + length != len(value):
        return None
    try:
        return value[offset:].decode("utf-8")
    except UnicodeDecodeError:
        return None
