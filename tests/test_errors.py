"""Library errors name Python parameters; the command line says them as its flags."""

import ast
import re
from pathlib import Path

import click
import pytest

import mvmm
from mvmm.cli import command_flags, flag_of, in_flags, main
from mvmm.core.errors import InputError
from mvmm.joint import RegistrationSettings

PACKAGE = Path(mvmm.__file__).parent
LEADING = re.compile(r"^([A-Za-z_][\w.]*):")
BACKTICKED = re.compile(r"`([A-Za-z_][\w.]*)`")
# Parameters errors may name that no command sets, each with the reason no flag is needed.
PYTHON_ONLY = {
    "grid": "a Grid built in Python (a file's grid is checked when read, under the file's parameter)",
    "manifest": "check-manifest's MANIFEST is a positional argument, named as such by click",
    "initialisation": "initial_linear_transform's method, validated by the settings first",
    "params": "load_params: a Python helper",
    "registration": "segment_subject's Python-only argument",
    "path": "load_transforms / read_linear_transform: the command passes its own parameter name",
    "init_params": "MultivariateMixture.fit's Python-only argument",
    "results": "averaged_posterior: fits made in Python (the experiment passes its own), not a file or flag",
}
SETTINGS_BUILT_BY = {"default_registration": "RegistrationSettings"}


def settings_fields_the_cli_sets():
    """``Owner.field`` for every keyword the command line passes to a settings class."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    fields = set()
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        owner = SETTINGS_BUILT_BY.get(_callee(call), _callee(call))
        if owner and owner.endswith("Settings"):
            fields |= {f"{owner}.{k.arg}" for k in call.keywords if k.arg}
    return fields


def _text_pieces(node):
    """The literal text pieces of a message expression (str, f-string, or a concatenation)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value if isinstance(v, ast.Constant) else "\0" for v in node.values]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _text_pieces(node.left) + _text_pieces(node.right)
    return ["\0"]


def _callee(call):
    return call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", None)


def library_parameters():
    """Every parameter named by library errors: leading names, backticked names, choice/positivity
    checks of settings fields, and the ``argname`` values passed to readers; and messages with flags."""
    trees = {path: ast.parse(path.read_text()) for path in PACKAGE.rglob("*.py") if path.name != "cli.py"}
    argname_position = {}
    for tree in trees.values():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in fn.args.args]
                if "argname" in names:
                    index = names.index("argname")
                    argname_position.setdefault(fn.name, set()).add(index - (names[:1] in (["self"], ["cls"])))
    found, flagged = set(), []
    for path, tree in trees.items():
        classes = {}
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for node in ast.walk(cls):
                classes[id(node)] = cls.name
        for node in ast.walk(tree):
            if isinstance(node, ast.arg) and node.arg == "argname":
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.args]
                defaults = node.args.defaults
                for name, default in zip(names[len(names) - len(defaults):], defaults):
                    if name == "argname" and isinstance(default, ast.Constant):
                        found.add(default.value)
            if not isinstance(node, ast.Call):
                continue
            callee = _callee(node)
            if callee == "InputError" and node.args:
                text = "".join(_text_pieces(node.args[0]))
                match = LEADING.match(text)
                if match:
                    found.add(match.group(1))
                found |= set(BACKTICKED.findall(text))
                if re.search(r"--[a-z]", text):
                    flagged.append(f"{path.name}:{node.lineno}")
            if callee == "require_choice" and len(node.args) == 3 and isinstance(node.args[2], ast.Constant):
                found.add(node.args[2].value)
            owner = classes.get(id(node))
            if callee == "require_field_choice" and owner and isinstance(node.args[1], ast.Constant):
                found.add(f"{owner}.{node.args[1].value}")
            if callee == "require_positive" and owner and isinstance(node.args[1], ast.Tuple):
                found |= {f"{owner}.{e.value}" for e in node.args[1].elts}
            for keyword in node.keywords:
                if keyword.arg == "argname" and isinstance(keyword.value, ast.Constant):
                    found.add(keyword.value.value)
            for index in argname_position.get(callee, ()):
                if len(node.args) > index and isinstance(node.args[index], ast.Constant) \
                        and isinstance(node.args[index].value, str):
                    found.add(node.args[index].value)
    return found, flagged


