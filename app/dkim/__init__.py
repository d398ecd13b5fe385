"""DKIM (RFC 6376, RFC 8463): signing keys per (domain, selector) and signing at acceptance.

keys.py      the key service: create (RSA 2048 or Ed25519), list, activate (rotation), retire
records.py   domain names, selectors and the DNS TXT record a key needs
signing.py   ``sign_outgoing``: the one function the acceptance paths call; which keys signed
routes.py    ``/api/dkim/keys`` (admin)
cli.py       ``flask dkim create|list|show|activate|retire``
"""
