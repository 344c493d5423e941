"""A hand-written table of hostile request bodies: every one gets a 4xx in the OpenAI error shape,
never a 5xx, and the server is still ready afterwards.

Bodies are raw bytes on purpose: JSON has no NaN, but Python's parser (and so FastAPI's) accepts
``NaN``/``Infinity``; duplicate keys are legal to Python's parser too (last one wins).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from .conftest import LIMITS
from .helpers import assert_openai_error

GEN = "/v1/images/generations"
JSON = {"Content-Type": "application/json"}


def _obj(**fields: Any) -> bytes:
    return json.dumps({"prompt": "x", "size": "64x64", "num_inference_steps": 1, **fields}).encode()


def _raw(fragment: str) -> bytes:
    """A body whose ``fragment`` is spliced in verbatim (for what json.dumps would not write)."""
    return ('{"prompt": "x", "size": "64x64", "num_inference_steps": 1, ' + fragment + "}").encode()


HOSTILE: dict[str, tuple[bytes, int]] = {
    # huge numbers
    "n 1e40": (_obj(n=10**40), 400),
    "n float 1e40": (_raw('"n": 1e40'), 400),
    "seed 2^63": (_obj(seed=2**63), 400),
    "seed 10^30": (_obj(seed=10**30), 400),
    "seed 5000 digits": (_raw('"seed": ' + "9" * 5000), 400),
    "steps 10^20": (_obj(num_inference_steps=10**20), 400),
    "width 10^30": (_obj(size=None, width=10**30), 400),
    "size 99999x99999": (_obj(size="99999x99999"), 400),
    "size 10^40 digits": (_obj(size="1" * 40 + "x64"), 400),
    "guidance 1e308": (_obj(guidance_scale=1e308), 400),
    "guidance 1e400 (inf)": (_raw('"guidance_scale": 1e400'), 400),
    "max_sequence_length 2^64": (_obj(max_sequence_length=2**64), 400),
    "output_compression -1": (_obj(output_compression=-1), 400),
    # negative sizes
    "size -64x64": (_obj(size="-64x64"), 400),
    "size 64x-64": (_obj(size="64x-64"), 400),
    "width -64": (_obj(size=None, width=-64), 400),
    "height -1": (_obj(size=None, height=-1), 400),
    "size 0x0": (_obj(size="0x0"), 400),
    "size 64x64x64": (_obj(size="64x64x64"), 400),
    "size arabic digits": (_obj(size="٦٤x٦٤"), 400),
    "size fullwidth digits": (_obj(size="６４x６４"), 400),
    # not-a-number
    "guidance NaN": (_raw('"guidance_scale": NaN'), 400),
    "guidance Infinity": (_raw('"guidance_scale": Infinity'), 400),
    "guidance -Infinity": (_raw('"guidance_scale": -Infinity'), 400),
    "true_cfg NaN": (_raw('"true_cfg_scale": NaN'), 400),
    "seed NaN": (_raw('"seed": NaN'), 400),
    "n NaN": (_raw('"n": NaN'), 400),
    "NaN in an unknown field": (_raw('"extra": [NaN]'), 400),
    # unicode and NUL
    "NUL in prompt": (_obj(prompt="a\x00b"), 400),
    "only NUL prompt": (_obj(prompt="\x00"), 400),
    "NUL in negative_prompt": (_obj(negative_prompt="ok\x00"), 400),
    "lone surrogate prompt": (b'{"prompt": "\\ud800 x", "size": "64x64"}', 400),
    "invalid UTF-8": (b'{"prompt": "\xff\xfe\xfd"}', 400),
    "overlong UTF-8 NUL": (b'{"prompt": "a\xc0\x80b"}', 400),
    "prompt only spaces": (_obj(prompt=" \u3000\u2003\n"), 400),
    # size of things
    "10 MB prompt": (_obj(prompt="x" * 10_000_000), 413),
    "10 MB of unicode": (_obj(prompt="\U0001f600" * 2_500_000), 413),
    "prompt past the limit": (_obj(prompt="\U0001f600" * (LIMITS["max_prompt_chars"] + 1)), 400),
    "nested 100k deep": (_raw('"extra": ' + "[" * 100_000 + "]" * 100_000)[:60_000], 400),
    "nested 5k deep": (_raw('"extra": ' + "[" * 5_000 + "]" * 5_000), 400),
    # wrong types
    "prompt number": (_obj(prompt=5), 400),
    "prompt null": (_obj(prompt=None), 400),
    "prompt list": (_obj(prompt=["a", "b"]), 400),
    "prompt object": (_obj(prompt={"text": "a"}), 400),
    "prompt bool": (_obj(prompt=True), 400),
    "n string": (_obj(n="2"), 400),
    "n bool": (_obj(n=True), 400),
    "n float": (_obj(n=1.5), 400),
    "seed string": (_obj(seed="42"), 400),
    "seed float": (_obj(seed=4.2), 400),
    "steps string": (_obj(num_inference_steps="1"), 400),
    "size number": (_obj(size=64), 400),
    "size list": (_obj(size=[64, 64]), 400),
    "guidance string": (_obj(guidance_scale="3.5"), 400),
    "stream string": (_obj(stream="yes"), 400),
    "store_local string": (_obj(store_local="true"), 400),
    "response_format gif": (_obj(response_format="gif"), 400),
    "output_format bmp": (_obj(output_format="bmp"), 400),
    "quality ultra": (_obj(quality="ultra"), 400),
    "model number": (_obj(model=7), 400),
    "model traversal": (_obj(model="../../../../etc/passwd"), 404),
    "request_id traversal": (_obj(request_id="../../x"), 400),
    "request_id newline": (_obj(request_id="a\nb"), 400),
    "body array": (b"[1, 2, 3]", 400),
    "body string": (b'"a lighthouse"', 400),
    "body number": (b"42", 400),
    "body null": (b"null", 400),
    "body true": (b"true", 400),
    "body empty": (b"", 400),
    "body whitespace": (b"  \n ", 400),
    "body truncated": (b'{"prompt": "x"', 400),
    "body trailing garbage": (b'{"prompt": "x"} {"prompt": "y"}', 400),
    "body single quotes": (b"{'prompt': 'x'}", 400),
    "body comment": (b'{"prompt": "x" /* hi */}', 400),
    # duplicate keys
    "duplicate prompt": (b'{"prompt": "x", "size": "64x64", "prompt": "y"}', 400),
    "duplicate, valid last": (b'{"prompt": 5, "size": "64x64", "num_inference_steps": 1, "prompt": "x"}', 400),
    "duplicate size": (_raw('"size": "64x64"'), 400),
    "duplicate nested": (_raw('"extra": {"a": 1, "a": 2}'), 400),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_body_gets_4xx(live_client: Any, name: str) -> None:
    body, status = HOSTILE[name]
    assert_openai_error(live_client.post(GEN, content=body, headers=JSON), status)


@pytest.mark.parametrize("path", ["/v1/images/jobs", "/v1/images/cancel", "/v1/models/select", "/v1/models/unload",
                                  "/v1/tokenize", "/v1/memory/release"])
@pytest.mark.parametrize("body", [b'{"model": NaN}', b'{"model": "a", "model": "b"}', b"[", b"\xff",
                                  b'{"all": "yes", "prompt": 5, "request_id": 5, "model": 5}'])
def test_every_json_route_rejects_hostile_bodies(live_client: Any, path: str, body: bytes) -> None:
    response = live_client.post(path, content=body, headers=JSON)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert_openai_error(response, response.status_code)


@pytest.mark.parametrize("prompt", [
    "une île déserte, 夜の東京, صحراء, 🏝️🌊", "zero\u200bwidth\u200d joiners \ufeff", "e\u0301\u0301\u0301 combining",
    "\u202eright-to-left override", "tab\tnew\nline\r\n", "<script>alert(1)</script> ' OR 1=1 --", "%s%n%x{0}${x}",
])
def test_unusual_but_valid_unicode_prompts_work(live_client: Any, prompt: str) -> None:
    response = live_client.post(GEN, json={"prompt": prompt, "size": "64x64", "num_inference_steps": 1})
    assert response.status_code == 200, response.text[:300]


def test_hostile_headers(live_client: Any) -> None:
    ok = {"prompt": "x", "size": "64x64", "num_inference_steps": 1}
    for request_id in ("x" * 5000, "../../etc/passwd", "a b\tc"):  # raw non-ASCII bytes: see test_real_server
        response = live_client.post(GEN, json=ok, headers={"X-Request-ID": request_id})
        assert response.status_code in (200, 400), response.text[:300]
    for length in (b"-1", b"abc", b"99999999999999999999999"):
        response = live_client.post(GEN, content=b"{}", headers={**JSON, "Content-Length": length})
        assert 400 <= response.status_code < 500, (length, response.status_code)


def test_still_ready_after_the_table(live_client: Any) -> None:
    assert live_client.get("/ready").status_code == 200
    ok = live_client.post(GEN, json={"prompt": "after", "size": "64x64", "num_inference_steps": 1})
    assert ok.status_code == 200
