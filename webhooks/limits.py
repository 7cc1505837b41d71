"""Limits of what the receiver accepts."""

MAX_BODY_BYTES = 1024 * 1024  # a webhook body larger than this is refused with 413
