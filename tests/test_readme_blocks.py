import pytest

from autosculpt_env.readme_blocks import end_marker, start_marker, update_block


def test_update_block_replaces_only_the_block(tmp_path):
    p = tmp_path / "README.md"
    p.write_text(f"intro\n{start_marker('table', 'gen.py')}\nold\n{end_marker('table')}\noutro\n")
    assert update_block(p, "table", "| a |\n")
    assert p.read_text() == (
        f"intro\n{start_marker('table', 'gen.py')}\n| a |\n{end_marker('table')}\noutro\n"
    )
    assert not update_block(p, "table", "| a |")  # unchanged the second time


def test_missing_block_is_left_alone_and_broken_block_is_refused(tmp_path):
    p = tmp_path / "README.md"
    p.write_text("no block here\n")
    assert not update_block(p, "table", "x")
    assert p.read_text() == "no block here\n"
    p.write_text(f"{start_marker('table', 'gen.py')}\nold, never closed\n")
    with pytest.raises(ValueError, match="table"):
        update_block(p, "table", "x")
    assert "old, never closed" in p.read_text()
