"""The command line as a user meets it: help texts that read as paragraphs, and typer's own
usage errors (an unknown option, a value outside the choices) as one `error:` line."""

from __future__ import annotations

import typer
from conftest import run_ddm_in_process

from cluster_jobs.cli import app
from cluster_jobs.options import paragraphs
from ddm_nodes.presets import EXPERT_PRESETS, ROUTER_PRESETS


def _commands(group, path=()):
    for name, command in group.commands.items():
        yield (*path, name), command
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))


def test_paragraphs_join_hard_wrapped_lines():
    doc = """First line that
    goes on here.

        Second   paragraph,
        wrapped."""
    assert paragraphs(doc) == "First line that goes on here.\n\nSecond paragraph, wrapped."


def test_every_help_text_is_whole_paragraphs():
    """A line break inside a paragraph would break the sentence where the source wrapped."""
    commands = list(_commands(typer.main.get_command(app)))
    assert {("train", "expert"), ("submit",), ("analyze",), ("demo",)} <= {p for p, _ in commands}
    for path, command in commands:
        text = command.help or ""
        assert "\n" not in text.replace("\n\n", ""), (path, text)
        for param in command.params:
            assert "\n" not in (getattr(param, "help", None) or ""), (path, param.name)


def test_preset_offers_the_registry_and_a_bad_one_is_one_line():
    for kind, registry in (("expert", EXPERT_PRESETS), ("router", ROUTER_PRESETS)):
        done = run_ddm_in_process("train", kind, "--store", "s", "--preset", "x")
        assert done.returncode == 2
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith("error: ") and "'x' is not one of" in line
        assert all(repr(name) in line for name in registry), line


def test_an_unknown_option_is_one_line_naming_the_help():
    done = run_ddm_in_process("submit", "--store", "s", "--warmup-stepz", "3")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "--warmup-stepz" in line and "submit --help`" in line


def test_a_bad_list_item_names_its_option_and_position(tmp_path):
    done = run_ddm_in_process("analyze", "--store", "s", "--out", str(tmp_path), "--seeds", "0,x")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: --seeds (item 2): ")


def test_serve_default_app_name_is_the_apps():
    """serving.py names the default without importing router_service.app (torch, diffusers):
    the two must not drift apart."""
    from cluster_jobs.ops.serving import DEFAULT_APP_NAME
    from router_service.app import APP_NAME

    assert DEFAULT_APP_NAME == APP_NAME
