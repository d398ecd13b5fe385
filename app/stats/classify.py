"""Failure classes: why a delivery attempt failed, in one word (docs/STATS.md, "Failure classes").

Pure rules, no database: ``failure_class(smtp_code, enhanced_code, text)`` gives one of
``FAILURE_CLASSES`` for every ``tempfail`` and ``rejection`` event. The order of evidence:

1. the enhanced status code (RFC 3463, IANA registry) when its subject.detail says something
   specific (``x.1.1`` mailbox unknown, ``x.2.2`` mailbox full, ``x.7.5`` TLS, ...);
2. the reply text, for the generic codes (``x.0.0``, ``x.7.1`` "not authorised" is said of
   spam, of policy and of greylisting alike) and for replies without an enhanced code
   (connection failures, DNS errors, servers that send none);
3. the subject of the enhanced code (``x.4.*`` network, ``x.7.*`` policy, ...);
4. the basic reply code (RFC 5321 §4.2.3);
5. ``other``.

The same function runs when the event is written (``events.record_event``) and when old
events are classified by ``flask stats rebuild``; the demo generators store its verdict for
their fixed replies, so every stored class came from here.
"""

from __future__ import annotations

import re

FAILURE_CLASSES = ("dns", "connection", "tls", "auth", "rate_limited", "mailbox_unknown",
                   "mailbox_full", "policy", "spam", "content", "other")

_ENHANCED = re.compile(r"^[245]\.(\d{1,3})\.(\d{1,3})$")

# subject.detail -> class, where the code alone is specific enough.
EXACT: dict[str, str] = {
    "1.1": "mailbox_unknown", "1.3": "mailbox_unknown", "1.6": "mailbox_unknown",
    "1.2": "dns", "1.10": "dns", "1.7": "policy", "1.8": "policy",
    "2.1": "mailbox_unknown", "2.2": "mailbox_full", "2.3": "content",
    "3.4": "content", "3.1": "mailbox_full",
    "4.1": "connection", "4.2": "connection", "4.3": "dns", "4.4": "dns",
    "4.5": "rate_limited",
    "5.3": "rate_limited",
    "6.0": "content", "6.1": "content", "6.2": "content", "6.3": "content", "6.4": "content",
    "6.5": "content", "6.6": "content", "6.7": "content", "6.8": "content", "6.9": "content",
    "6.10": "content",
    "7.4": "tls", "7.5": "tls", "7.10": "tls", "7.11": "tls",
    "7.8": "auth", "7.9": "auth", "7.12": "auth", "7.14": "auth",
    "7.13": "mailbox_unknown",
    "7.23": "policy", "7.24": "policy", "7.25": "policy", "7.26": "policy", "7.27": "policy",
    "7.29": "policy",
    "7.28": "spam",
}

# Subject -> class when neither the detail nor the text says more.
SUBJECT: dict[str, str] = {"1": "mailbox_unknown", "4": "connection", "6": "content",
                           "7": "policy"}

# Text patterns, first match wins: the specific before the general ("mailbox does not exist"
# is about the mailbox, "domain does not exist" about DNS; "connection refused" is not policy).
TEXT_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE)) for name, pattern in (
        ("tls", r"\b(?:tls|ssl|starttls)\b|certificate|handshake|encryption"),
        ("mailbox_full", r"mailbox (?:is )?full|over ?quota|quota exceeded|insufficient "
                         r"(?:system )?storage|mailbox size limit|storage allocation"),
        ("mailbox_unknown", r"user unknown|unknown user|no such (?:user|mailbox|recipient)"
                            r"|(?:mailbox|user|recipient|address) (?:\S+ )?(?:does not|doesn't) "
                            r"exist|(?:mailbox|recipient) (?:not found|unavailable)"
                            r"|invalid (?:recipient|mailbox)|unknown recipient|recipient "
                            r"(?:address )?rejected|account (?:is )?disabled"
                            r"|bad destination mailbox"),
        ("dns", r"\bdns\b|nxdomain|\bno mx\b|null mx|mx lookup|host (?:not found|unknown)"
                r"|name or service not known|domain \S+ does not exist|no address"),
        ("auth", r"\bauth(?:entication)? (?:required|failed|credentials)|\bcredentials\b"
                 r"|\bpassword\b|\blogin\b"),
        ("spam", r"spam|junk|block ?list|black ?list|\brbl\b|dnsbl|spamhaus|reputation"),
        ("rate_limited", r"rate.?limit|too many|throttl|slow down|exceeded .{0,40}limit"
                         r"|try again in \d|sending rate|frequency"),
        ("policy", r"greylist|graylist|polic|relay|not (?:permitted|authori[sz]ed|allowed)"
                   r"|\bspf\b|\bdkim\b|\bdmarc\b|denied|prohibited"),
        ("content", r"too (?:big|large)|message size|size limit|attachment|virus|malware"
                    r"|line too long|smtputf8|content"),
        ("connection", r"connect|timed? ?out|unreachable|reset by peer|broken pipe"
                       r"|network|\beof\b"),
    )
)

# Enhanced codes that say too little on their own: the text decides first.
GENERIC = {"0.0", "7.0", "7.1", "7.7", "2.0", "4.0", "4.7", "5.0", "1.0", "3.0"}

# Basic reply code -> class (RFC 5321 §4.2.3), the last evidence before "other".
BASIC: dict[int, str] = {
    421: "connection", 450: "mailbox_unknown", 452: "mailbox_full", 530: "auth", 535: "auth",
    538: "tls", 550: "mailbox_unknown", 551: "mailbox_unknown", 552: "mailbox_full",
    553: "mailbox_unknown", 554: "policy",
}


def failure_class(smtp_code: int | None, enhanced_code: str | None, text: str | None) -> str:
    """The failure class of a temporary or permanent failure (see the module docstring)."""
    match = _ENHANCED.match(enhanced_code.strip()) if enhanced_code else None
    subject_detail = f"{int(match.group(1))}.{int(match.group(2))}" if match else None
    if subject_detail is not None and subject_detail not in GENERIC:
        found = EXACT.get(subject_detail)
        if found:
            return found
    for name, pattern in TEXT_RULES:
        if text and pattern.search(text):
            return name
    if match is not None:
        if subject_detail in EXACT:
            return EXACT[subject_detail]
        if subject_detail == "4.7":  # delivery time expired, and the text said no more
            return "other"
        found = SUBJECT.get(str(int(match.group(1))))
        if found:
            return found
    if smtp_code is not None and smtp_code in BASIC:
        return BASIC[smtp_code]
    return "other"
