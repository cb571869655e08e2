"""
The command line of every FoldGPT script: a dataclass of knobs, overridden by config files and
`--key=value` flags, with types checked. Shared so that train.py, sample.py and prepare_data.py
read their arguments the same way and fail the same way.

    python train.py config/cpu_quick.py --max_iters=100 --compile=False
    python bench.py --quick                   # a bare --flag sets a bool option to True
    python train.py --help                    # every option, its default and its comment

A config file holds `key = value` lines of Python literals. It is parsed, never executed.
"""

import ast
import inspect
import io
import sys
import tokenize
from dataclasses import fields


def fail(message):
    """Bad input: one line on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_value(name, kind, text):
    """Turn the text of a flag into the field's type, or fail saying what was expected."""
    if kind is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
    else:
        try:
            return kind(text)
        except ValueError:
            pass
    fail(f"--{name} wants a value of type {kind.__name__}, got {text!r}")


def check_value(name, kind, value):
    """A value from a config file must already have the field's type (an int may be a float)."""
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:
        fail(f"{name} wants a value of type {kind.__name__}, got {value!r}")
    return value


def read_config_file(path):
    try:
        tree = ast.parse(open(path).read(), filename=path)
    except OSError as e:
        fail(f"cannot read config file {path}: {e.strerror}")
    except SyntaxError as e:
        fail(f"config file {path}, line {e.lineno}: not Python")
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring or a bare string: a comment
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            fail(f"config file {path}, line {node.lineno}: only `key = value` lines are allowed")
        try:
            values[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            fail(f"config file {path}, line {node.lineno}: the value must be a literal")
    return values


def field_comments(cls):
    """{field name: its comment} from the dataclass's source: the comment at the end of the
    field's line, and the comment lines below it whose text is indented (`#    more`)."""
    comments, field = {}, None
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.NAME and tok.line[:tok.start[1]].isspace() and \
                tok.line[tok.end[1]:].lstrip().startswith(":"):
            field = tok.string  # a line `name: type = value`
        elif tok.type == tokenize.COMMENT and field is not None:
            own_line = not tok.line[:tok.start[1]].strip()
            if not own_line and tok.start[0] == tok.end[0] and field not in comments:
                comments[field] = tok.string.lstrip("# ")
            elif own_line and tok.string.startswith("#  ") and field in comments:
                comments[field] += " " + tok.string.lstrip("# ")
            elif own_line:
                field = None  # a comment that heads the next group of fields
    return comments


def configure(config, argv):
    """Apply config files and --key=value flags in argv, in order, to the dataclass config
    (`--key value` too, but for a bool, where `--key` alone means True)."""
    kinds = {f.name: f.type for f in fields(config)}  # int, float, bool or str
    valid = ", ".join(kinds)
    argv = list(argv)
    while argv:
        arg = argv.pop(0)
        if arg in ("-h", "--help"):
            print("options (--key=value, or `key = value` lines in a config file), with their "
                  "defaults:")
            comments = field_comments(type(config))
            for name in kinds:
                print(f"  --{name}={getattr(config, name)!r}  {comments.get(name, '')}".rstrip())
            sys.exit(0)
        if arg.startswith("--"):
            name, eq, text = arg[2:].partition("=")
            if name not in kinds:
                fail(f"unknown option --{name}; valid options: {valid}")
            if not eq and kinds[name] is not bool:
                if not argv:
                    fail(f"--{name} needs a value: write --{name}=VALUE")
                eq, text = "=", argv.pop(0)
            setattr(config, name, parse_value(name, kinds[name], text) if eq else True)
        else:
            for name, value in read_config_file(arg).items():
                if name not in kinds:
                    fail(f"unknown option {name} in {arg}; valid options: {valid}")
                setattr(config, name, check_value(name, kinds[name], value))
    return config
