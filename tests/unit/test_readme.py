"""The README stays true: its configuration reference is the one the code generates."""

from pathlib import Path

from tplus_dist.config.reference import BEGIN, END, config_reference, field_docs
from tplus_dist.config.run import RunConfig

ROOT = Path(__file__).resolve().parents[2]


def test_readme_config_reference_is_current() -> None:
    text = (ROOT / "README.md").read_text()
    current = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert current == config_reference(), "run: python -m tplus_dist.config.reference --write"


def test_every_knob_is_documented() -> None:
    import dataclasses
    import typing

    for sec in dataclasses.fields(RunConfig):
        cls = typing.get_type_hints(RunConfig)[sec.name]
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
        assert not missing, f"{sec.name}: fields without a docstring: {missing}"


def test_readme_names_the_two_commands_and_mfu() -> None:
    text = (ROOT / "README.md").read_text()
    assert "make quickstart" in text and "make test" in text
    assert "6N + 12" in text
