"""The command lines: every flag has help and a shown default, the flags the help text names exist, and the demo
checks what it is given before anything runs."""

import importlib.util
import re
import subprocess
import sys

import pytest

from transformers_vgr import app, convert, export
from transformers_vgr.reference import evaluate, synthetic, train, train_qwen
from transformers_vgr.training import sample_data

from conftest import ROOT


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PARSERS = {
    "app": app.parser,
    "convert": convert.parser,
    "export": export.parser,
    "reference.evaluate": evaluate.parser,
    "reference.synthetic": synthetic.parser,
    "reference.train": train.parser,
    "reference.train_qwen": train_qwen.parser,
    "training.sample_data": sample_data.parser,
    "examples/demo.py": lambda: load_example("demo").parser(),
    "examples/train_sft.py": lambda: load_example("train_sft").parser(),
}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_flag_has_help_and_a_shown_default(name):
    parser = PARSERS[name]()
    options = [action for action in parser._actions if action.option_strings and action.dest != "help"]
    assert options
    for action in options:
        assert action.help and action.help.strip(), f"{name}: {action.option_strings} has no help"
    text = parser.format_help()
    assert text.count("(default:") >= len(options), f"{name}: some defaults are not shown"
    # the flags the description names are the parser's own
    flags = {flag for action in parser._actions for flag in action.option_strings}
    described = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", parser.description or ""))
    assert described <= flags, f"{name}: its help names {described - flags}, which it does not have"


def run_demo(*args):
    return subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_demo_refuses_a_bad_image_before_anything_runs(tmp_path, capsys):
    missing = run_demo("--image", str(tmp_path / "nope.png"), "--question", "What?")
    assert missing.returncode == 2 and missing.stdout == ""  # nothing printed, no model loaded
    assert f"--image {tmp_path / 'nope.png'}: no such file" in missing.stderr and "Traceback" not in missing.stderr
    demo = load_example("demo")
    (tmp_path / "text.png").write_text("not an image")
    for args, message in [(["--image", str(tmp_path / "text.png"), "--question", "What?"], "cannot read image"),
                          (["--image", str(ROOT / "checkpoints" / "vgr-tiny" / "example.png")], "give --question"),
                          (["--model", str(tmp_path)], "no checkpoint at")]:
        with pytest.raises(SystemExit):
            demo.parse_args(args)
        assert message in capsys.readouterr().err


def test_demo_uses_the_image_and_question_it_is_given(tmp_path):
    """Another image and question: answered as given, without the bundled example's question or truth; the panel
    is written where asked."""
    from PIL import Image

    image = Image.open(ROOT / "checkpoints" / "vgr-tiny" / "example.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image.save(tmp_path / "flipped.png")
    result = run_demo("--image", str(tmp_path / "flipped.png"), "--question", "Which digit is written in the red box?",
                      "--output", str(tmp_path / "panel.png"), "--no-budget")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "image flipped.png (448 x 448)" in result.stdout and "truth" not in result.stdout
    # the red box, mirrored: x from 1 - 0.47 to 1 - 0.28
    assert "<sot>[0.53, 0.53, 0.72, 0.72]<eot>" in result.stdout
    assert (tmp_path / "panel.png").exists()


def test_reference_train_never_overwrites_by_default(tmp_path, capsys):
    assert train.parser().parse_args([]).output == ROOT / "outputs" / "vgr-tiny"
    with pytest.raises(SystemExit):
        train.main(["--output", str(ROOT / "checkpoints" / "vgr-tiny")])
    assert "--overwrite" in capsys.readouterr().err
