"""docs/facts.md: every number in it is asserted by the test its row names, and the numbers no other test covers are
asserted here (shares and ratios, the hub's element count, the report's training arithmetic, FP8 value counts,
the deployment arithmetic)."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch

from dsv3_ref import ModelConfig
from dsv3_ref.systems import accounting as acc

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT / "docs" / "facts.md"
COLUMNS = ["Quantity", "Value", "Source", "Checked by"]
TEST_REF = re.compile(r"`(tests/test_\w+\.py)::(\w+)`")
NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:e-?\d+)?(?![\w.])")


# ------------------------------------------------------------------------------------------ facts.md itself
def fact_rows() -> list[tuple[str, list[str]]]:
    """(section, cells) for every row of every four-column table under a '## ' heading of facts.md."""
    rows, section, header = [], "", None
    for line in FACTS.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section, header = line[3:].strip(), None
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(cells[0]) <= set("-: ") and header == COLUMNS:
                rows.append((section, cells))
        else:
            header = None
    return rows


def numbers(cell: str) -> list[str]:
    """The numbers of a Value cell, without thousands separators: '70,272 B = 8.58 GiB' -> ['70272', '8.58']."""
    return [n.replace(",", "") for n in NUMBER.findall(cell.replace("$", ""))]


def _spellings(number: str) -> set[str]:
    """How a test may write the number: 70272, 70_272, 70,272 (in a string), 448.0."""
    if "." in number or "e" in number:
        return {number}
    groups = f"{int(number):,}"
    return {number, groups.replace(",", "_"), groups, f"{number}.0"}


def _source_of_test(file: Path, name: str) -> str | None:
    """The test function's source plus the module-level assignments it reads (e.g. a table of expected values)."""
    text = file.read_text(encoding="utf-8")
    tree = ast.parse(text)
    constants = {t.id: ast.get_source_segment(text, node) for node in tree.body if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name)}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}  # the decorators' names too
            parts = [ast.get_source_segment(text, d) for d in [*node.decorator_list, node]]
            return "\n".join(parts + [constants[u] for u in sorted(used & constants.keys())])
    return None


def _contains(source: str, number: str) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(s)}(?![\d_]|\.\d)", source) for s in _spellings(number))


def test_facts_tables_are_well_formed():
    rows = fact_rows()
    assert len(rows) >= 50, f"only {len(rows)} rows read from {FACTS}"
    sections = {s for s, _ in rows}
    assert {"Configuration (671B)", "Parameters", "KV cache (671B, BF16, 61 layers)", "FP8 (report §3.3)"} <= sections
    for section, (quantity, value, source, checked_by) in rows:
        assert numbers(value), f"facts.md [{section}] {quantity!r}: no number in the Value cell {value!r}"
        assert TEST_REF.search(checked_by), f"facts.md [{section}] {quantity!r}: name a test as tests/x.py::test_y"
        assert source or section.startswith("KV cache"), f"facts.md [{section}] {quantity!r}: give the source"


def test_every_number_is_in_the_test_its_row_names():
    problems = []
    for section, (quantity, value, _source, checked_by) in fact_rows():
        sources = []
        for file, name in TEST_REF.findall(checked_by):
            src = _source_of_test(ROOT / file, name) if (ROOT / file).is_file() else None
            if src is None:
                problems.append(f"[{section}] {quantity}: {file}::{name} does not exist")
            else:
                sources.append(src)
        for number in numbers(value):
            if sources and not any(_contains(s, number) for s in sources):
                problems.append(f"[{section}] {quantity}: {number} is not in {checked_by}")
    assert not problems, "docs/facts.md rows not backed by their tests:\n" + "\n".join(problems)


def test_the_checker_of_this_page_catches_a_missing_number():
    source = "def test_x():\n    assert acc.kv_cache_bytes(cfg) == 70_272\n"
    assert _contains(source, "70272") and not _contains(source, "7027") and not _contains(source, "70273")
    assert _contains("x == 0.1352337789", "0.1352337789") and not _contains("x == 0.13523377891", "0.1352337789")
    assert numbers("9,210,691,584 B = 8.58 GiB") == ["9210691584", "8.58"]
    assert numbers("$1 \\times 128$, 1e-4") == ["1", "128", "1e-4"]


