"""Generated prompts files and Python-API prompts (hypothesis): any prompt text survives exactly, any number is
kept exactly or refused with file:line:field, and nothing raises but ``ValidationError``.

Files are written with the real writers (the csv module, ``json.dumps``) and read back through
``producer.inputs.read_prompts``; the Python API goes through ``producer.inputs.prompt_specs``, the same
checks ``Client.submit`` runs; both then through ``producer.batching.build_items``. No Redis is needed.
A last test runs ``fluxfleet submit`` as a process on hostile files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fluxfleet.adapters import AdapterSpec
from fluxfleet.caching import canonical_policy
from fluxfleet.errors import InputFileError, ValidationError
from fluxfleet.presets import load_preset
from fluxfleet.schema import Item
from fluxfleet.settings import GenerationDefaults, LimitSettings, Settings
from producer.batching import build_items
from producer.inputs import OVERRIDE_FIELDS, PromptSpec, prompt_specs, read_prompts

ROOT = Path(__file__).resolve().parent.parent
PRESET = load_preset("tiny", Settings().presets_dir)
DEFAULTS = GenerationDefaults(width=64, height=64, steps=4, guidance=3.5, max_sequence_length=512)
LIMITS = LimitSettings()
GENERATED = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# -- prompt text ------------------------------------------------------------------------------------

# Characters that broke or could break a reader: separators str.splitlines() knows, quotes, the CSV
# delimiter, a BOM inside the text, and the '#' of .txt comments.
HOSTILE = ["\n", "\r", "\r\n", "\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e", "\ufeff"]
HOSTILE += ['"', "'", ",", ";", "\t", " ", "#", "\\", "\x1b", "\u00e9", "\U0001f98a", "\u202e", "\u0301"]
VISIBLE = st.characters(exclude_categories=["Cs", "Cc", "Zs", "Zl", "Zp"])  # one is enough: not an empty prompt
ANY_CHAR = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")  # NUL: refused (see below)
PIECES = st.one_of(st.text(ANY_CHAR, max_size=8), st.sampled_from(HOSTILE))
PROMPT = st.tuples(st.lists(PIECES, max_size=5), VISIBLE, st.lists(PIECES, max_size=5)).map(
    lambda t: "".join(t[0]) + t[1] + "".join(t[2])
)

TXT_CHAR = st.characters(exclude_categories=["Cs"], exclude_characters="\x00\n\r")
TXT_HOSTILE = [h for h in HOSTILE if "\n" not in h and "\r" not in h]
TXT_PIECES = st.lists(st.one_of(st.text(TXT_CHAR, max_size=8), st.sampled_from(TXT_HOSTILE)), max_size=5)
TXT_PROMPT = (
    st.tuples(TXT_PIECES, VISIBLE, TXT_PIECES)
    .map(lambda t: ("".join(t[0]) + t[1] + "".join(t[2])).strip(" \t"))
    # A leading U+FEFF on the first line would be the file's byte order mark, which is dropped.
    .filter(lambda p: not p.startswith(("#", "\ufeff")))
)

# -- numbers: (written value, what it must read as) -- an int/float, or REFUSED, or UNSET -------------

REFUSED = object()
UNSET = object()
# Values every limit accepts somewhere (widths 64/128, small steps, seeds at the generator's edges), so
# items get built, and whole numbers of any size.
WHOLE = st.one_of(
    st.sampled_from([1, 2, 4, 16, 64, 128, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64]),
    st.integers(min_value=-(2**70), max_value=2**70),
)


def _int_texts(n: int) -> list[tuple[str, Any]]:
    return [(str(n), n), (f" {n} ", n), (f"{n}.0", n), (f"{n}.5", REFUSED), (f"{n}e0", n)]


INT_TEXT = st.one_of(
    WHOLE.flatmap(lambda n: st.sampled_from(_int_texts(n))),
    st.sampled_from(
        [
            ("", UNSET),
            ("inf", REFUSED),
            ("-Infinity", REFUSED),
            ("nan", REFUSED),
            ("1e400", REFUSED),
            ("1" * 5000, REFUSED),
            ("true", REFUSED),
            ("True", REFUSED),
            ("64px", REFUSED),
            ("0x40", REFUSED),
            ("6 4", REFUSED),
            ("--1", REFUSED),
        ]
    ),
)
FINITE = st.one_of(st.floats(min_value=0, max_value=30), st.floats(allow_nan=False, allow_infinity=False))
# Whole floats only where the float and its JSON text are the same number (below 2^53).
WHOLE_FLOAT = st.integers(min_value=-(2**53), max_value=2**53).map(float)
FRACTION = st.one_of(st.integers(-(2**40), 2**40).map(lambda n: n + 0.5), st.floats(min_value=1e-300, max_value=0.999))
FLOAT_TEXT = st.one_of(
    FINITE.map(lambda f: (repr(f), f)),
    WHOLE.map(lambda n: (str(n), float(n))),
    st.sampled_from([("", UNSET), ("inf", REFUSED), ("nan", REFUSED), ("1e400", REFUSED), ("abc", REFUSED)]),
)
# JSON and Python values: ints stay ints (also past 2^53), booleans and non-numbers are refused.
INT_VALUE = st.one_of(
    WHOLE.map(lambda n: (n, n)),
    INT_TEXT,
    st.sampled_from([(True, REFUSED), (False, REFUSED), (None, UNSET), ([64], REFUSED), ({"n": 1}, REFUSED)]),
    WHOLE_FLOAT.map(lambda f: (f, int(f))),
    FRACTION.map(lambda f: (f, REFUSED)),
)
FLOAT_VALUE = st.one_of(
    FINITE.map(lambda f: (f, f)),
    WHOLE.map(lambda n: (n, float(n))),
    FLOAT_TEXT,
    st.sampled_from([(True, REFUSED), (None, UNSET), ([1.0], REFUSED)]),
)
# Cache policies: kept in their canonical form, or refused; anything but text is refused.
POLICY_TEXT = st.one_of(
    st.sampled_from(["magcache", " MAG:0.12 ", "fbcache:threshold=0.3", "taylorseer:4", "none"]).map(
        lambda t: (t, canonical_policy(t))
    ),
    st.floats(0, 1, allow_nan=False).map(
        lambda f: (f"magcache:{f!r},max_skip=2", canonical_policy(f"mag:{f!r},max_skip=2"))
    ),
    st.sampled_from([("", UNSET), ("turbo", REFUSED), ("magcache:2", REFUSED), ("1", REFUSED), ("mag:k=1", REFUSED)]),
)
POLICY_VALUE = st.one_of(
    POLICY_TEXT, st.sampled_from([(None, UNSET), (1, REFUSED), (True, REFUSED), (["magcache"], REFUSED)])
)
# LoRA adapters: compact text 'source@scale; ...' anywhere, a list of {source, scale} objects as values.
ADAPTER_SOURCE = st.from_regex(r"[A-Za-z0-9_./-]{1,20}\.safetensors", fullmatch=True)
ADAPTER_LIST = st.lists(
    st.tuples(ADAPTER_SOURCE, st.floats(-4, 4, allow_nan=False)), min_size=1, max_size=4, unique_by=lambda a: a[0]
)
ADAPTERS_TEXT = st.one_of(
    ADAPTER_LIST.map(
        lambda adapters: (
            "; ".join(f"{source}@{scale!r}" for source, scale in adapters),
            tuple(AdapterSpec(source, scale) for source, scale in adapters),
        )
    ),
    st.sampled_from([("", UNSET), ("a.safetensors@5", REFUSED), ("a@x", REFUSED), ("a;b;c;d;e", REFUSED)]),
)
ADAPTERS_VALUE = st.one_of(
    ADAPTER_LIST.map(
        lambda adapters: (
            [{"source": source, "scale": scale} for source, scale in adapters],
            tuple(AdapterSpec(source, scale) for source, scale in adapters),
        )
    ),
    ADAPTERS_TEXT,
    st.sampled_from([(None, UNSET), (3, REFUSED), (True, REFUSED), ([{"source": 1}], REFUSED)]),
)


# Image-to-image sources are kept as written (stripped) or refused by scheme; items built without reading them
# are refused (field 'image'). Strengths are 0 < s <= 1.
IMAGE_TEXT = st.sampled_from(
    [("cat.png", "cat.png"), (" https://example.com/a.png ", "https://example.com/a.png"), ("", UNSET),
     ("s3://my-bucket/in/a.png", "s3://my-bucket/in/a.png"), ("file:///etc/passwd", REFUSED), ("ftp://h/a", REFUSED)]
)  # fmt: skip
IMAGE_VALUE = st.one_of(IMAGE_TEXT, st.sampled_from([(None, UNSET), (5, REFUSED), (["a.png"], REFUSED)]))
STRENGTH = st.floats(min_value=0, max_value=1, exclude_min=True)
STRENGTH_TEXT = st.one_of(
    STRENGTH.map(lambda f: (repr(f), f)),
    st.sampled_from([("", UNSET), ("0", REFUSED), ("1.5", REFUSED), ("-0.2", REFUSED), ("nan", REFUSED)]),
)
STRENGTH_VALUE = st.one_of(
    STRENGTH.map(lambda f: (f, f)),
    st.sampled_from([(1, 1.0), (None, UNSET), (0, REFUSED), (0.0, REFUSED), (True, REFUSED), (2, REFUSED)]),
)


def overrides(texts: bool) -> st.SearchStrategy[dict[str, tuple[Any, Any]]]:
    """A few override fields, each with a written value and what it must read as."""
    ints, floats = (INT_TEXT, FLOAT_TEXT) if texts else (INT_VALUE, FLOAT_VALUE)
    by_type = {
        int: ints,
        float: floats,
        str: POLICY_TEXT if texts else POLICY_VALUE,
        tuple: ADAPTERS_TEXT if texts else ADAPTERS_VALUE,
    }
    by_name = {"image": IMAGE_TEXT if texts else IMAGE_VALUE, "strength": STRENGTH_TEXT if texts else STRENGTH_VALUE}
    return st.dictionaries(
        st.sampled_from(sorted(OVERRIDE_FIELDS)),
        st.just(None),
        max_size=3,
    ).flatmap(
        lambda chosen: st.fixed_dictionaries(
            {name: by_name[name] if name in by_name else by_type[OVERRIDE_FIELDS[name]] for name in chosen}
        )
    )


ROWS_TEXT = st.lists(st.tuples(PROMPT, overrides(texts=True)), min_size=1, max_size=6)
ROWS_VALUE = st.lists(st.tuples(PROMPT, overrides(texts=False)), min_size=1, max_size=6)


# -- the properties -----------------------------------------------------------------------------------


def first_refusal(rows: list[tuple[str, dict[str, tuple[Any, Any]]]]) -> tuple[int, set[str]] | None:
    """Index of the first row with a value that must be refused, and the fields that may be named."""
    for index, (_prompt, values) in enumerate(rows):
        bad = {name for name, (_written, expected) in values.items() if expected is REFUSED}
        if bad:
            return index, bad
    return None


def check_read(specs: list[PromptSpec], rows: list[tuple[str, dict[str, tuple[Any, Any]]]], sources: list[str]) -> None:
    assert [s.prompt for s in specs] == [prompt for prompt, _ in rows]
    assert [s.source for s in specs] == sources
    for spec, (_prompt, values) in zip(specs, rows, strict=True):
        expected = {name: value for name, (_w, value) in values.items() if value is not UNSET}
        assert spec.overrides == expected
        assert all(type(v) is OVERRIDE_FIELDS[k] for k, v in spec.overrides.items())


def check_items(specs: list[PromptSpec], expected: list[dict[str, Any]] | None = None) -> None:
    """Building items keeps each prompt and number exactly, or refuses one with its line and field."""
    wanted = {s.source: o for s, o in zip(specs, expected or [s.overrides for s in specs], strict=True)}
    try:
        items = build_items(specs, preset=PRESET, model="m", defaults=DEFAULTS, limits=LIMITS, job_seed=1)
    except ValidationError as e:
        assert e.where in {s.source for s in specs} and e.field in {*OVERRIDE_FIELDS, "prompt"}, e
        event(f"items refused ({e.field})")
        return
    event("items built")
    by_source: dict[str, list[Item]] = {}
    for item in items:
        by_source.setdefault(item.source, []).append(item)
    for spec in specs:
        made, overrides = by_source[spec.source], wanted[spec.source]
        assert len(made) == overrides.get("images_per_prompt", 1)
        for offset, item in enumerate(made):
            assert item.prompt == spec.prompt
            assert Item.model_validate_json(item.model_dump_json()) == item  # survives the queue's JSON
            if "seed" in overrides:
                assert item.seed == overrides["seed"] + offset
            for name in ("width", "height", "steps", "guidance", "max_sequence_length", "cache"):
                if name in overrides:
                    value = getattr(item.params, name)
                    assert value == overrides[name] and type(value) is OVERRIDE_FIELDS[name]


def read_or_refusal(path: Path) -> list[PromptSpec] | InputFileError:
    try:
        return read_prompts(path)
    except InputFileError as e:  # anything else fails the test
        return e


def check(path: Path, rows: list[tuple[str, dict[str, tuple[Any, Any]]]], sources: list[str]) -> None:
    result = read_or_refusal(path)
    refusal = first_refusal(rows)
    event("file refused" if refusal else "file read")
    if refusal is None:
        assert not isinstance(result, InputFileError), result
        check_read(result, rows, sources)
        check_items(result)
    else:
        index, fields = refusal
        assert isinstance(result, InputFileError), f"accepted {result}"
        assert result.where == sources[index] and result.field in fields, result


@GENERATED
@given(rows=ROWS_TEXT, bom=st.booleans(), ending=st.sampled_from(["\r\n", "\n"]))
def test_csv_written_by_the_csv_module_reads_back_exactly(
    tmp_path: Path, rows: list[tuple[str, dict[str, tuple[Any, Any]]]], bom: bool, ending: str
) -> None:
    columns = ["prompt", *sorted({name for _, values in rows for name in values})]
    buffer = io.StringIO(newline="")
    # Python 3.11's writer leaves a field with a lone \r unquoted when lines end in \n alone (the file then
    # says something else); with \n endings every field is quoted.
    writer = csv.writer(buffer, lineterminator=ending, quoting=csv.QUOTE_MINIMAL if ending == "\r\n" else csv.QUOTE_ALL)
    writer.writerow(columns)
    sources = []
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "prompts.csv"
    for prompt, values in rows:
        # A record starts on the line after every line break written so far (\r\n, \n or \r).
        sources.append(f"{path}:{len(io.StringIO(buffer.getvalue(), newline='').readlines()) + 1}")
        writer.writerow([prompt, *(values[c][0] if c in values else "" for c in columns[1:])])
    path.write_bytes(("\ufeff" if bom else "").encode() + buffer.getvalue().encode())
    check(path, rows, sources)


@GENERATED
@given(rows=ROWS_VALUE, bom=st.booleans(), ascii_only=st.booleans(), blank=st.lists(st.booleans(), max_size=6))
def test_jsonl_written_by_json_dumps_reads_back_exactly(
    tmp_path: Path, rows: list[tuple[str, dict[str, tuple[Any, Any]]]], bom: bool, ascii_only: bool, blank: list[bool]
) -> None:
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "prompts.jsonl"
    lines, sources = [], []
    for index, (prompt, values) in enumerate(rows):
        if index < len(blank) and blank[index]:
            lines.append("  ")  # blank lines are skipped, and still counted
        sources.append(f"{path}:{len(lines) + 1}")
        lines.append(json.dumps({"prompt": prompt, **{k: w for k, (w, _e) in values.items()}}, ensure_ascii=ascii_only))
    path.write_bytes(("\ufeff" if bom else "").encode() + "\n".join(lines).encode() + b"\n")
    check(path, rows, sources)


@GENERATED
@given(
    prompts=st.lists(TXT_PROMPT, min_size=1, max_size=8),
    endings=st.lists(st.sampled_from(["\n", "\r\n"]), min_size=8, max_size=8),
    extras=st.lists(st.sampled_from(["", "  ", "\t", "# a comment", "  # indented comment"]), max_size=8),
    pad=st.sampled_from(["", " ", "\t ", "  "]),
    bom=st.booleans(),
)
def test_txt_lines_read_back_exactly(
    tmp_path: Path, prompts: list[str], endings: list[str], extras: list[str], pad: str, bom: bool
) -> None:
    # Rule: one prompt a line, lines end at \n or \r\n only; spaces and tabs around it are dropped;
    # blank and '#' lines are skipped.
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "prompts.txt"
    text, sources = "", []
    for index, prompt in enumerate(prompts):
        if index < len(extras):
            text += extras[index] + endings[index]
        sources.append(f"{path}:{text.count(chr(10)) + 1}")
        text += pad + prompt + pad + endings[index]
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    specs = read_prompts(path)
    assert [s.prompt for s in specs] == prompts
    assert [s.source for s in specs] == sources
    check_items(specs)


@GENERATED
@given(rows=ROWS_VALUE, as_spec=st.lists(st.booleans(), min_size=6, max_size=6))
def test_python_api_prompts_are_kept_exactly_or_refused_with_their_position(
    rows: list[tuple[str, dict[str, tuple[Any, Any]]]], as_spec: list[bool]
) -> None:
    # dicts are checked by prompt_specs (what Client.submit runs first), PromptSpec overrides when items are built.
    given_prompts: list[Any] = []
    for index, (prompt, values) in enumerate(rows):
        written = {k: w for k, (w, _e) in values.items()}
        if as_spec[index]:
            given_prompts.append(PromptSpec(prompt, written) if written else prompt)
        else:
            given_prompts.append({"prompt": prompt, **written})
    sources = [f"prompt {i + 1}" for i in range(len(rows))]
    dict_rows = [(p, v) if not as_spec[i] else (p, {}) for i, (p, v) in enumerate(rows)]
    refusal = first_refusal(dict_rows)
    try:
        specs = prompt_specs(given_prompts)
    except ValidationError as e:  # anything else fails the test
        assert refusal is not None, e
        assert e.where == sources[refusal[0]] and e.field in refusal[1], e
        return
    assert refusal is None, f"accepted {specs}"
    assert [s.prompt for s in specs] == [p for p, _ in rows] and [s.source for s in specs] == sources
    if first_refusal(rows) is not None:
        with pytest.raises(ValidationError) as error:
            build_items(specs, preset=PRESET, model="m", defaults=DEFAULTS, limits=LIMITS)
        assert error.value.where in sources and error.value.field in {*OVERRIDE_FIELDS, "prompt"}
        return
    check_items(specs, [{k: e for k, (_w, e) in v.items() if e is not UNSET} for _p, v in rows])


@settings(max_examples=200, deadline=None, database=None)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        # a well-formed start, then anything: more of the bytes reach the field checks
        st.tuples(st.sampled_from([b"prompt,width\n", b'{"prompt": "', b'{"prompt": "a", "seed": ']), st.binary()).map(
            b"".join
        ),
    ),
    suffix=st.sampled_from([".txt", ".csv", ".jsonl"]),
)
def test_any_bytes_are_read_or_refused_with_a_place(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"prompts{suffix}"
        path.write_bytes(data)
        result = read_or_refusal(path)
        if isinstance(result, InputFileError):
            assert result.where.startswith(str(path)) and "\n" not in str(result)
            return
        for spec in result:
            assert isinstance(spec.prompt, str) and spec.source.startswith(f"{path}:")
            assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in spec.overrides.values())
            assert all(math.isfinite(v) for v in spec.overrides.values())
        check_items(result)


# -- a real process ------------------------------------------------------------------------------------

HOSTILE_FILES = {
    "inf.csv": ("prompt,width\na fox,64\na cat,inf\n", "inf.csv:3", "width"),
    "quoted.csv": ('prompt,steps\n"two\nlines",4\nthree,1e400\n', "quoted.csv:4", "steps"),
    "bool.jsonl": ('{"prompt": "a"}\n\n{"prompt": "b", "width": true}\n', "bool.jsonl:3", "width"),
    "nul.jsonl": ('{"prompt": "a\\u0000b"}\n', "nul.jsonl:1", "prompt"),
    "huge.jsonl": ('{"prompt": "a", "seed": ' + "9" * 5000 + "}\n", "huge.jsonl:1", ""),
    "seed.csv": ("\ufeffprompt,seed\na,18446744073709551616\n", "seed.csv:2", "seed"),
}


def test_fluxfleet_submit_refuses_hostile_files_in_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Redis is not running: every refusal must come before the producer needs it.
    env = {
        **os.environ,
        "FLUXFLEET_BROKER__URL": "redis://127.0.0.1:1/0",
        "FLUXFLEET_MODEL_DIR": str(tiny_model_dir),
        "FLUXFLEET_STORAGE__URL": f"file://{tmp_path / 'store'}",
        "COLUMNS": "400",
    }
    script = (
        "import sys\nfrom typer.main import get_command\nfrom producer.cli import app\n"
        "cli = get_command(app)\nfor path in sys.argv[1:]:\n"
        "    code = cli.main(['submit', path, '--preset', 'tiny'], standalone_mode=False)\n"
        "    print('EXIT', code, file=sys.stderr)\n"
    )
    paths = []
    for name, (content, _where, _field) in HOSTILE_FILES.items():
        (tmp_path / name).write_bytes(content.encode())
        paths.append(str(tmp_path / name))
    # One interpreter runs the CLI on every file (a process each costs seconds on a 2-core CI machine) ...
    result = subprocess.run(
        [sys.executable, "-c", script, *paths], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    exits = [line for line in result.stderr.splitlines() if line.startswith("EXIT")]
    assert exits == ["EXIT 1"] * len(HOSTILE_FILES), result.stderr[-3000:]
    for line, (_content, where, field) in zip(errors, HOSTILE_FILES.values(), strict=True):
        assert f"{tmp_path}/{where}: " in line and (not field or line.endswith(f"(field '{field}')")), line
    # ... and one as `python -m producer.cli` shows the exit code and the single line as a user sees them.
    single = subprocess.run(
        [sys.executable, "-m", "producer.cli", "submit", paths[0], "--preset", "tiny"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert single.returncode == 1 and "Traceback" not in single.stderr
    assert single.stderr.strip().count("\n") == 0 and "inf.csv:3: " in single.stderr, single.stderr
    assert not (tmp_path / "store").exists()
