"""The import contracts of .importlinter hold (layers import only downward; models never see
the mesh or the trainer; the simulators import no learning code; data loaders never import the
trainer; the planner model never imports control), and every package sits in a layer, so a new
upward import or a new package outside the layers fails the default suite."""

from __future__ import annotations

import configparser
import pathlib
import pkgutil

from importlinter import cli

import pewm_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_import_contract_holds(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli.lint_imports(config_filename=str(ROOT / ".importlinter"), no_cache=True,
                            no_logo=True) == 0, "an import breaks a contract: see the report above"


def _layered_modules() -> set[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / ".importlinter")
    layers = parser["importlinter:contract:layers"]["layers"].split()
    return {name for name in layers if name != "|"}


def test_every_module_of_the_library_sits_in_a_layer():
    layered = _layered_modules()
    top = {f"pewm_jax.{m.name}" for m in pkgutil.iter_modules(pewm_jax.__path__)}
    missing = sorted(top - layered)
    assert not missing, (f"{missing} are in no layer of .importlinter: add each to the layer "
                         "whose imports it needs (README \"Layout\")")
