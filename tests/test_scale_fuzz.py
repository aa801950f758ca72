"""Fuzzing load_scales: 6,000 seeded mutations of a real scale file (the sample CNN's), about 10 s on two
cores. Only ScaleFileError may come out, and every table that loads must be usable: a valid grid, and
finite scales no smaller than the smallest normal float32."""

import copy
import json
import random
from collections import Counter

import pytest
import torch
from safetensors.torch import load, save

from octavcal import CalibrationConfig, ScaleFileError, calibrate, load_scales, save_scales
from octavcal.data import load_data, plan_batches
from octavcal.loading import load_model

MUTATIONS = 6000
SEED = 20240611
TINY = torch.finfo(torch.float32).tiny
# Raw JSON that json.dumps cannot produce: a placeholder string is swapped for one of these.
DEEP = "[" * 10_000 + "]" * 10_000
RAW_LITERALS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 5000, DEEP, "[" * 33 + "]" * 33]
PLACEHOLDER = "\x00raw\x00"
WRONG_VALUES = [
    None, True, False, 0, -1, 1, 2, 7, 16, 17, 1.5, -0.0, 10**30, -(10**30), 2**63, 1e308, "", "0", "1",
    "runtime", "paper", "weight", "activation", "x" * 300, "fc1:weight", [], [1], ["a"], [[1]], [0, -1],
    [2**70], [None], {}, {"a": 1}, {"convention": "paper"}, PLACEHOLDER,
]  # fmt: skip
SPECIAL_AMAX = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -1.0, 1e-45, 1e-39, TINY, 3.4e38]
WRONG_DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8, torch.bool]
ST_DTYPES = ["F16", "F64", "I32", "I8", "BOOL", "BF16", "F8_E4M3", "XX", "", 1, None]


