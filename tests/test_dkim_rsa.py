"""dkimpy's RSA operation done by OpenSSL (app/dkim/rsa.py) signs byte for byte as dkimpy."""

from __future__ import annotations

import hashlib

import dkim
from dkim.crypto import parse_pem_private_key

from app.dkim import rsa
from app.dkim.keys import generate_keypair


def test_openssl_signs_exactly_what_dkimpys_pure_python_rsa_signs():
    assert dkim.RSASSA_PKCS1_v1_5_sign is rsa.openssl_sign  # installed by app.dkim.signing
    private, _ = generate_keypair("rsa")
    key = parse_pem_private_key(private.encode())
    for data in (b"", b"From: a@example.com\r\n", bytes(range(256)) * 40):
        assert rsa.openssl_sign(hashlib.sha256(data), key) == rsa.pure_python_sign(
            hashlib.sha256(data), key)


def test_rsa_sha1_keeps_dkimpys_own_code():
    private, _ = generate_keypair("rsa")
    key = parse_pem_private_key(private.encode())
    digest = hashlib.sha1(b"legacy")
    assert rsa.openssl_sign(digest, key) == rsa.pure_python_sign(hashlib.sha1(b"legacy"), key)
