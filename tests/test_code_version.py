"""Code versions are derived from imports: what a task's core functions import, transitively, is in its version."""

from __future__ import annotations

import sys
from pathlib import Path

from dapt_core.hashing import PACKAGE_DIR, code_version, imported_sources, sources_hash


def _package(root: Path) -> Path:
    """pkg: a imports b at the top, b imports c inside a function, sub/d imports a relative module; e stands apart."""
    pkg = root / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import pkg.b as b_mod\n\ndef core():\n    return b_mod.helper()\n")
    (pkg / "b.py").write_text("def helper():\n    from pkg import c\n    return c.VALUE\n")
    (pkg / "c.py").write_text("VALUE = 1\n")
    (pkg / "e.py").write_text("OTHER = 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "d.py").write_text("from ..c import VALUE\nfrom . import f\n")
    (pkg / "sub" / "f.py").write_text("")
    return pkg


def test_a_transitively_imported_module_changes_the_version_and_an_unrelated_one_does_not(tmp_path):
    pkg = _package(tmp_path)
    names = lambda files: sorted(f.relative_to(pkg).as_posix() for f in files)  # noqa: E731
    assert names(imported_sources(pkg / "a.py", pkg)) == ["__init__.py", "a.py", "b.py", "c.py"]
    assert names(imported_sources(pkg / "sub" / "d.py", pkg)) == [
        "__init__.py",
        "c.py",
        "sub/__init__.py",
        "sub/d.py",
        "sub/f.py",
    ]

    version = lambda: sources_hash(imported_sources(pkg / "a.py", pkg), tmp_path)  # noqa: E731
    before = version()
    (pkg / "e.py").write_text("OTHER = 2\n")
    assert version() == before
    (pkg / "c.py").write_text("VALUE = 2\n")  # two imports away, inside a function
    assert version() != before


def test_task_versions_cover_what_their_core_functions_import():
    from dapt_core.pack import pack_corpus

    start = Path(sys.modules[pack_corpus.__module__].__file__)
    pack_files = {f.relative_to(PACKAGE_DIR).as_posix() for f in imported_sources(start)}
    assert {"pack/mix.py", "pack/shards.py", "split.py", "model.py"} <= pack_files  # split: through pack/documents.py
    assert "sft.py" not in pack_files and "train.py" not in pack_files
    import dapt.tasks.sft
    import dapt.tasks.training_data

    assert dapt.tasks.training_data.PACK_CODE != dapt.tasks.training_data.TOKENIZER_CODE
    assert code_version(dapt.tasks.sft.run_sft_attempt, task_module=dapt.tasks.sft) == dapt.tasks.sft.SFT_CODE


def test_the_training_stages_do_not_follow_the_data_stages_code():
    """An edit to discovery or ingest must not make users train again: CPT's and SFT's versions do not cover them
    (dapt plan reads raw inputs through them, so its GPU table lives apart, in dapt_core/gpus.py)."""
    import dapt.tasks.cpt
    import dapt.tasks.sft

    data_stages = {"discovery.py", "ingest.py", "ingest_batches.py", "ingest_s3.py", "input_files.py", "plan.py"}
    for core in (dapt.tasks.cpt.run_attempt, dapt.tasks.cpt.evaluate, dapt.tasks.sft.run_sft_attempt):
        start = Path(sys.modules[core.__module__].__file__)
        files = {f.relative_to(PACKAGE_DIR).as_posix() for f in imported_sources(start)}
        assert "gpus.py" in files or core is dapt.tasks.cpt.evaluate
        assert not files & data_stages, core.__module__
