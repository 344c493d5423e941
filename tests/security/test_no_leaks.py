"""Nothing internal leaks: with the default model served from a local directory (its key and source
are absolute paths) and an ordinary key, no answer a client can get — the image response, job status,
/, /ready, /v1/models, a model card, /metrics — carries the directory, the output directory or the
cache directory; ``saved_path`` is relative to the output directory and the log keeps the full path."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

USER = "sk-user-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {USER}"}


async def test_no_absolute_path_reaches_a_client(app_factory: Callable[..., Any], cache_dir: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    local = cache_dir / "models" / "tiny-flux"  # a real diffusers directory, loaded as a local pipeline
    out = tmp_path / "outputs"
    caplog.set_level(logging.INFO, logger="fluxserve.storage.outputs")
    async with app_factory(model=str(local), output_dir=out, api_keys=[USER], store_local=True) as client:
        body = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 1, "write_metadata": True}
        generated = await client.post("/v1/images/generations", json=body, headers=AUTH)
        assert generated.status_code == 200, generated.text[:300]
        item = generated.json()["data"][0]
        assert item["model"] == "local/tiny-flux"
        assert not Path(item["saved_path"]).is_absolute() and (out / item["saved_path"]).is_file()
        logged = [getattr(r, "ctx", {}).get("path") for r in caplog.records if r.getMessage() == "image saved"]
        assert str((out / item["saved_path"]).resolve()) in logged  # the log keeps the full path
        job = (await client.post("/v1/images/jobs", json=body, headers=AUTH)).json()
        answers = [generated,
                   await client.get(f"/v1/images/jobs/{job['id']}", headers=AUTH),
                   await client.get("/", headers={"accept": "application/json"}),
                   await client.get("/ready"),
                   await client.get("/v1/models", headers=AUTH),
                   await client.get("/metrics"),
                   await client.get("/v1/metrics/summary", headers=AUTH)]
        for answer in answers:
            text = answer.text.replace(item["b64_json"], "")
            for secret in (str(local), str(out), str(cache_dir), str(tmp_path)):
                assert secret not in text, (answer.request.url, secret)
        assert 'model="local/tiny-flux"' in answers[5].text  # the metric label of a local pipeline
        assert answers[4].json()["active_key"] == "local/tiny-flux"
        by_public_name = await client.post("/v1/images/generations", json={**body, "model": "local/tiny-flux"},
                                           headers=AUTH)
        assert by_public_name.status_code == 200, by_public_name.text[:300]  # the name clients see works
