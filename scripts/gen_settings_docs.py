"""Regenerate .env.example and the settings table in docs/settings.md from fluxserve.settings.Settings.

Run: ./run python scripts/gen_settings_docs.py  (tests/test_settings.py checks both are up to date)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from fluxserve.settings import Settings, env_var_name

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_DOC = ROOT / "docs" / "settings.md"
BEGIN, END = "<!-- settings-table:begin -->", "<!-- settings-table:end -->"


def _default(name: str) -> str:
    value: Any = Settings(_env_file=None).model_dump(mode="json")[name]  # type: ignore[call-arg]
    if name == "cache_dir":
        return "~/.cache/fluxserve"
    if name == "state_dir":
        return "~/.local/state/fluxserve"
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _doc(name: str) -> str:
    description = Settings.model_fields[name].description or ""
    return " ".join(description.split())


def env_example() -> str:
    lines = ["# fluxserve settings: every variable with its default. Copy to .env and uncomment what you change.",
             "# The earlier server's names still work: FLUX_MODEL_KEY / FLUX_MODEL_ID (-> FLUX_MODEL),",
             "# IMAGE_SERVER_PORT (-> FLUX_PORT), HUGGINGFACE_HUB_TOKEN / HF_ACCESS_TOKEN (-> HF_TOKEN).", ""]
    for name in Settings.model_fields:
        lines.append(f"# {_doc(name)}")
        lines.append(f"# {env_var_name(name)}={_default(name)}")
    return "\n".join(lines) + "\n"


def table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name in Settings.model_fields:
        default = _default(name).replace("|", "\\|")
        rows.append(f"| `{env_var_name(name)}` | `{default}` | {_doc(name).replace('|', '&#124;')} |"
                    if default else f"| `{env_var_name(name)}` | | {_doc(name).replace('|', '&#124;')} |")
    return "\n".join(rows)


def main() -> int:
    (ROOT / ".env.example").write_text(env_example())
    text = SETTINGS_DOC.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: BEGIN + "\n" + table() + "\n" + END, text)
    SETTINGS_DOC.write_text(text)
    print(json.dumps({"settings": len(Settings.model_fields)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
