"""Masking of AWS secrets in text that leaves the process: log lines, status output, stored errors."""

from __future__ import annotations

import re

_SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"),
    re.compile(
        r"(?i)(aws_secret_access_key|secret_access_key|aws_session_token|session_token)"
        r"(\s*[=:]\s*)(\S+)"
    ),
    re.compile(r"(?i)(X-Amz-Security-Token|X-Amz-Credential|Signature)=([^&\s]+)"),
]


def redact(text: str) -> str:
    """Mask AWS access key ids, secrets, session tokens and signatures in ``text``."""
    text = _SECRET_PATTERNS[0].sub(lambda m: m.group(1) + "****************", text)
    text = _SECRET_PATTERNS[1].sub(lambda m: m.group(1) + m.group(2) + "****", text)
    return _SECRET_PATTERNS[2].sub(lambda m: m.group(1) + "=****", text)
