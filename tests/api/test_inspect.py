"""``fxmem inspect`` and ``fxmem plan --allow`` end to end, on a workload they were not written
for: a Hugging Face GPT-2 built from a config by a small factory file."""

import shutil
import sys
import textwrap

import pytest

from fxmem.api.cli import main

pytest.importorskip("transformers")

FACTORY = """
    import torch
    import transformers

    def make():
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32,
                                         vocab_size=128)
        model = transformers.GPT2LMHeadModel(config).train()
        ids = torch.randint(0, 128, (2, 32))
        return {"model": model, "kwargs": {"input_ids": ids, "labels": ids}, "name": "hf-gpt2",
                "optimizer": torch.optim.AdamW(model.parameters())}
"""


@pytest.fixture
def hf_factory(tmp_path, monkeypatch):
    (tmp_path / "hf_factory.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "hf_factory:make"
    sys.modules.pop("hf_factory", None)


def test_inspect_writes_graphs_passes_and_the_memory_plot(hf_factory, tmp_path, capsys):
    out = tmp_path / "inspect"
    assert main(["inspect", hf_factory, "--budget", "85%", "--lowering", "eager",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"files in {out}" in printed
    report = (out / "plan.txt").read_text()
    assert "recompute" in report and "predicted peak" in report
    for name in ("joint", "forward", "backward"):
        code = (out / "graphs" / f"{name}.py").read_text()
        assert code.startswith(f"# {name} graph") and "def forward" in code
    split = next((out / "passes").glob("*-recompute-split"))
    diff = (split / "changes.diff").read_text()
    assert diff.startswith("--- ") and "\n+" in diff  # the pass changed the graphs
    assert (split / "forward.before.py").read_text() != (split / "forward.after.py").read_text()
    assert (out / "memory.png").stat().st_size > 10_000
    index = (out / "index.md").read_text()
    assert "recompute-split" in index and "memory.png" in index
    drawn = (out / "graphs" / "forward.dot")
    if drawn.exists():  # pydot installed (the dev extra has it)
        assert drawn.read_text().startswith("digraph")
        assert (out / "graphs" / "forward.svg").exists() == (shutil.which("dot") is not None)
    else:
        assert "pydot" in index


def test_inspect_without_graphviz_says_what_to_install(hf_factory, tmp_path, monkeypatch,
                                                       capsys):
    pytest.importorskip("pydot")
    from fxmem.api import inspection

    monkeypatch.setattr(inspection, "dot_program", lambda: None)
    out = tmp_path / "inspect"
    assert main(["inspect", hf_factory, "--budget", "90%", "--lowering", "eager",
                 "--no-measure", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped: SVG: Graphviz's dot program is not on PATH" in printed
    assert "skipped: memory.png: the steps were not measured" in printed
    assert (out / "graphs" / "backward.dot").exists()
    assert not (out / "graphs" / "backward.svg").exists()


def test_plan_takes_the_levers_to_allow(hf_factory, capsys):
    assert main(["plan", hf_factory, "--budget", "85%", "--lowering", "eager",
                 "--allow", "recompute"]) == 0
    assert "within budget   yes" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plan", hf_factory, "--budget", "85%", "--allow", "recompute,teleport"])
    assert "unknown levers ['teleport']" in capsys.readouterr().err
