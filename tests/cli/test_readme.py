"""README.md's two set-up commands stay true: CI runs exactly its test command, and its main job is the default."""


from helpers import ROOT



def commands(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("pip install")]


def test_ci_runs_exactly_the_readme_test_command():
    readme = commands((ROOT / "README.md").read_text())
    ci = commands((ROOT / ".ci" / "run").read_text())
    assert len(readme) >= 2 and ci == [readme[1]] and readme[1].endswith("python -m pytest")


def test_readme_main_job_runs_the_default_train_entry():
    assert commands((ROOT / "README.md").read_text())[0].endswith("python -m lightning_diffusion.train")
