"""The docs cannot drift from the code: the documented `/health` keys against what the daemon answers,
the config reference against the config's schema, the metrics reference against `/metrics`, and every
link between the docs against the files and headings that exist. No document outside the repo is
referred to."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from wacored.config import Config, ForwardingConfig, HomeMenuConfig, MenuItem, ServiceConfig
from wacored.config._sections import NumberConfig

from .conftest import World

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def first_cells(path: Path, header: str) -> list[str]:
    """The first cell of every row of the table whose header row starts with `header`."""
    cells: list[str] = []
    in_table = False
    for line in path.read_text().splitlines():
        if line.startswith(f"| {header} |"):
            in_table = True
        elif in_table and line.startswith("|") and not line.startswith("|---"):
            cells.append(line.split(" | ")[0].removeprefix("| "))
        elif in_table and not line.startswith("|"):
            in_table = False
    return cells


# --- /health ----------------------------------------------------------------------------------------


async def test_the_documented_health_keys_are_the_ones_the_daemon_answers(world: World) -> None:
    body = (await world.daemon.client.get(f"{world.daemon.url}/health")).json()
    keys = {re.sub(r"`", "", cell) for cell in first_cells(DOCS / "contract.md", "key")}
    documented = {
        "top": {k for k in keys if "." not in k},
        "checks": {k.removeprefix("checks.") for k in keys if k.startswith("checks.")},
        "services": {k.removeprefix("services.NAME.") for k in keys if k.startswith("services.NAME.")},
    }
    answered = {"top": set(body), "checks": set(body["checks"]), "services": set(body["services"]["rides"])}
    assert documented == answered


# --- the config reference ---------------------------------------------------------------------------


def documented_config_keys() -> set[tuple[str, str]]:
    """(section, key) for every key the reference names, e.g. ``server.certfile / server.keyfile``,
    ``sessions.dlq_retention_days / abandoned_retention_days``, ``[services.NAME] timeout_ms, ...``."""
    found: set[tuple[str, str]] = set()
    for cell in first_cells(DOCS / "configuration.md", "key"):
        section = ""
        for token in re.findall(r"`([^`]+)`", cell):
            if m := re.fullmatch(r"\[\[([a-z_.]+)\]\]", token):  # [[home_menu.items]]
                section = m.group(1)
            elif m := re.fullmatch(r"\[([a-z_]+)\.(?:NAME|ID)\]", token):  # [services.NAME]
                section = m.group(1)
            elif m := re.fullmatch(r"\[([a-z_]+)\.ID\.([a-z_]+)\]", token):  # [numbers.ID.home_menu]
                found.add((m.group(1), m.group(2)))
            elif "." in token:
                section, key = token.rsplit(".", 1)
                found.add((section, key))
            else:
                found.add((section, token))
    return found


def schema_config_keys() -> set[tuple[str, str]]:
    """(section, key) for every key the config accepts, from the config's dataclasses."""

    def names(cls: Any, skip: tuple[str, ...] = ()) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if f.name not in skip}

    keys: set[tuple[str, str]] = set()
    for section, cls in typing.get_type_hints(Config).items():
        if dataclasses.is_dataclass(cls) and section != "home_menu":
            keys |= {(section, name) for name in names(cls)}
    keys -= {("server", "host"), ("server", "port")}
    keys.add(("server", "listen"))  # host and port are read from one `listen` key
    keys |= {("home_menu", name) for name in names(HomeMenuConfig, ("items",))}
    keys |= {("home_menu.items", name) for name in names(MenuItem)}
    keys |= {("services", name) for name in names(ServiceConfig, ("name", "forwarding"))}
    keys |= {("services", name) for name in names(ForwardingConfig)}  # per-service overrides
    keys |= {("numbers", name) for name in names(NumberConfig, ("id",))}
    return keys


def test_the_config_reference_names_every_key_and_only_real_ones() -> None:
    documented, schema = documented_config_keys(), schema_config_keys()
    assert sorted(schema - documented) == [], "keys the config accepts that the reference does not name"
    assert sorted(documented - schema) == [], "keys the reference names that the config does not accept"


# --- the metrics reference --------------------------------------------------------------------------


async def test_the_metrics_reference_names_every_metric_and_only_exported_ones(world: World) -> None:
    text = (await world.daemon.client.get(f"{world.daemon.url}/metrics")).text
    exported = set()
    for family in text_string_to_metric_families(text):
        if family.name.startswith("wacored_"):
            exported.add(family.name + ("_total" if family.type == "counter" else ""))
    documented = set()
    for cell in first_cells(DOCS / "metrics.md", "metric"):
        documented |= {t for t in re.findall(r"`(wacored_[a-z0-9_]+)`", cell)}
    assert sorted(exported - documented) == [], "exported but not documented"
    assert sorted(documented - exported) == [], "documented but not exported"


# --- links ------------------------------------------------------------------------------------------


def anchors(path: Path) -> set[str]:
    found, in_code = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"^#+ (.*)$", line)):
            found.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return found


def test_every_link_between_the_docs_leads_somewhere() -> None:
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), ROOT / "bench" / "README.md"]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = target.partition("#")
            resolved = (page.parent / file).resolve() if file else page
            assert resolved.exists(), f"{page.name}: {target} does not exist"
            if anchor and resolved.suffix == ".md":
                assert anchor in anchors(resolved), f"{page.name}: no heading #{anchor} in {resolved.name}"


def test_the_architecture_names_every_module() -> None:
    """The design map says where each thing lives: a new module must find its place in it."""
    text = (DOCS / "architecture.md").read_text()
    package = ROOT / "wacored"
    modules = [p for p in package.rglob("*.py") if "config" not in p.relative_to(package).parts]
    missing = sorted(str(p.relative_to(package)) for p in modules if f"`{p.relative_to(package)}`" not in text)
    assert missing == []


def test_nothing_refers_to_documents_outside_the_repo() -> None:
    # The names are spelled in pieces so that this file is not itself a reference to them.
    names = [
        "\\.\\./" + "shared",
        "ARCHITECTURE" + "\\.md",
        "STACK" + "_NOTES",
        "STYLE" + "\\.md",
        "the original " + "system",
        "design's " + "prototype",
    ]
    outside = re.compile("|".join(names))
    for path in [
        *ROOT.glob("*.md"),
        *DOCS.glob("*.md"),
        *(ROOT / "wacored").rglob("*.py"),
        *(ROOT / "tests").glob("*.py"),
        *(ROOT / "bench").glob("*"),
        *(ROOT / "deploy").rglob("*"),
    ]:
        if path.is_file() and path.name != "test_docs.py":
            assert not outside.search(path.read_text(errors="replace")), path
