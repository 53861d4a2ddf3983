import pytest

from builder.render import nsis_string, sh_quote


def test_nsis_escapes():
    assert nsis_string('a$b"c\nd') == 'a$$b$\\"c$\\nd'
    with pytest.raises(ValueError):
        nsis_string("a\0b")


def test_sh_quote_is_one_word():
    import shlex

    for value in ["plain", "a'b", "$(rm -rf /)", "a b;c&d", "`x`"]:
        assert shlex.split(sh_quote(value)) == [value]
