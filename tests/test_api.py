"""The public API: flat, explicit, documented, and the README's examples run."""

import inspect
import re
import tomllib
from pathlib import Path

from jax.sharding import PartitionSpec as P

import lorajax

ROOT = Path(__file__).resolve().parent.parent


def test_all_names_exist_and_are_exported_once():
    assert len(lorajax.__all__) == len(set(lorajax.__all__))
    for name in lorajax.__all__:
        assert hasattr(lorajax, name), name
    public = {n for n in dir(lorajax) if not n.startswith("_")} - {"demo", "cli"}
    assert public == set(lorajax.__all__), public ^ set(lorajax.__all__)


def _public(module):
    return [(f"{module.__name__}.{name}", getattr(module, name)) for name in module.__all__]


def test_submodules_export_their_names():
    for module in (lorajax.adapters, lorajax.nnx):
        assert len(module.__all__) == len(set(module.__all__))
        for name in module.__all__:
            assert hasattr(module, name), name


def test_every_public_name_is_documented_with_an_example():
    named = _public(lorajax) + _public(lorajax.adapters) + _public(lorajax.nnx)
    for name, obj in named:
        if inspect.ismodule(obj):
            doc = inspect.getdoc(obj)
            assert doc and len(doc.splitlines()[0]) > 10, f"{name} has no summary line"
            continue
        if isinstance(obj, dict):  # PRESETS: documented by its values
            assert all(isinstance(v, str) and v for v in obj.values())
            continue
        if isinstance(obj, tuple):  # INITS: a tuple of names
            assert obj and all(isinstance(v, str) for v in obj)
            continue
        doc = inspect.getdoc(obj)
        assert doc and len(doc.splitlines()[0]) > 10, f"{name} has no summary line"
        if inspect.isfunction(obj):
            assert "Args:" in doc and "Returns:" in doc, f"{name} lacks Args/Returns"
            params = [p for p in inspect.signature(obj).parameters if p not in ("kwargs",)]
            for param in params:
                assert re.search(rf"\b{param}\b", doc), f"{name}: `{param}` is not documented"
    for name in ("low_rank", "galore", "flora", "lora", "randomized_svd", "subspace_overlap",
                 "current_bases", "resolve_targets", "MatrixSpec", "lora_plus",
                 "lora_pro"):  # fmt: skip
        assert ">>>" in inspect.getdoc(getattr(lorajax, name)), f"{name} has no example"
    for module in (lorajax.adapters, lorajax.nnx):
        for name, obj in _public(module):
            if callable(obj):
                assert ">>>" in inspect.getdoc(obj), f"{name} has no example"


def test_papers_are_cited():
    cited = {
        "low_rank": ["2403.03507", "2402.03293", "2407.18242", "2402.12354", "0909.4061"],
        "galore": ["2403.03507"],
        "flora": ["2402.03293"],
        "lora": ["2407.18242", "2402.12354"],
        "randomized_svd": ["0909.4061"],
        "lora_pro": ["2407.18242"],
        "lora_plus": ["2402.12354"],
    }
    adapters = {
        "init": ["2106.09685", "2312.03732", "2404.02948", "2406.01775", "2407.05000",
                 "2308.03303", "2504.07448"],
        "dora": ["2402.09353"],
        "lori_mask": ["2504.07448"],
    }  # fmt: skip
    for module, table in ((lorajax, cited), (lorajax.adapters, adapters)):
        for name, refs in table.items():
            doc = inspect.getdoc(getattr(module, name))
            for ref in refs:
                assert ref in doc, f"{name} does not cite {ref}"


def test_version_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert lorajax.__version__ == project["version"]
    assert (ROOT / "lorajax" / "py.typed").exists()


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def test_readme_examples_run():
    readme = (ROOT / "README.md").read_text()
    blocks = _python_blocks(readme)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["state"][1].inner_state.mu["layer"]["kernel"].shape == (16, 256)


def test_readme_opens_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    head = readme.split("\n## ")[0]
    assert "make demo" in head and "make test" in head
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test:", makefile, re.M) and re.search(r"^demo:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_model_data_and_train_modules_are_documented():
    import lorajax.checkpoint
    import lorajax.data
    import lorajax.models
    import lorajax.peft_format
    import lorajax.sharding
    import lorajax.train

    modules = (lorajax.models, lorajax.data, lorajax.train, lorajax.checkpoint, lorajax.peft_format)
    modules += (lorajax.sharding,)
    for module in modules:
        assert len(module.__all__) == len(set(module.__all__))
        assert inspect.getdoc(module), module.__name__
        for name, obj in _public(module):
            if name == "lorajax.sharding.LLAMA_RULES":  # (regex, PartitionSpec) pairs
                assert all(isinstance(p, str) and isinstance(s, P) for p, s in obj)
                continue
            if name == "lorajax.sharding.AXIS_TYPES":
                assert set(obj) == {"explicit", "auto"}
                continue
            if name == "lorajax.sharding.Rules":  # a type alias
                continue
            if isinstance(obj, tuple | str):  # METHODS, TEXT_SUFFIXES, file names
                assert obj and all(isinstance(v, str) for v in obj)
                continue
            doc = inspect.getdoc(obj)
            assert doc and len(doc.splitlines()[0]) > 10, f"{name} has no summary line"
            if inspect.isfunction(obj):
                params = list(inspect.signature(obj).parameters)
                if params:
                    assert "Args:" in doc, f"{name} lacks Args"
                for param in params:
                    assert re.search(rf"\b{param}\b", doc), f"{name}: `{param}` undocumented"
                assert "Returns:" in doc, f"{name} lacks Returns"
            # Containers and the error class need none; load_gguf reads a 98 MB file, and
            # tests/test_gguf.py runs it instead.
            exempt = ("ModelFileError", "TrainState", "FitResult", "load_gguf", "CheckpointError")
            exempt += ("restore_adapters",)  # its example is save_adapters' round trip
            if callable(obj) and name.split(".")[-1] not in exempt:
                assert ">>>" in doc, f"{name} has no example"
