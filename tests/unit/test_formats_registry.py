"""builder/formats is the one registry of formats and installer kinds: everything that offers a
choice of them reads it (adding a kind there is all the CLI, stamp and the service need)."""

from __future__ import annotations

import click

from builder import cli, formats
from builder.service import issuer
from builder.service.app import InstallerRequest


def test_every_kind_is_made_from_a_registered_format_and_names_its_suffix():
    for kind in formats.KINDS.values():
        assert kind.base in formats.NAMES, kind
        assert kind.suffix == "." + (kind.name if kind.name in formats.NAMES else kind.base), kind
    assert formats.SLOTTED == ("exe", "msi-tagged")
    assert {k.name: k.platform for k in formats.KINDS.values()} == {
        "exe": "windows", "msi": "windows", "msi-tagged": "windows", "pkg": "macos", "dmg": "macos"}
    assert formats.kinds_of(["msi", "pkg"]) == ["msi", "msi-tagged", "pkg", "dmg"]


def test_the_command_line_and_the_service_offer_exactly_the_registry():
    for name in ("stamp", "issue"):
        [choice] = [p.type for p in cli.main.commands[name].params if p.name == "fmt"]
        assert isinstance(choice, click.Choice) and tuple(choice.choices) == formats.KIND_NAMES, name
    assert issuer.FORMATS == formats.KIND_NAMES
    schema = InstallerRequest.model_json_schema()
    assert tuple(schema["properties"]["format"]["enum"]) == formats.KIND_NAMES
