"""`napari-bci view/demo` argument handling and bad input (no window is opened on error)."""

import pytest


def test_help_lists_the_contract_commands(run_cli):
    with pytest.raises(SystemExit) as e:
        run_cli("--help")
    assert e.value.code == 0


@pytest.mark.parametrize("cmd", ["demo", "view", "info", "sample", "models", "register", "transform",
                                 "generate", "evaluate", "ssim", "score", "train"])
def test_every_contract_subcommand_exists(cmd, capsys):
    from napari_bci.cli import main

    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: napari-bci " + cmd in capsys.readouterr().out


def test_view_missing_file_is_one_line_exit_2(run_cli, tmp_path):
    code, out, err = run_cli("view", tmp_path / "nope.svs")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "nope.svs" in err and "no such file" in err


def test_view_unsupported_file_is_one_line_exit_2(run_cli, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    code, out, err = run_cli("view", bad)
    assert code == 2 and "notes.txt" in err and err.count("\n") == 1


def test_view_corrupt_png_is_one_line_exit_2(run_cli, tmp_path, data_dir):
    bad = tmp_path / "cut.png"
    bad.write_bytes((data_dir / "he_tile_240.png").read_bytes()[:2000])
    code, out, err = run_cli("view", bad)
    assert code == 2 and "cut.png" in err and err.count("\n") == 1
