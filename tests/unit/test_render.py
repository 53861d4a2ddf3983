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


def test_nsis_does_not_expand_environment_or_defines(tmp_path, monkeypatch):
    """makensis expands $%VAR% and ${DEFINE} before $$: the escaped value must come out literally."""
    import subprocess

    monkeypatch.setenv("BUILDER_LEAK_CHECK", "LEAKED")
    value = "a$%BUILDER_LEAK_CHECK%b${NSIS_VERSION}c$$d$INSTDIR\"e"
    script = tmp_path / "t.nsi"
    out = tmp_path / "out.txt"
    script.write_text(
        'Unicode true\nOutFile "t.exe"\n!define V "' + nsis_string(value) + '"\n'
        f'!appendfile "{out}" "${{V}}"\nSection\nSectionEnd\n',
        encoding="utf-8",
    )
    proc = subprocess.run(["makensis", "-V1", str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = out.read_text(encoding="utf-8", errors="replace")
    assert "LEAKED" not in written
