"""Security: envelope-encrypted columns, pseudonymous patient keys (and, to come, access control
and the audit log). See docs/security.md."""