# ------------------------------------------------------------------------------------------ the numbers
@pytest.fixture(scope="module")
def cfg671() -> ModelConfig:
    return ModelConfig.from_preset("671B")


def test_shares_and_ratios(cfg671):
    counts = acc.param_counts(cfg671)
    assert round(100 * counts["routed_experts"] / acc.total_params(cfg671), 2) == 97.45
    mla, mha = acc.kv_cache_bytes(cfg671, "mla"), acc.kv_cache_bytes(cfg671, "mha")
    assert round(mha / mla, 1) == 56.9
    assert round(acc.kv_cache_bytes(cfg671, "naive") / mla, 1) == 71.1
    at_128k = {s: acc.kv_cache_bytes(cfg671, s, seq_len=131_072) for s in ("mla", "mha")}
    assert at_128k == {"mla": 9_210_691_584, "mha": 523_986_010_112}
    assert round(at_128k["mla"] / 2**30, 2) == 8.58 and at_128k["mha"] / 2**30 == 488


def test_hub_checkpoint_elements(cfg671):
    """The hub's element count ("685B"): main model + the MTP layer as stored (with its copies of the embedding and
    the head) + the FP32 weight_scale_inv tensors, from the byte counts of each dtype."""
    b = acc.checkpoint_bytes(cfg671)
    elements = b["e4m3"] + b["bf16"] // 2 + b["fp32"] // 4 + b["scale_inv"] // 4
    assert elements == 684_531_386_000
    mtp_as_stored = acc.mtp_params(cfg671) + 2 * acc.param_counts(cfg671)["embed"]
    assert elements == acc.total_params(cfg671) + mtp_as_stored + 41_540_496


def test_training_budget_arithmetic():
    """The report's training numbers agree with each other, and the step count they imply."""
    tokens, batch, seq_len = 14.8e12, 15360, 4096  # [TR] §4.1-4.2: the full batch after the first 469B tokens
    assert math.ceil(tokens / (batch * seq_len)) == 235_240  # at least this many steps, not "a million"
    hours = {"pre-training": 2664e3, "context extension": 119e3, "post-training": 5e3}  # [TR] Table 1
    assert sum(hours.values()) == 2788e3
    assert 180e3 * 14.8 == pytest.approx(hours["pre-training"])  # 180K GPU hours per trillion tokens
    assert 2 * sum(hours.values()) / 1e6 == pytest.approx(5.576)  # $2 per GPU hour


def test_fp8_value_counts():
    """Distinct finite values of each format, from all 256 bit patterns (+0 and -0 count once)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    counts = {}
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        values = codes.view(dtype).float()
        counts[dtype] = len({v for v in values[torch.isfinite(values)].tolist()})  # 0.0 == -0.0 in a set
    assert counts == {torch.float8_e4m3fn: 253, torch.float8_e5m2: 247}


def test_deployment_arithmetic(cfg671):
    """[TR] §3.4: the prefill and decode units, from the numbers of GPUs and the 671B config."""
    gpus_per_node = 8
    prefill = 4 * gpus_per_node
    assert prefill == 32 and prefill // 4 == 8  # TP4 x DP8 for attention, EP32 for the MoE
    redundant = prefill * 1  # one redundant expert per GPU
    assert redundant == 32 and cfg671.n_routed_experts // prefill + 1 == 9
    hosted, active = 16, 9  # dynamic redundancy, explored for prefilling: 16 experts hosted per GPU, 9 active
    assert active == cfg671.n_routed_experts // prefill + 1 and hosted > active
    decode = 40 * gpus_per_node
    assert decode == 320 and decode // 4 == 80  # TP4 x DP80, EP320: one expert per GPU
    assert decode - cfg671.n_routed_experts == 64  # GPUs for the redundant and the shared experts
    assert cfg671.n_activated_experts + cfg671.n_shared_experts == 9  # the shared expert is treated as routed
