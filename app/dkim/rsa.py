"""dkimpy's RSA signature primitive, computed by OpenSSL (``cryptography``).

dkimpy builds the whole signature (canonicalisation, the header, the tags, the EMSA-PKCS1-v1_5
digest info) and does the RSA private-key operation in pure Python: about 20 ms per RSA-2048
signature on this machine, which would cap signed acceptance near 50 messages/s per core.
dkimpy calls that operation through one module-level name, ``dkim.RSASSA_PKCS1_v1_5_sign``;
importing this module puts OpenSSL's in its place (about 1 ms). PKCS#1 v1.5 signatures are
deterministic, so the bytes are exactly those dkimpy would compute (tests/test_dkim_rsa.py).
Other hashes than SHA-256 (rsa-sha1, which Elemta never uses) keep dkimpy's own code.
"""

from __future__ import annotations

import functools
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

pure_python_sign = dkim.RSASSA_PKCS1_v1_5_sign


@functools.lru_cache(maxsize=64)
def _openssl_key(n: int, e: int, d: int, p: int, q: int, dmp1: int, dmq1: int,
                 iqmp: int) -> rsa.RSAPrivateKey:
    """The key as an OpenSSL object, built once per key and process (building checks it)."""
    return rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp,
                                 rsa.RSAPublicNumbers(e, n)).private_key()


def openssl_sign(hash_object: Any, private_key: dict[str, int]) -> bytes:
    """``dkim.crypto.RSASSA_PKCS1_v1_5_sign``'s contract: the signature of the digest."""
    if hash_object.name.lower() != "sha256":
        return pure_python_sign(hash_object, private_key)
    key = _openssl_key(private_key["modulus"], private_key["publicExponent"],
                       private_key["privateExponent"], private_key["prime1"],
                       private_key["prime2"], private_key["exponent1"],
                       private_key["exponent2"], private_key["coefficient"])
    return key.sign(hash_object.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


dkim.RSASSA_PKCS1_v1_5_sign = openssl_sign
