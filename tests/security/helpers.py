"""Assertions shared by the security and reliability tests."""

from __future__ import annotations

from typing import Any

OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


def assert_openai_error(response: Any, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    """The response is ``status`` with OpenAI's error shape (and the given param/code when named)."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == OPENAI_ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error
