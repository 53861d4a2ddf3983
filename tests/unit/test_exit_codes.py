"""One exit code per kind of failure: the classes of builder/errors.py each have their own, every
other error class of the package exits with its kind's, and the README's table lists them."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import builder
from builder import errors

README = Path(__file__).resolve().parents[2] / "README.md"


def _all_error_classes() -> set[type]:
    for info in pkgutil.walk_packages(builder.__path__, "builder."):
        if not info.name.endswith("__main__"):  # runs the CLI
            importlib.import_module(info.name)
    found, todo = set(), [errors.BuilderError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def test_each_kind_has_its_own_exit_code():
    codes = [cls.exit_code for cls in errors.ALL_ERRORS]
    assert len(codes) == len(set(codes))


def test_every_error_of_the_package_exits_with_its_kinds_code():
    kinds = set(errors.ALL_ERRORS)
    for cls in _all_error_classes() - kinds:
        kind = next(k for k in cls.__mro__ if k in kinds)
        assert cls.exit_code == kind.exit_code, (cls, kind)
        assert cls.__module__ != "builder.errors" or cls in kinds, f"{cls.__name__} is missing from ALL_ERRORS"


def test_the_readme_table_lists_every_exit_code():
    section = README.read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", section, re.M)}
    assert documented == {cls.exit_code for cls in errors.ALL_ERRORS} - {errors.BuilderError.exit_code}


def test_a_field_is_named_by_whoever_reports_it():
    exc = errors.EnrollmentError("{field} is empty", "give the console's account id", field="account_id")
    assert exc.message == "account_id is empty"
    assert exc.worded(lambda f: "--" + f.replace("_", "-")) == "--account-id is empty"
    assert str(exc) == "account_id is empty: give the console's account id"
    assert errors.UsageError("no {field} here").message == "no {field} here"  # no field: the text as written


def test_a_placed_error_keeps_its_class_attributes_and_words():
    from builder.trust import EnrollmentRefused

    exc = EnrollmentRefused("host", "the enrollment's console_url is not allowed: x")
    placed = exc.placed("--groups g line 4")
    assert type(placed) is EnrollmentRefused and placed.reason == "host" and placed.exit_code == exc.exit_code
    assert str(placed) == f"--groups g line 4: the enrollment's console_url is not allowed: x: {exc.hint}"
    field = errors.EnrollmentError("{field} is empty", "give it", field="group_id").placed("line 2", lambda f: '"group"')
    assert field.message == 'line 2: "group" is empty' and field.field is None
