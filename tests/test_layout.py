import ast

from tests.conftest import REPO


def test_pipeline_never_imports_prefect_flows_or_the_local_services():
    """The library is the library: only flows/ imports Prefect, and the dev services in
    local/ import the library, never the other way round."""
    offenders = []
    for path in (REPO / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {name}" for name in names
                          if name.split(".")[0] in ("prefect", "flows", "local")]
    assert offenders == []


def test_readme_starts_with_the_two_commands():
    head = "\n".join((REPO / "README.md").read_text().splitlines()[:40])
    assert "make demo" in head and "make test" in head
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_local_services_never_import_prefect_or_flows():
    offenders = []
    for path in (REPO / "local").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{path.relative_to(REPO)}: {name}" for name in names if name.split(".")[0] in ("prefect", "flows")]
    assert offenders == []


def test_the_flow_names_the_parser_offers_are_the_flows():
    from flows.cli import FLOW_NAMES
    from flows.flows import FLOWS

    assert set(FLOW_NAMES) == set(FLOWS)


OUTSIDE = ("DESIGN.md", "STYLE.md", "NOTES.md")  # the project's briefs live beside the repository, not in it


def test_nothing_points_outside_the_repository():
    """Docs and comments point to docs/ in the repo, not to files beside it."""
    offenders = [str(path.relative_to(REPO)) for folder in ("pipeline", "local", "flows", "bench", "docs", "infra")
                 for path in (REPO / folder).rglob("*") if path.suffix in (".py", ".md", ".yaml", ".sh")
                 and (any(name in path.read_text() for name in OUTSIDE)
                      or "../shared/" in path.read_text().replace("RESFLOW_SHARED_DATA:-../shared/data", ""))]
    offenders += [name for name in ("README.md",) if any(outside in (REPO / name).read_text() for outside in OUTSIDE)]
    assert offenders == []