def all_commands(group=main, prefix=()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from all_commands(command, prefix + (name,))
        else:
            yield prefix + (name,), command


def test_library_errors_speak_python_and_every_parameter_has_a_flag():
    found, flagged = library_parameters()
    assert not flagged, f"library messages that name command-line flags: {flagged}"
    assert {"images", "masks", "RegistrationSettings.atlas", "PairwiseSettings.metric", "fixed_path"} <= found
    flags = set().union(*(command_flags(command) for _, command in all_commands()))
    # a settings field the command line never sets cannot be wrong there; one it sets needs a flag
    settable = settings_fields_the_cli_sets()
    assert {"RegistrationSettings.atlas", "PairwiseSettings.metric", "GroupwiseSettings.register"} <= settable
    missing = sorted(p for p in found if flag_of(p, flags) is None and p not in PYTHON_ONLY
                     and ("Settings." not in p or p in settable))
    assert not missing, f"parameters named in errors that no command's flag sets: {missing}"


def test_an_error_is_said_in_the_flags_of_the_command_that_raised_it():
    segment_flags = command_flags(main.commands["segment"])
    message = ("RegistrationSettings.atlas: 'ffd' moves the atlas, but the subject has none (`atlas` none); "
               "set `RegistrationSettings.atlas`=none")
    assert in_flags(message, segment_flags) == ("--register-atlas: 'ffd' moves the atlas, but the subject has none "
                                                "(--atlas none); set --register-atlas=none")
    # a field the command has no flag for keeps its Python name; other text is left alone
    assert in_flags("RegistrationSettings.step_mm: expected > 0, got 0", segment_flags) == \
        "RegistrationSettings.step_mm: expected > 0, got 0"
    register_flags = command_flags(main.commands["register"])
    assert in_flags("PairwiseSettings.control_spacing: expected > 0, got -1", register_flags) == \
        "--control-spacing: expected > 0, got -1"
    assert in_flags("fixed_path: file not found: a.nii", register_flags) == "--fixed: file not found: a.nii"
    # in Python the same error names the settings field
    with pytest.raises(InputError, match=r"^RegistrationSettings\.control_spacing: expected > 0") as err:
        RegistrationSettings(control_spacing=0)
    assert err.value.parameter == "RegistrationSettings.control_spacing"


def test_command_line_errors_name_flags(tmp_path):
    from click.testing import CliRunner

    runner = CliRunner()
    result = runner.invoke(main, ["register", "--fixed", str(tmp_path / "no.nii.gz"), "--moving",
                                  str(tmp_path / "no2.nii.gz"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and result.output.startswith("Error: --fixed: file not found"), result.output
    result = runner.invoke(main, ["atlas", "build", "--label-maps", str(tmp_path / "no.nii.gz"), "--out",
                                  str(tmp_path / "a.nii.gz"), "--register", "affine"])
    assert result.exit_code == 1 and result.output.startswith("Error: --label-maps: file not found"), result.output


def test_every_numeric_option_of_every_command_rejects_invalid_values_cleanly():
    from click.testing import CliRunner

    from mvmm.cli import FiniteFloat, MarginOrNone

    runner, walked = CliRunner(), 0
    for path, command in all_commands():
        for param in command.params:
            if not isinstance(param, click.Option) or param.is_flag:
                continue
            numeric = isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType, FiniteFloat,
                                              MarginOrNone))
            if not numeric:
                continue
            # every number is checked at the boundary: a range or a finite-number type, never a bare int/float
            assert isinstance(param.type, (click.IntRange, FiniteFloat, MarginOrNone)), (path, param.opts)
            invalid = ["abc", "nan", "inf", "-1"]
            if (isinstance(param.type, FiniteFloat) and param.type.strict) or \
                    (isinstance(param.type, click.IntRange) and (param.type.min or 0) >= 1):
                invalid.append("0")
            flag = param.opts[0]
            for value in invalid:
                if value in ("nan", "inf") and isinstance(param.type, click.IntRange):
                    value = "1.5"  # not an integer
                result = runner.invoke(main, [*path, f"{flag}={value}"])
                assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (path, flag, value,
                                                                                            result.output)
                assert "Error: Invalid value for" in result.output and flag in result.output, (path, flag, value,
                                                                                               result.output)
                walked += 1
    assert walked > 60


def test_threads_are_set_for_torch_and_default_to_the_cores_this_process_may_use(tmp_path):
    import torch
    from click.testing import CliRunner

    from mvmm.core.devices import available_cores

    before = torch.get_num_threads()
    try:
        runner = CliRunner()
        result = runner.invoke(main, ["phantom", "--out", str(tmp_path / "p"), "--dims", "2"])
        assert result.exit_code == 0
        result = runner.invoke(main, ["register", "--threads", "1", "--fixed", str(tmp_path / "p" / "LGE.nii.gz"),
                                      "--moving", str(tmp_path / "p" / "LGE.nii.gz"), "--transform", "rigid",
                                      "--out", str(tmp_path / "r"), "-q"])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
        runner.invoke(main, ["register", "--fixed", str(tmp_path / "nope.nii.gz"), "--moving", "x", "--out", "y"])
        assert torch.get_num_threads() == available_cores()
    finally:
        torch.set_num_threads(before)
