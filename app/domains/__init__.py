"""What a receiver sees of a sending domain: ``GET /api/domains/{domain}/check``,
``flask domain check`` (docs/DKIM.md).

lookups.py   DNS answers as the checks need them (one resolver, errors as values)
spf.py       pyspf evaluating SPF through our resolver
check.py     the checks (SPF, DKIM, DMARC, MX, FCrDNS, MTA-STS) and the cached report
"""
