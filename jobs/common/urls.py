"""URLs as the job shows them: credentials never leave the process.

A URL in a profile or on the command line may carry a secret (``http://user:secret@host/v1``, or a token in
its query string). The job uses the URL as given, but every URL it writes (run.json, summary.json, the
report, store metadata) or logs goes through ``redact`` first.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"
# Query parameters that commonly carry a credential (case-insensitive, matched anywhere in the name).
_SECRET_PARAM = re.compile(r"token|key|secret|pass|auth|sig|credential|session", re.IGNORECASE)
# A URL inside free text (an error message, a source description): scheme://, then up to whitespace or quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>)]+")


def redact(url: str) -> str:
    """``url`` with its userinfo (``user:password@``) and any credential-looking query value replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAM.search(k) for k, _ in pairs):
            query = urlencode([(k, REDACTED if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL inside ``text`` redacted (for messages that quote a URL among other words)."""
    return _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)