class Base:
    """A scale file split into the parts the mutations edit."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.header_len = int.from_bytes(raw[:8], "little")
        self.header = json.loads(raw[8 : 8 + self.header_len])
        self.meta = json.loads(self.header["__metadata__"]["octavcal"])
        self.tensor_names = sorted(k for k in self.header if k != "__metadata__")


@pytest.fixture
def base(tmp_path, cnn_paths):
    loaded = load_model(cnn_paths["model"], arch=cnn_paths["arch"])
    data = load_data(cnn_paths["data"])
    batches = [data.batch(i) for i in plan_batches(data.num_samples, 16, 3, 0)]
    table = calibrate(loaded, batches, CalibrationConfig(bits=4, methods=("octav", "p99.9")), seed=0)
    return Base(save_scales(table, tmp_path / "base.safetensors").read_bytes())


# Byte-level mutations.


def flip_bytes(rng, base):
    data = bytearray(base.raw)
    in_header = rng.random() < 0.7
    hi = 8 + base.header_len if in_header else len(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(hi)
        if in_header and rng.random() < 0.8:  # mostly ASCII, which keeps the header valid UTF-8
            data[i] = rng.choice(b"{}[],:0123456789.-eE tfnaxz") if rng.random() < 0.8 else data[i] ^ 1
        else:
            data[i] = data[i] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
    return bytes(data)


def truncate(rng, base):
    cut = base.raw[: rng.randrange(len(base.raw))]
    return cut + bytes(rng.randrange(256) for _ in range(rng.choice([0, 0, 1, 7, 64])))


def edit_header_length(rng, base):
    n = base.header_len
    new = rng.choice(
        [0, 1, 7, 8, n - 1, n + 1, n - rng.randint(2, 64), n + rng.randint(2, 64), len(base.raw), 2**31,
         2**63, 2**64 - 1, rng.randrange(2**64)]
    )  # fmt: skip
    return (new % 2**64).to_bytes(8, "little") + base.raw[8:]


# Edits of the safetensors header (tensor dtypes, shapes, offsets; the metadata entry).


def edit_safetensors_header(rng, base):
    header = copy.deepcopy(base.header)
    name = rng.choice(base.tensor_names)
    entry = header[name]
    choice = rng.randrange(7)
    if choice == 0:
        entry["dtype"] = rng.choice(ST_DTYPES)
    elif choice == 1:
        entry["shape"] = rng.choice([[], [0], [1], [2, 2], [10**12], [-1], "x", None, [1.5]])
    elif choice == 2:
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, start], [start, end + 4], [0, 2**62], [-1, end], [start]])
    elif choice == 3:
        del header[name]
    elif choice == 4:
        header["__metadata__"] = rng.choice([None, [], "x", {"octavcal": 1}, {"octavcal": None}, {}])
    elif choice == 5:
        header["__metadata__"]["octavcal"] = rng.choice(["", "{", "[]", "null", "\ud800", "1", "{}"])
    else:
        header[f"{name}x"] = dict(entry)  # two tensors over the same bytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + base.raw[8 + base.header_len :]


# Edits of the octavcal metadata JSON.


def paths_in(meta):
    """Every (container, key) in ``meta``, found without recursion."""
    found, stack = [], [meta]
    while stack:
        node = stack.pop()
        keys = list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else []
        for key in keys:
            found.append((node, key))
            stack.append(node[key])
    return found


def edit_meta(rng, base):
    meta = copy.deepcopy(base.meta)
    if rng.random() < 0.3:
        as_version_1(meta)
    for _ in range(rng.randint(1, 3)):
        container, key = rng.choice(paths_in(meta))
        roll = rng.random()
        if roll < 0.2 and isinstance(container, dict):
            del container[key]
        elif roll < 0.35:
            container[key] = copy.deepcopy(rng.choice(paths_in(base.meta))[0])  # a plausible misfit
        else:
            container[key] = copy.deepcopy(rng.choice(WRONG_VALUES))
    if rng.random() < 0.02:
        meta = rng.choice([[], None, 1, "x", [meta]])
    text = json.dumps(meta).replace(json.dumps(PLACEHOLDER), rng.choice(RAW_LITERALS))
    if rng.random() < 0.05:
        text = text[: rng.randrange(len(text))]
    if rng.random() < 0.005:
        text = json.dumps({**base.meta, "pad": "x" * 5_000_000})  # over the size limit
    return save(load(base.raw), metadata={"octavcal": text})


def as_version_1(meta):
    meta["format_version"] = 1
    meta.pop("uncovered", None)
    for d in meta["targets"].values():
        d.pop("param", None), d.pop("tied", None)


# Edits of the tensors.


def edit_tensors(rng, base):
    tensors = load(base.raw)
    name = rng.choice(base.tensor_names)
    t = tensors[name]
    choice = rng.randrange(6)
    if choice == 0:  # one special value, in one channel or the whole tensor
        t = t.clone()
        if t.dim() and rng.random() < 0.5:
            t[rng.randrange(t.numel())] = rng.choice(SPECIAL_AMAX)
        else:
            t.fill_(rng.choice(SPECIAL_AMAX))
    elif choice == 1:
        t = t.to(rng.choice(WRONG_DTYPES))
    elif choice == 2:
        t = rng.choice(
            [t.reshape(1, -1), t.reshape(-1)[:1], t.reshape(-1)[:0], torch.cat([t.reshape(-1)] * 2)]
        )
        t = t.reshape(()) if t.numel() == 1 and rng.random() < 0.5 else t
    elif choice == 3:
        del tensors[name]
        return save(tensors, metadata=base.header["__metadata__"])
    elif choice == 4:  # every tensor of the file filled with one special value
        tensors = {k: torch.full_like(v, rng.choice(SPECIAL_AMAX)) for k, v in tensors.items()}
        return save(tensors, metadata=base.header["__metadata__"])
    else:
        t = (t * rng.choice([1e-30, 1e30, 1e38, -1.0])).contiguous()
    tensors[name] = t.contiguous()
    return save(tensors, metadata=base.header["__metadata__"])


MUTATORS = [flip_bytes, truncate, edit_header_length, edit_safetensors_header, edit_meta, edit_tensors]
WEIGHTS = [3, 1, 1, 2, 5, 3]


def mutate(rng, base):
    raw = rng.choices(MUTATORS, WEIGHTS)[0](rng, base)
    if raw and rng.random() < 0.1:  # now and then a bit flip on top
        data = bytearray(raw)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        raw = bytes(data)
    return raw


def check_usable(table):
    convention = table.convention
    assert convention in ("runtime", "paper")
    assert all(isinstance(m, str) for m in table.methods)
    for entry in table.targets.values():
        grid = entry.grid(convention)
        assert grid.qmax >= 1
        entry.describe(convention)
        for method in entry.methods:
            scale = entry.scale(method, convention)
            assert scale.dtype == torch.float32 and scale.numel() >= 1
            assert torch.isfinite(scale).all() and (scale >= TINY).all(), (entry.id, method, scale)
            per_batch = entry.methods[method].per_batch
            assert per_batch is None or bool(torch.isfinite(per_batch).all())


def test_no_mutation_escapes_as_anything_but_a_scale_file_error(tmp_path, base):
    rng = random.Random(SEED)
    path = tmp_path / "m.safetensors"
    version_1 = copy.deepcopy(base.meta)
    as_version_1(version_1)
    for meta in (base.meta, version_1):  # unmutated, in both formats, the file loads
        path.write_bytes(save(load(base.raw), metadata={"octavcal": json.dumps(meta)}))
        check_usable(load_scales(path))
    escaped: Counter[str] = Counter()
    examples: dict[str, str] = {}
    outcomes: Counter[str] = Counter()
    for i in range(MUTATIONS):
        path.write_bytes(mutate(rng, base))
        try:
            table = load_scales(path)
        except ScaleFileError as exc:
            message = str(exc)
            assert "\n" not in message and message.startswith(f"Scale file '{path}'"), message
            outcomes["refused"] += 1
            continue
        except Exception as exc:  # what the test is for: anything else is a bug
            escaped[type(exc).__name__] += 1
            examples.setdefault(type(exc).__name__, f"mutation {i}: {exc!r}"[:300])
            continue
        check_usable(table)
        outcomes["loaded"] += 1
    assert not escaped, f"{dict(escaped)} escaped: {examples}"
    # The mutations must reach both sides: files that are refused and files that still load.
    assert outcomes["refused"] > MUTATIONS // 4 and outcomes["loaded"] > MUTATIONS // 50, outcomes
